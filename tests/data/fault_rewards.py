"""Reward functions that misbehave on purpose, for the worker's fault tests.

Each one is correct (returns 1.0 per sample) except on samples whose field ``fault`` is True,
where it raises, hangs, returns garbage, aborts the process or allocates without bound.
"""

import os
import time


def good(completions, prompts, **fields):
    return [1.0] * len(completions)


def raises(completions, prompts, fault, **fields):
    if any(fault):
        raise ZeroDivisionError("deliberate failure")
    return [1.0] * len(completions)


def hangs(completions, prompts, fault, **fields):
    if any(fault):
        time.sleep(60)
    return [1.0] * len(completions)


def returns_nan(completions, prompts, fault, **fields):
    return [float("nan") if f else 1.0 for f in fault]


def returns_string(completions, prompts, fault, **fields):
    return ["one" if f else 1.0 for f in fault]


def wrong_length(completions, prompts, fault, **fields):
    # drops the faulty samples from its output, so any call containing one is one value short
    return [1.0 for f in fault if not f]


def aborts(completions, prompts, fault, **fields):
    if any(fault):
        os.abort()
    return [1.0] * len(completions)


def allocates(completions, prompts, fault, **fields):
    if any(fault):
        hoard = []
        while True:
            hoard.append(bytearray(64 * 2**20))
    return [1.0] * len(completions)


async def async_len(completions, prompts, **fields):
    return [float(len(c)) for c in completions]


def only_source_a(completions, prompts, data_source, **fields):
    return [1.0 if s == "a" else None for s in data_source]


def no_prompts(completions):
    return [0.0] * len(completions)
