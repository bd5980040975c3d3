"""Adapter from reasoning-gym tasks to the reward signature: each task scores with its own ``score_answer``.

reasoning-gym entries carry ``question``, ``answer`` and ``metadata["source_dataset"]``; put them in
the dataset fields and the adapter finds the task's scorer (``reasoning_gym.get_score_answer_fn``),
extracts the ``<answer>…</answer>`` block as reasoning-gym's own evaluation does, and scores.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Optional, Sequence


@lru_cache(maxsize=256)
def _scorer(source_dataset: str) -> Callable[[Optional[str], dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(source_dataset)


def reasoning_gym_score(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    metadata: Sequence[dict],
    answer: Optional[Sequence[Any]] = None,
    question: Optional[Sequence[str]] = None,
    tag: str = "answer",
    **unused_fields: Any,
) -> list[float]:
    """Score = ``score_answer(extract_answer(completion, tag), entry)`` of the entry's reasoning-gym task.

    Needs the field ``metadata`` (with ``source_dataset``); ``answer`` and ``question`` are passed on
    in the entry because most scorers read ``entry["answer"]``.
    """
    from reasoning_gym.utils import extract_answer

    n = len(completions)
    out = []
    for i in range(n):
        md = metadata[i]
        if not isinstance(md, dict) or "source_dataset" not in md:
            raise KeyError("reasoning_gym: field 'metadata' must be a dict with 'source_dataset'")
        entry = {
            "question": question[i] if question is not None else "",
            "answer": answer[i] if answer is not None else None,
            "metadata": md,
        }
        score = _scorer(md["source_dataset"])(extract_answer(completions[i], tag_name=tag), entry)
        out.append(float(score))
    return out


def _warmup() -> None:
    import reasoning_gym  # noqa: F401  (2-3 s import: pay it before the first deadline)
    from reasoning_gym.utils import extract_answer  # noqa: F401


reasoning_gym_score.warmup = _warmup  # type: ignore[attr-defined]
