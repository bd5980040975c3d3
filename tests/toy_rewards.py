"""Toy verifiable rewards for the runtime tests: learnable by a tiny random model in a few steps."""


def letter_a(completions, prompts, **fields):
    """Fraction of the completion's characters that are the letter 'a' (0 for an empty completion).

    >>> letter_a(["aab", ""], ["p", "q"])
    [0.6666666666666666, 0.0]
    """
    return [c.count("a") / len(c) if c else 0.0 for c in completions]
