"""Reward configuration: which reward functions, their weights, and how the worker runs them.

Plain dataclasses (stdlib only) so ``rlkit.config`` can validate the ``rewards:`` section of a
YAML file without importing Ray. A YAML example::

    rewards:
      rewards:
        - {name: math, weight: 1.0, kwargs: {fallback: last_number}}
        - {name: configs/my_reward.py:brevity, weight: 0.1}
      timeout_s: 10
      on_error: zero
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

OnError = Literal["zero", "drop_group", "stop"]
ON_ERROR_CHOICES = ("zero", "drop_group", "stop")


@dataclass
class RewardSpec:
    """One reward component: ``score += weight * fn(completions, prompts, **fields, **kwargs)``."""

    name: str
    """Built-in name (see ``rlkit.rewards.BUILTINS``), ``package.module:function`` or ``path/file.py:function``."""
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the function (e.g. ``{fallback: last_number}`` for ``math``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"reward name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"reward {self.name!r}: kwargs must be a mapping, got {type(self.kwargs).__name__}")
        self.weight = float(self.weight)
        where, sep, fn = self.name.rpartition(":")
        if sep and where.endswith(".py") and not os.path.isabs(where):
            # resolve against the launching directory now: Ray actors may run elsewhere
            self.name = f"{os.path.abspath(where)}:{fn}"


@dataclass
class RewardConfig:
    """Reward functions and the limits of the worker that runs them (``rlkit.workers.reward``)."""

    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("math")])
    timeout_s: float = 10.0
    """Wall-clock limit of one call into a child process (up to ``batch_size`` samples); past it the
    child is killed and the call's samples are retried one at a time, each with this limit. Keep
    ``batch_size`` × the per-sample cost well below it, or every batch pays a retry."""
    memory_mb: int = 1024
    """Address space a child may add on top of its imported modules (RLIMIT_AS)."""
    num_procs: int = 1
    """Child processes, i.e. reward calls running at once."""
    on_error: OnError = "zero"
    """Non-ok samples: ``zero`` (score 0, counted), ``drop_group`` (mask the prompt's group), ``stop`` (raise)."""
    batch_size: int = 64
    """Samples per call into a child; a failed batch is retried one sample at a time."""
    hist_bins: int = 10
    hist_range: tuple[float, float] = (0.0, 1.0)
    """Each component's score histogram: ``hist_bins`` equal bins over this range, plus below/above."""
    outcome: Optional[str] = None
    """The component that is the task's verified outcome: what dynamic sampling (DAPO) filters on,
    what ``reward/accuracy`` and the evaluation count as correct. None: the built-in ``math``
    verifier when it is listed, else the weighted total score (no accuracy metric then)."""
    max_consecutive_timeouts: int = 8
    """After this many timeouts in a row on single samples of one reward, its remaining samples in
    the call are marked ``timeout`` without running (a reward that always hangs must not stall a
    step for num_samples × timeout_s)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, (list, tuple)) or not self.rewards:
            raise ValueError("rewards: give at least one reward spec")
        self.rewards = [_as_spec(r) for r in self.rewards]
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {self.on_error!r}")
        for name, lo in (("timeout_s", 0.0), ("memory_mb", 0), ("num_procs", 0), ("batch_size", 0), ("hist_bins", 0)):
            if not getattr(self, name) > lo:
                raise ValueError(f"{name} must be > {lo}, got {getattr(self, name)!r}")
        self.hist_range = tuple(float(x) for x in self.hist_range)  # type: ignore[assignment]
        if len(self.hist_range) != 2 or not self.hist_range[0] < self.hist_range[1]:
            raise ValueError(f"hist_range must be (low, high) with low < high, got {self.hist_range!r}")
        for spec in self.rewards:
            if spec.name == "math":
                _check_math_kwargs(spec.kwargs)
        names = self.component_names()
        if self.outcome is not None and self.outcome not in names:
            raise ValueError(f"outcome {self.outcome!r} is not one of the reward components {names}")

    def component_names(self) -> list[str]:
        """Metric/column name per reward: the built-in name or the function name, de-duplicated
        with ``_2``, ``_3``."""
        from .registry import BUILTINS

        names: list[str] = []
        seen: dict[str, int] = {}
        for s in self.rewards:
            base = s.name if s.name in BUILTINS else s.name.rpartition(":")[2]
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        return names

    def answer_fallback(self) -> str:
        """The final-answer fallback of the built-in ``math`` verifier (``none`` when it is not listed):
        what the hack monitors and the strict score extract answers with."""
        spec = next((s for s in self.rewards if s.name == "math"), None)
        return "none" if spec is None else str(spec.kwargs.get("fallback", "none"))

    def outcome_name(self) -> Optional[str]:
        """The outcome component (see ``outcome``), or None for the weighted total."""
        if self.outcome is not None:
            return self.outcome
        return "math" if "math" in self.component_names() else None


_MATH_CHOICES = {"fallback": ("none", "last_number"), "answer_form": ("value", "expression")}


def _check_math_kwargs(kwargs: dict[str, Any]) -> None:
    for key, choices in _MATH_CHOICES.items():
        if key in kwargs and kwargs[key] not in choices:
            raise ValueError(f"reward 'math': kwargs.{key} must be one of {list(choices)}, got {kwargs[key]!r}")


def _as_spec(r: Any) -> RewardSpec:
    if isinstance(r, RewardSpec):
        return r
    if isinstance(r, str):
        return RewardSpec(r)
    if isinstance(r, dict):
        unknown = sorted(set(r) - {"name", "weight", "kwargs"})
        if unknown:
            raise ValueError(f"reward spec {r!r}: unknown key(s) {unknown}; valid: ['kwargs', 'name', 'weight']")
        return RewardSpec(**r)
    raise ValueError(f"reward spec must be a mapping with 'name', got {r!r}")
