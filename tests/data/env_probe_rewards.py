"""A reward that reports whether the reward worker's environment carries ``WANDB_API_KEY``
(tests/test_security.py: secrets reach the actors through the Ray runtime environment)."""

import os


def wandb_key_present(completions, prompts, **fields):
    """1.0 for every completion when ``WANDB_API_KEY`` is set in this process, else 0.0.

    >>> os.environ.pop("WANDB_API_KEY", None) and None
    >>> wandb_key_present(["a", "b"], ["p", "q"])
    [0.0, 0.0]
    """
    return [1.0 if os.environ.get("WANDB_API_KEY") else 0.0 for _ in completions]
