"""Length rewards: a linear length score and DAPO's soft overlong punishment.

Lengths are token counts from the dataset field ``completion_len`` (the trainer fills it from the
rollout), or characters when ``unit="chars"``. A missing length field raises: a length reward that
quietly measured characters instead of tokens would shape the wrong thing.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence


def _lengths(completions: Sequence[str], completion_len: Optional[Sequence[Any]], unit: str, who: str) -> list[int]:
    if unit == "chars":
        return [len(c) for c in completions]
    if unit != "tokens":
        raise ValueError(f"{who}: unit must be 'tokens' or 'chars', got {unit!r}")
    if completion_len is None:
        raise KeyError(f"{who}: needs the field 'completion_len' (token count per completion) or unit='chars'")
    if len(completion_len) != len(completions):
        raise ValueError(f"{who}: {len(completions)} completions but {len(completion_len)} lengths")
    return [int(n) for n in completion_len]


def length(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    max_len: int,
    completion_len: Optional[Sequence[int]] = None,
    unit: Literal["tokens", "chars"] = "tokens",
    **unused_fields: Any,
) -> list[float]:
    """r = min(L, max_len) / max_len ∈ [0, 1]; give it a negative weight to penalise length.

    >>> length(["a", "bb", "cccc"], max_len=2, unit="chars")
    [0.5, 1.0, 1.0]
    """
    if max_len <= 0:
        raise ValueError(f"length: max_len must be > 0, got {max_len}")
    return [min(n, max_len) / max_len for n in _lengths(completions, completion_len, unit, "length")]


def overlong(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    max_len: int,
    cache_len: int,
    penalty_factor: float = 1.0,
    completion_len: Optional[Sequence[int]] = None,
    unit: Literal["tokens", "chars"] = "tokens",
    **unused_fields: Any,
) -> list[float]:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), added to the task reward.

    R(L) = 0 if L ≤ L_max − L_cache; (L_max − L_cache − L) / L_cache inside the buffer; −1 beyond
    L_max; times ``penalty_factor``. The formula lives once, in
    ``rlkit.algorithms.dapo.overlong_penalty``; this is its reward-function adapter.
    """
    try:
        from rlkit.algorithms.dapo import overlong_penalty
    except ImportError as e:  # the algorithm module is the single source of the formula
        raise ImportError(f"overlong reward needs rlkit.algorithms.dapo.overlong_penalty: {e}") from e
    import torch

    lengths_B = torch.tensor(_lengths(completions, completion_len, unit, "overlong"), dtype=torch.float32)
    out = overlong_penalty(lengths_B, max_len, cache_len, penalty_factor)
    return [float(x) for x in (out.tolist() if hasattr(out, "tolist") else out)]


def _overlong_warmup() -> None:
    import torch  # noqa: F401  (import before the child's memory limit is set)

    from rlkit.algorithms import dapo  # noqa: F401


overlong.warmup = _overlong_warmup  # type: ignore[attr-defined]
