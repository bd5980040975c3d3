"""Constant rewards for the runtime tests of the group filter: every group is tied."""


def zero(completions, prompts, **fields):
    """0.0 for every completion: no group has outcome spread, so DAPO's filter drops all of them."""
    return [0.0] * len(completions)
