"""Custom rewards for rlkit: plain functions, referenced from a config as ``configs/my_reward.py:brevity``.

Contract: ``fn(completions, prompts, **fields) -> list[float | None]``, one value per completion,
sync or ``async def``. ``fields`` holds the dataset columns (one list per column, e.g. ``answer``)
and ``data_source``; ``None`` means "no score for this sample". The reward worker runs it in a
child process with a time and memory limit, and counts anything it raises or returns that is not
a finite number; nothing becomes a silent 0.
"""

import re


def brevity(completions, prompts, **fields):
    """1.0 for a completion of at most 200 characters, falling linearly to 0.0 at 1,000.

    >>> brevity(["x" * 100, "x" * 600, "x" * 2000], ["p"] * 3)
    [1.0, 0.5, 0.0]
    """
    return [min(1.0, max(0.0, (1000 - len(c)) / 800)) for c in completions]


async def shows_work(completions, prompts, answer=None, **fields):
    """1.0 if the completion contains an equation ending in the reference answer ("… = 7"); None without a reference.

    An ``async def`` reward is awaited by the worker (useful for a reward that calls a service).

    >>> import asyncio
    >>> asyncio.run(shows_work(["3 + 4 = 7, so 7", "it is 7"], ["p", "p"], answer=["7", "7"]))
    [1.0, 0.0]
    """
    answer = answer or [None] * len(completions)
    return [None if a is None else float(bool(re.search(rf"=\s*{re.escape(str(a))}(?!\d)", c)))
            for c, a in zip(completions, answer)]
