"""Verifiable rewards (``rlkit.rewards``): plain functions called with keywords, as TRL calls them:
``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``.

Built-ins (names usable in config): ``math``, ``format_tags``, ``format_boxed``, ``length``,
``overlong``, ``reasoning_gym``, ``code_tests``. A user's function is referenced as ``package.module:function`` or
``path/to/file.py:function``; any signature that can bind those keywords runs (TRL's
``def f(completions, solution, **kwargs)`` as written; see :mod:`rlkit.rewards.registry` and
docs/rewards.md). :class:`rlkit.workers.reward.RewardWorker` runs them in child processes with
time and memory limits; here they are plain, in-process functions.

The config types and the registry import with the standard library only; the reward functions
(math-verify, sympy) load on first use.
"""

from .config import RewardConfig, RewardSpec
from .registry import (
    BUILTINS,
    STATUSES,
    RewardLoadError,
    RewardOutputError,
    RewardSignatureError,
    check_loadable,
    check_output,
    resolve,
)

_LAZY = {
    "math_answer": "math_answer",
    "judge": "math_answer",
    "answers_match": "math_answer",
    "extract_final_answer": "extract",
    "format_tags": "format",
    "format_boxed": "format",
    "length": "length",
    "overlong": "length",
    "reasoning_gym_score": "gym_adapter",
    "unevaluated": "math_answer",
    "literal_value": "strict",
    "strict_correct": "strict",
    "monitor_metrics": "hacks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTINS",
    "STATUSES",
    "RewardConfig",
    "RewardLoadError",
    "RewardOutputError",
    "RewardSignatureError",
    "RewardSpec",
    "check_loadable",
    "check_output",
    "resolve",
    *_LAZY,
]
