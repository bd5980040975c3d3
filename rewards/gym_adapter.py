"""Adapter from reasoning-gym tasks to the reward signature: each task scores with its own ``score_answer``.

Two ways to name the entry a completion answers, both as dataset fields:

* the entry itself: ``question``, ``answer``, ``metadata`` (with ``source_dataset``), as a
  reasoning-gym dataset yields it; the task's scorer comes from ``reasoning_gym.get_score_answer_fn``;
* its recipe, as ``rlkit.data`` stores reasoning-gym rows: ``rg_task``, ``rg_config`` (the dataset
  config, seed and size included) and ``rg_index``; the dataset is rebuilt (entries are a pure
  function of the recipe) and its own ``score_answer`` is used with the exact entry.

The answer is the last ``<answer>…</answer>`` block (reasoning-gym's own convention) or the last
``\\boxed{…}`` (rlkit's prompts ask for one); ``answer_format`` picks, ``auto`` tries both.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Callable, Literal, Optional, Sequence

from .extract import last_boxed


@lru_cache(maxsize=256)
def _scorer(source_dataset: str) -> Callable[[Optional[str], dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(source_dataset)


@lru_cache(maxsize=32)
def _dataset(task: str, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(task, **json.loads(config_json))


def _extract(completion: str, answer_format: str, tag: str) -> Optional[str]:
    from reasoning_gym.utils import extract_answer

    if answer_format in ("tag", "auto"):
        found = extract_answer(completion, tag_name=tag)
        if found is not None or answer_format == "tag":
            return found
    if answer_format in ("boxed", "auto"):
        return last_boxed(completion)
    raise ValueError(f"reasoning_gym: answer_format must be 'auto', 'tag' or 'boxed', got {answer_format!r}")


def _score_one(answer: Optional[str], i: int, cols: dict[str, Optional[Sequence[Any]]]) -> float:
    rg_task, rg_config, rg_index = cols["rg_task"], cols["rg_config"], cols["rg_index"]
    if rg_task is not None and rg_task[i] is not None:
        ds = _dataset(rg_task[i], json.dumps(rg_config[i], sort_keys=True))
        entry = ds[int(rg_index[i])]
        question = cols["question"]
        if question is not None and question[i] is not None and entry["question"] != question[i]:
            raise ValueError(f"reasoning_gym: {rg_task[i]} entry {rg_index[i]} does not match the row's question")
        return float(ds.score_answer(answer, entry))
    md = cols["metadata"][i] if cols["metadata"] is not None else None
    if not isinstance(md, dict) or "source_dataset" not in md:
        raise KeyError("reasoning_gym: needs fields rg_task/rg_config/rg_index, or 'metadata' with 'source_dataset'")
    entry = {
        "question": cols["question"][i] if cols["question"] is not None else "",
        "answer": cols["answer"][i] if cols["answer"] is not None else None,
        "metadata": md,
    }
    return float(_scorer(md["source_dataset"])(answer, entry))


def reasoning_gym_score(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    metadata: Optional[Sequence[dict]] = None,
    answer: Optional[Sequence[Any]] = None,
    question: Optional[Sequence[str]] = None,
    rg_task: Optional[Sequence[str]] = None,
    rg_config: Optional[Sequence[dict]] = None,
    rg_index: Optional[Sequence[int]] = None,
    answer_format: Literal["auto", "tag", "boxed"] = "auto",
    tag: str = "answer",
    **unused_fields: Any,
) -> list[float]:
    """Score = the entry's task ``score_answer(extracted answer, entry)`` (a missing answer scores as None)."""
    cols = {"metadata": metadata, "answer": answer, "question": question,
            "rg_task": rg_task, "rg_config": rg_config, "rg_index": rg_index}
    return [_score_one(_extract(c, answer_format, tag), i, cols) for i, c in enumerate(completions)]


def _warmup() -> None:
    import reasoning_gym  # noqa: F401  (2-3 s import: pay it before the first deadline)
    from reasoning_gym.utils import extract_answer  # noqa: F401


reasoning_gym_score.warmup = _warmup  # type: ignore[attr-defined]
