"""Toy verifiable rewards for the runtime tests: learnable by a tiny random model in a few steps."""


def letter_a(completions, prompts, **fields):
    """Fraction of the completion's characters that are the letter 'a' (0 for an empty completion).

    >>> letter_a(["aab", ""], ["p", "q"])
    [0.6666666666666666, 0.0]
    """
    return [c.count("a") / len(c) if c else 0.0 for c in completions]


# ----------------------------------------------------------------------------------------------
# TRL-style reward functions: the signatures of TRL's documentation ("Using a custom reward
# function" in the GRPOTrainer guide), bodies written here. They are called exactly as TRL calls
# them: with keywords, columns included, and conversational rows get message-list completions.


def trl_accuracy_reward(completions, solution, **kwargs):
    """1.0 if the last \\boxed{} equals the ``solution`` column (plain-text completions).

    >>> trl_accuracy_reward([r"so \\boxed{4}", "no box"], solution=["4", "4"])
    [1.0, 0.0]
    """
    import re

    found = [re.findall(r"\\boxed\{([^{}]*)\}", c) for c in completions]
    return [1.0 if f and f[-1].strip() == str(s).strip() else 0.0 for f, s in zip(found, solution)]


async def trl_async_answer_reward(completions, answer, **fields):
    """An ``async def`` reward reading the ``answer`` column: 1.0 if the answer appears in the text.

    >>> import asyncio
    >>> asyncio.run(trl_async_answer_reward(["it is 12", "it is 3"], answer=["12", "12"]))
    [1.0, 0.0]
    """
    return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]


def trl_unique_chars(completions, **kwargs):
    """TRL's first documentation example: the number of distinct characters of each completion.

    >>> trl_unique_chars(["aab", "abc"])
    [2.0, 3.0]
    """
    return [float(len(set(c))) for c in completions]


def trl_format_reward(completions, **kwargs):
    """Conversational form: ``completions[i][0]["content"]`` holds the text; 1.0 for <think>…</think><answer>…</answer>.

    >>> trl_format_reward([[{"role": "assistant", "content": "<think>x</think><answer>1</answer>"}]])
    [1.0]
    """
    import re

    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    return [1.0 if re.match(pattern, c[0]["content"], re.DOTALL) else 0.0 for c in completions]


def trl_token_count(completion_ids, **kwargs):
    """Reads the token ids TRL passes as ``completion_ids``: their count.

    >>> trl_token_count([[1, 2, 3], []])
    [3.0, 0.0]
    """
    return [float(len(ids)) for ids in completion_ids]


def trl_task_reward(completions, task, **kwargs):
    """Multi-task data: scores only rows of the "count" task, None for others (TRL skips None).

    >>> trl_task_reward(["aaa", "b"], task=["count", "other"])
    [3.0, None]
    """
    return [float(len(c)) if t == "count" else None for c, t in zip(completions, task)]


def trl_prompt_echo(prompts, completions, **kwargs):
    """TRL passes ``prompts`` too: 1.0 when the completion repeats the last word of the prompt's text.

    Conversational rows give message lists for both; plain rows give strings.

    >>> trl_prompt_echo(["say cat"], ["cat"])
    [1.0]
    """
    out = []
    for p, c in zip(prompts, completions):
        prompt_text = p[-1]["content"] if isinstance(p, list) else p
        text = c[0]["content"] if isinstance(c, list) else c
        out.append(1.0 if prompt_text.split()[-1] in text else 0.0)
    return out


def even_length(completions, **kwargs):
    """1.0 for a completion of an even number of characters: a toy outcome near 50 % for a random model.

    >>> even_length(["ab", "abc"])
    [1.0, 0.0]
    """
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]
