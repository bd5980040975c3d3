"""Typed containers for data that crosses a stage boundary (rollout → score → learn).

Shapes: B sequences in a step, T the padded response length, L the padded prompt+response length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How the rollout samples, and hence over which distribution the learner scores its tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k truncation."""
    max_new_tokens: int = 48

    @property
    def truncates(self) -> bool:
        """Top-k or top-p cut the support: log-probs are renormalized over what is left."""
        return bool(self.top_k) or self.top_p < 1.0


@dataclass
class Rollout:
    """One sampled completion and where it came from."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logp: list[float]
    """log π_sampler of each completion token (temperature/top-p/top-k applied)."""
    finish_reason: str
    policy_version: int
    """Learner version whose weights produced this sample: the oldest of ``token_versions`` (a
    partial rollout's tokens may come from several versions; docs/async.md)."""
    group_id: int
    """Index of the prompt within the step; the G samples of one prompt share it."""
    prompt_index: int
    """Row index of the prompt in the dataset."""
    token_versions: Optional[list[int]] = None
    """The policy version that produced each completion token (non-decreasing); None: every
    token's is ``policy_version``."""

    def versions(self) -> list[int]:
        """Each completion token's policy version."""
        if self.token_versions is None:
            return [self.policy_version] * len(self.completion_ids)
        return list(self.token_versions)


@dataclass
class ScoredRollouts:
    """A step's rollouts with their rewards (list order = rollout order)."""

    rollouts: list[Rollout]
    rewards: list[float]
    components: dict[str, list[Optional[float]]]
    status: list[str]
    reward_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainBatch:
    """Right-padded token tensors for the learner.

    Response token t of row b sits at ``input_ids_B_L[b, prompt_len_B[b] + t]``; the logit that
    scores it is at position ``prompt_len_B[b] + t - 1`` (causal shift).
    """

    input_ids_B_L: Tensor
    attention_mask_B_L: Tensor
    prompt_len_B: Tensor
    response_mask_B_T: Tensor
    sampler_logp_B_T: Tensor
    rewards_B: Tensor
    group_ids_B: Tensor
    truncated_B: Tensor
    staleness_B: Tensor
    """Learner version at training time minus the sample's policy version (its oldest token's)."""
    advantages_B_T: Optional[Tensor] = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Per-token side inputs computed by learner passes: old/ref/teacher log-probs."""
    token_staleness_B_T: Optional[Tensor] = None
    """Learner version at training time minus the version that produced each response token (0
    off the mask); differs from ``staleness_B`` only within partial rollouts."""

    @property
    def size(self) -> int:
        return int(self.input_ids_B_L.shape[0])

    def select(self, idx: Tensor | list[int]) -> "TrainBatch":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: t.index_select(0, idx)  # noqa: E731
        return TrainBatch(
            input_ids_B_L=pick(self.input_ids_B_L),
            attention_mask_B_L=pick(self.attention_mask_B_L),
            prompt_len_B=pick(self.prompt_len_B),
            response_mask_B_T=pick(self.response_mask_B_T),
            sampler_logp_B_T=pick(self.sampler_logp_B_T),
            rewards_B=pick(self.rewards_B),
            group_ids_B=pick(self.group_ids_B),
            truncated_B=pick(self.truncated_B),
            staleness_B=pick(self.staleness_B),
            advantages_B_T=None if self.advantages_B_T is None else pick(self.advantages_B_T),
            extras={k: pick(v) for k, v in self.extras.items()},
            token_staleness_B_T=None if self.token_staleness_B_T is None else pick(self.token_staleness_B_T),
        )


def collate(rollouts: list[Rollout], rewards: list[float], pad_id: int, version: int) -> TrainBatch:
    """Pack rollouts into right-padded tensors (prompt then completion on one row)."""
    B = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    T = max(max(len(r.completion_ids) for r in rollouts), 1)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    slogp = torch.zeros((B, T), dtype=torch.float32)
    tstale = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rollouts):
        seq = r.prompt_ids + r.completion_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        n = len(r.completion_ids)
        rmask[b, :n] = 1.0
        slogp[b, :n] = torch.tensor(r.sampler_logp, dtype=torch.float32)
        tstale[b, :n] = version - torch.tensor(r.versions(), dtype=torch.long)
    return TrainBatch(
        input_ids_B_L=ids,
        attention_mask_B_L=attn,
        prompt_len_B=torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long),
        response_mask_B_T=rmask,
        sampler_logp_B_T=slogp,
        rewards_B=torch.tensor(rewards, dtype=torch.float32),
        group_ids_B=torch.tensor([r.group_id for r in rollouts], dtype=torch.long),
        truncated_B=torch.tensor([r.finish_reason == "length" for r in rollouts]),
        staleness_B=torch.tensor([version - r.policy_version for r in rollouts], dtype=torch.long),
        token_staleness_B_T=tstale,
    )
