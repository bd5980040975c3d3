"""Imported by the reward worker's forkserver: load math-verify and sympy and warm their caches once.

Every reward child is forked from that server, so a child that replaces a killed one starts warm
in milliseconds instead of paying the imports and the first math-verify call (~1 s) again.
"""

from .math_answer import warmup

warmup()
