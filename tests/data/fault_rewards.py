"""Reward functions that misbehave on purpose, for the reward worker's fault tests.

Each returns 1.0 per sample except on samples whose field ``key`` (default ``fault``) is true,
where it raises, hangs, returns garbage, aborts its process or allocates without bound.
"""

import os
import time


def good(completions, prompts, **fields):
    return [1.0] * len(completions)


def raises(completions, prompts, key="fault", **fields):
    if any(fields[key]):
        raise ZeroDivisionError("deliberate failure")
    return [1.0] * len(completions)


def hangs(completions, prompts, key="fault", **fields):
    if any(fields[key]):
        time.sleep(60)
    return [1.0] * len(completions)


def returns_nan(completions, prompts, key="fault", **fields):
    return [float("nan") if f else 1.0 for f in fields[key]]


def returns_inf(completions, prompts, key="fault", **fields):
    return [float("inf") if f else 1.0 for f in fields[key]]


def returns_string(completions, prompts, key="fault", **fields):
    return ["one" if f else 1.0 for f in fields[key]]


def wrong_length(completions, prompts, key="fault", **fields):
    # drops the faulty samples from its output: any call holding one is short by one value
    return [1.0 for f in fields[key] if not f]


def aborts(completions, prompts, key="fault", **fields):
    if any(fields[key]):
        os.abort()
    return [1.0] * len(completions)


def allocates(completions, prompts, key="fault", **fields):
    if any(fields[key]):
        hoard = []
        while True:
            hoard.append(bytearray(64 * 2**20))
    return [1.0] * len(completions)


async def async_length(completions, prompts, **fields):
    return [float(len(c)) for c in completions]


def only_source_a(completions, prompts, data_source, **fields):
    return [1.0 if s == "a" else None for s in data_source]


def no_prompts(completions):
    """Takes only what it scores: valid (a call passes only the names a function declares)."""
    return [0.0] * len(completions)


def no_completions(prompts, answer):
    """Sees neither completions nor completion_ids: refused at load."""
    return [0.0] * len(prompts)


def positional_only(completions, prompts, /):
    """Rewards are called with keywords: positional-only parameters cannot bind."""
    return [0.0] * len(completions)


def needs_trainer_state(completions, trainer_state, **kwargs):
    """Requires a TRL trainer object rlkit does not pass: refused at load."""
    return [0.0] * len(completions)


def named_fields_only(completions, prompts, answer):
    return [float(a == c) for a, c in zip(answer, completions)]
