"""Constant rewards for the runtime tests of the group filter: every group is tied."""


def zero(completions, prompts, **fields):
    """0.0 for every completion: no group has outcome spread, so DAPO's filter drops all of them."""
    return [0.0] * len(completions)


def slow_zero(completions, prompts, **fields):
    """0.0 for every completion, after 3 s: long enough to kill the reward actor mid-batch."""
    import time

    time.sleep(3.0)
    return [0.0] * len(completions)


def hang(completions, prompts, **fields):
    """Never answers in time (the runtime's step timeout must turn this into an error)."""
    import time

    time.sleep(120.0)
    return [0.0] * len(completions)
