"""The generation-engine contract shared by the vLLM engine and rlkit's own HF engine.

A rollout worker owns one engine. Engines take token ids in and give token ids out, together with
the sampler's per-token log-probs of the sampled tokens under the *processed* distribution (after
temperature and top-p/top-k), so the learner can recompute log-probs over the same support: the
learner and the rollout read one :class:`rlkit.types.SamplingConfig` (``RolloutConfig.sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol

from torch import Tensor

from rlkit.types import SamplingConfig

__all__ = ["Engine", "Generation", "SamplingConfig"]


@dataclass
class Generation:
    """One sampled completion."""

    prompt_ids: list[int]
    completion_ids: list[int]
    """Sampled tokens, EOS included when the completion stopped on it."""
    logprobs: list[float]
    """log π_sampler(y_t | s_t) for each completion token, temperature/top-p/top-k applied."""
    finish_reason: Literal["stop", "length"]


class Engine(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int
    ) -> list[Generation]:
        """``n`` samples per prompt, prompt-major order (len == len(prompt_ids) * n)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights in place (HF parameter names)."""

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """One greedy (argmax) completion per prompt (evaluation)."""

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              sampling: SamplingConfig) -> list[list[float]]:
        """Teacher-forced log-probs of the given completions under the engine's current weights."""

    def tensor_checksum(self, names: list[str]) -> dict[str, float]:
        """float64 sum of each named weight as the engine holds it (HF names), to prove a sync."""

    def close(self) -> None: ...
