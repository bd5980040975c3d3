"""Format rewards: 1.0 when the completion has the requested structure, else 0.0.

Like TRL's ``think_format_reward`` (a ``<think>`` block then the answer), generalised to any
ordered list of tags, plus a check for a ``\\boxed{…}`` final answer.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Optional, Sequence

from .extract import last_boxed


@lru_cache(maxsize=64)
def _tags_regex(tags: tuple[str, ...], strict: bool) -> re.Pattern:
    blocks = [rf"<{re.escape(t)}>(?P<b{i}>.*?)</{re.escape(t)}>" for i, t in enumerate(tags)]
    if strict:
        # the whole completion is exactly the blocks, whitespace between them allowed
        return re.compile(r"\A\s*" + r"\s*".join(blocks) + r"\s*\Z", re.DOTALL)
    return re.compile(r".*?".join(blocks), re.DOTALL)


def format_tags(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    tags: Sequence[str] = ("think", "answer"),
    strict: bool = False,
    **unused_fields: Any,
) -> list[float]:
    """1.0 if each ``<tag>…</tag>`` appears exactly once, non-empty, in the given order.

    ``strict=True`` also requires that nothing but whitespace lies outside the blocks.

    >>> format_tags(["<think>2+2</think> <answer>4</answer>", "<answer>4</answer>"])
    [1.0, 0.0]
    >>> format_tags(["x <think>a</think><answer>b</answer>"], strict=True)
    [0.0]
    """
    tags_t = tuple(tags)
    if not tags_t:
        raise ValueError("format_tags: 'tags' must name at least one tag")
    pattern = _tags_regex(tags_t, bool(strict))
    out = []
    for text in completions:
        m = pattern.search(text)
        ok = m is not None and all(m.group(f"b{i}").strip() for i in range(len(tags_t)))
        # each tag exactly once: a second <answer> block is a format violation, not a bonus
        ok = ok and all(text.count(f"<{t}>") == 1 and text.count(f"</{t}>") == 1 for t in tags_t)
        out.append(1.0 if ok else 0.0)
    return out


def format_boxed(
    completions: Sequence[str], prompts: Optional[Sequence[str]] = None, **unused_fields: Any
) -> list[float]:
    """1.0 if the completion has a complete, non-empty ``\\boxed{…}``.

    >>> format_boxed([r"so \\boxed{3}", r"\\boxed{}", r"\\boxed{3"])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if (last_boxed(t) or "").strip() else 0.0 for t in completions]
