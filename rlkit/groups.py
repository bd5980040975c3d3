"""Scored prompt groups: what the driver holds between scoring and collating a batch.

A group is the G completions of one prompt with their rewards. The functions here are pure: they
build groups from a reward batch, apply the reward worker's ``drop_group`` mask and an algorithm's
group filter (DAPO's dynamic sampling) on the verified outcome, decide how many generation batches a
filter may draw (:class:`rlkit.algorithms.base.FilterPolicy`), and turn groups into preference
pairs (on-policy ranking, or pairs read from a dataset). See docs/algorithms.md § DAPO for the
filter and docs/rewards.md for the outcome component (``rewards.outcome``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from rlkit.types import Rollout


@dataclass
class ScoredGroup:
    """The completions of one prompt and their scores (all lists in rollout order)."""

    rollouts: list[Rollout]
    rewards: list[float]
    """Total reward per completion (the weighted sum of the reward components)."""
    outcome: list[float]
    """The verified outcome per completion (``rewards.outcome``; the total when none is named)."""
    status: list[str]
    """The reward worker's status per completion (``ok``, ``invalid``, ``error``, ``timeout``)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) for the trainer state of a checkpoint."""
        return {"rollouts": [asdict(r) for r in self.rollouts], "rewards": list(self.rewards),
                "outcome": list(self.outcome), "status": list(self.status)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoredGroup":
        return cls([Rollout(**r) for r in d["rollouts"]], [float(x) for x in d["rewards"]],
                   [float(x) for x in d["outcome"]], [str(s) for s in d["status"]])


def build_groups(rollouts: Sequence[Rollout], scores: Sequence[float], outcome: Sequence[Optional[float]],
                 status: Sequence[str], keep: Sequence[bool], group_size: int) -> list[ScoredGroup]:
    """Cut a step's scored rollouts (prompt-major, ``group_size`` per prompt) into groups; a group
    with any sample the reward worker marked not-keep (its ``drop_group`` policy) is left out.
    A missing outcome (the component gave no score) counts as 0."""
    if len(rollouts) % group_size:
        raise ValueError(f"{len(rollouts)} rollouts do not split into groups of {group_size}")
    groups = []
    for start in range(0, len(rollouts), group_size):
        idx = range(start, start + group_size)
        if keep and not all(keep[i] for i in idx):
            continue
        groups.append(ScoredGroup(
            rollouts=[rollouts[i] for i in idx], rewards=[float(scores[i]) for i in idx],
            outcome=[float(outcome[i] or 0.0) for i in idx], status=[status[i] for i in idx]))
    return groups


def outcome_values(components: dict[str, list[Optional[float]]], scores: Sequence[float],
                   outcome_name: Optional[str]) -> list[Optional[float]]:
    """The verified outcome per sample: the named component, or the total score when None."""
    if outcome_name is None:
        return [float(s) for s in scores]
    return list(components[outcome_name])


def apply_filter(groups: list[ScoredGroup], group_filter: Optional[Callable], algo_cfg: Any) -> list[ScoredGroup]:
    """The groups an algorithm's filter keeps, judged on the raw verified outcome (not the shaped
    reward: spread that comes only from length shaping must not count)."""
    if group_filter is None or not groups:
        return groups
    outcome_B = torch.tensor([x for g in groups for x in g.outcome])
    ids_B = torch.tensor([i for i, g in enumerate(groups) for _ in g.outcome])
    keep_B = group_filter(outcome_B, ids_B, algo_cfg)
    starts = np.cumsum([0] + [len(g.outcome) for g in groups[:-1]])
    return [g for g, s in zip(groups, starts) if bool(keep_B[int(s)])]


def renumber(groups: list[ScoredGroup]) -> list[ScoredGroup]:
    """Group ids 0..k-1 in list order, so ids stay unique within a step's batch."""
    for g, grp in enumerate(groups):
        for r in grp.rollouts:
            r.group_id = g
    return groups


def more_rounds(kept: int, want: int, rounds: int, max_rounds: int) -> bool:
    """Whether to draw another generation batch: fewer than ``want`` groups kept and rounds left
    (``max_rounds`` 0 = unlimited)."""
    return kept < want and (max_rounds == 0 or rounds < max_rounds)


def check_short(kept: int, want: int, rounds: int, on_short: str, step: int) -> dict[str, float]:
    """After the last round: ``filter/short_groups`` (0 when full); raises under ``on_short="raise"``
    when fewer than ``want`` groups were kept."""
    short = max(0, want - kept)
    if short and on_short == "raise":
        raise RuntimeError(
            f"step {step}: the group filter kept {kept}/{want} prompt groups after {rounds} generation "
            f"batches, the algorithm's limit (DAPO: max_num_gen_batches={rounds}); the data may be too easy "
            f"or too hard for the policy, or allow more batches")
    return {"filter/short_groups": float(short), "filter/rounds": float(rounds)}


def untied(groups: list[ScoredGroup]) -> list[ScoredGroup]:
    """The groups whose rewards are not all equal: those that can give an on-policy preference pair."""
    return [g for g in groups if max(g.rewards) > min(g.rewards)]


def rank_pairs(groups: list[ScoredGroup]) -> list[ScoredGroup]:
    """On-policy preference pairs: in each group its best- and worst-scored completions, chosen
    first (ties skipped: a group whose rewards are all equal gives no pair)."""
    pairs = []
    for grp in groups:
        r = grp.rewards
        best, worst = max(range(len(r)), key=r.__getitem__), min(range(len(r)), key=r.__getitem__)
        if r[best] > r[worst]:
            pairs.append(ScoredGroup([grp.rollouts[best], grp.rollouts[worst]], [r[best], r[worst]],
                                     [grp.outcome[best], grp.outcome[worst]], [grp.status[best], grp.status[worst]]))
    return pairs


def file_pairs(rows: Sequence[Any], encode: Callable[[str], list[int]], eos_id: int) -> list[ScoredGroup]:
    """A step's preference pairs read from a dataset (rows with ``prompt_text``, ``chosen_text``,
    ``rejected_text``), as (chosen, rejected) rollouts with rewards 1 and 0."""
    groups = []
    for g, row in enumerate(rows):
        prompt = encode(row.prompt_text)
        pair = []
        for text in (row.chosen_text, row.rejected_text):
            ids = encode(text) + [eos_id]
            pair.append(Rollout(prompt, ids, [0.0] * len(ids), "stop", -1, g, row.index))
        groups.append(ScoredGroup(pair, [1.0, 0.0], [1.0, 0.0], ["ok", "ok"]))
    return groups


def flatten(groups: list[ScoredGroup]) -> tuple[list[Rollout], list[float]]:
    """The rollouts and total rewards of ``groups``, in order."""
    return [r for g in groups for r in g.rollouts], [x for g in groups for x in g.rewards]


def reward_metrics(scores: Sequence[float], outcome: Sequence[Optional[float]], worker_metrics: dict[str, float],
                   has_outcome: bool) -> dict[str, float]:
    """A step's reward metrics over every scored sample (before any filter): mean and std of the
    total reward, the worker's own metrics, and ``reward/accuracy`` (the fraction whose verified
    outcome is exactly 1) when an outcome component is named."""
    raw = torch.tensor([float(s) for s in scores])
    out = {"reward/mean": float(raw.mean()), "reward/std": float(raw.std()) if raw.numel() > 1 else 0.0,
           **{f"reward/{k}": float(v) for k, v in worker_metrics.items()}}
    if has_outcome:
        out["reward/accuracy"] = sum(1.0 for v in outcome if v == 1.0) / max(1, len(outcome))
    return out


MAX_ROUNDS_PER_STEP = 4096
MAX_WORKERS = 4096


def generation_seed(seed: int, step: int, round_: int, worker: int) -> int:
    """The sampling seed of one worker's share of one generation batch; two batches of a run never
    share one.

    The first 16 rounds of a step on the first 101 workers keep rlkit's historical seeds,
    ``seed·1000003 + (16·step + round)·101 + worker`` (≥ the run's base ``seed·1000003``; injective
    there because round·101 + worker < 1616). Any other (step, round, worker) takes the injective
    index ``(4096·step + round)·4096 + worker`` counted downwards from just below the base, so the
    two ranges cannot meet. Rounds and workers are bounded by 4096."""
    if not (0 <= round_ < MAX_ROUNDS_PER_STEP and 0 <= worker < MAX_WORKERS and step >= 0):
        raise ValueError(f"generation_seed: step {step}, round {round_}, worker {worker} out of range "
                         f"(rounds and workers < {MAX_ROUNDS_PER_STEP})")
    base = seed * 1_000_003
    if round_ < 16 and worker < 101:
        return base + (step * 16 + round_) * 101 + worker
    return base - 1 - ((step * MAX_ROUNDS_PER_STEP + round_) * MAX_WORKERS + worker)
