"""PMD-mean: L = mean_i ½·τ·(A_i/τ − Δ_i)² / L_i, least-squares policy mirror descent toward π_old.

Paper: Xu, Lu, Yu, Zhao, arXiv 2602.05933 (PMD-mean), from Kimi k1.5 (arXiv 2501.12599) Eq. 3.
Formulas, defaults and decisions: docs/algorithms.md § PMD-mean.
Reference implementation: horizon-rl/OpenKimi @ 3126d4c, ``openkimi/pmd/core_algos.py``
``compute_policy_loss_opmd`` (policy loss "opmd") and ``compute_partition_loo_outcome_advantage``
("ploo"); the leave-one-out baseline is verl's ``compute_rloo_outcome_advantage``.

The ideal PMD step is π_{t+1} ∝ π_t·exp(r/τ); Kimi regresses onto it in log space with the
log-partition τ·log Z replaced by the mean reward. Per response i with Δ_i = Σ_t m_t(ℓ_t − ℓ^old_t)
(sequence k1 log-ratio against π_old, from ``rlkit.kl``) and L_i = max(|y_i|, 1):

  ``seq-mean-token-mean`` (default):   loss = Σ_i ½τ(A_i/τ − Δ_i)²/L_i / S
  ``seq-mean-token-sum-norm``:         loss = Σ_i ½τ(A_i/τ − Δ_i)² / T_max / S

with S = ``num_seqs_global`` (exact under micro-batching / data parallel). Each token of response i
gets gradient −(A_i − τΔ_i)/(S·L_i) on ∇ℓ_t, which sums to −(A_i − τΔ_i)/S per response whatever
its length: Kimi's gradient up to the 1/L normalization. No KL penalty: the proximal pull toward
π_t is the −τΔ part of the regression; ``ppo_kl`` = mean_i(−Δ_i/L_i) is only a monitor.

Advantage A_i (``baseline``):
  * ``mean`` (default, the paper): r_i − r̄_group; a one-sample group keeps A = r (no baseline).
  * ``loo`` (code parity, every released script): r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − r̄).
  * ``partition`` ("PMD-partition", ``ploo``): r_i − b_i, b_i = M + τ·log max((1/(G−1))·
    Σ_{j≠i} e^{(r_j−M)/τ}, 1e−8), M = max of the group; singleton b = 0. Uses the same τ (the
    reference README says to set ``partition_tau`` = ``pmd_tau``; one knob here).

Decisions: T_max = ``max_response_len`` (a constant; the reference uses the padded width);
the prompt filter (``partition_reward_lb/ub``, weight w_i = 0 outside the open interval) is a group
filter that drops those groups, so they also leave the S count (the reference keeps them in the mean
with weight 0). Rollout-IS weights must be applied per sequence *before* reduction (the reference
multiplies after, which breaks for per-token weights); LossInputs carries none yet.

Shapes: B responses, T padded response length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.kl import kl_estimate

from .base import (
    AdvantageInputs,
    Algorithm,
    FilterPolicy,
    LossInputs,
    Metrics,
    Needs,
    register,
)
from .common import broadcast_advantages, check_choice, group_advantages, masked

BASELINES = ("mean", "loo", "partition")
PMD_AGG_MODES = ("seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class PMDMeanConfig:
    """PMD-mean hyperparameters (paper symbols in brackets; OpenKimi script names in quotes)."""

    tau: float = 0.01
    """[τ] mirror-descent temperature, "pmd_tau" (= "partition_tau"), 0.01 in every script."""
    baseline: str = "mean"
    """[r̄] ``mean`` (paper), ``loo`` (released code, RLOO) or ``partition`` (PMD-partition)."""
    loss_agg_mode: str = "seq-mean-token-mean"
    """Per-response normalizer: 1/L_i (default) or 1/T_max (``seq-mean-token-sum-norm``)."""
    reward_lb: float | None = None
    """"partition_reward_lb": drop prompts whose mean reward is ≤ this (None: keep all)."""
    reward_ub: float | None = None
    """"partition_reward_ub": drop prompts whose mean reward is ≥ this (None: keep all)."""

    def __post_init__(self) -> None:
        check_choice("PMD baseline", self.baseline, BASELINES)
        check_choice("PMD loss_agg_mode", self.loss_agg_mode, PMD_AGG_MODES)
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.reward_lb is not None and self.reward_ub is not None and self.reward_lb >= self.reward_ub:
            raise ValueError(f"reward_lb ({self.reward_lb}) must be < reward_ub ({self.reward_ub})")


@torch.no_grad()
def pmd_advantages_B(rewards_B: Tensor, group_ids_B: Tensor, *, baseline: str, tau: float) -> Tensor:
    """Per-response scalar advantage A_i for the three baselines (module docstring). [B] → [B] (fp64 math)."""
    check_choice("PMD baseline", baseline, BASELINES)
    out_dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.float32
    if baseline == "mean":
        return group_advantages(rewards_B, group_ids_B, scale="none", singleton="raw")
    r = rewards_B.detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(r).all():
        raise ValueError("pmd_mean: non-finite reward (reward failures must be handled upstream)")
    adv = torch.empty_like(r)
    for g in torch.unique(group_ids_B.reshape(-1)):
        idx = (group_ids_B.reshape(-1) == g).nonzero().squeeze(-1)
        rg, n = r[idx], idx.numel()
        if n == 1:  # no other sample: RLOO keeps r, ploo uses b = 0
            adv[idx] = rg
            continue
        if baseline == "loo":
            adv[idx] = rg - (rg.sum() - rg) / (n - 1)
        else:
            m = rg.max()
            e = torch.exp((rg - m) / tau)
            others = (e.sum() - e) / (n - 1)
            adv[idx] = rg - (m + tau * torch.log(others.clamp(min=1e-8)))
    return adv.to(out_dtype).reshape(rewards_B.shape)


def pmd_advantages(inp: AdvantageInputs, cfg: PMDMeanConfig) -> tuple[Tensor, Metrics]:
    """A_i broadcast over the response tokens (pre-masked)."""
    adv_B = pmd_advantages_B(inp.rewards_B, inp.group_ids_B, baseline=cfg.baseline, tau=cfg.tau)
    return broadcast_advantages(adv_B, inp.mask_B_T), {"pmd/adv_mean": float(adv_B.mean()),
                                                       "pmd/adv_abs_max": float(adv_B.abs().max())}


def pmd_loss(inp: LossInputs, cfg: PMDMeanConfig) -> tuple[Tensor, Metrics]:
    """Σ_i ½τ(A_i/τ − Δ_i)²/L_i / num_seqs_global (OpenKimi ``compute_policy_loss_opmd``).

    A_i is recovered as the token-mean of the (broadcast) advantages, as the reference does; A and
    ℓ^old are constants, only ℓ carries gradient (docs/algorithms.md § PMD-mean).
    """
    if inp.old_logp_B_T is None:
        raise ValueError("pmd_mean needs old log-probs (Needs.old_logp)")
    keep = inp.mask_B_T.bool()
    # Half precision is summed and squared in fp32: A/τ is ~100 nats with ±1 rewards and τ = 0.01.
    f32 = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    logp, old = f32(inp.logp_B_T), f32(inp.old_logp_B_T.detach())
    length = keep.sum(-1).clamp(min=1).to(logp.dtype)
    adv_i = masked(f32(inp.advantages_B_T.detach()), keep).sum(-1) / length
    # Δ_i: sequence log-ratio against π_old, the sum of per-token k1 (masked, NaN-safe).
    delta_i = kl_estimate(logp, old, "k1", mask=keep).sum(-1)
    sq = 0.5 * cfg.tau * (adv_i / cfg.tau - delta_i) ** 2
    if cfg.loss_agg_mode == "seq-mean-token-mean":
        per_seq = sq / length
    else:
        t_max = inp.max_response_len if inp.max_response_len > 0 else inp.mask_B_T.shape[-1]
        per_seq = sq / float(t_max)
    loss = per_seq.sum() / max(float(inp.num_seqs_global), 1.0)
    with torch.no_grad():
        b = max(delta_i.numel(), 1)
        metrics = {
            "ppo_kl": float((-delta_i / length).sum() / b),
            "pmd/logratio_seq_mean": float(delta_i.sum() / b),
            "pmd/target_seq_mean": float((adv_i / cfg.tau).sum() / b),
        }
    return loss, metrics


def pmd_group_filter(raw_rewards_B: Tensor, group_ids_B: Tensor, cfg: PMDMeanConfig) -> Tensor:
    """keep_B: the prompt's mean reward lies in the open interval (reward_lb, reward_ub).

    OpenKimi ``compute_wpmd_weight`` with ``use_is=False`` (weight 0 outside the interval).
    """
    keep = torch.ones(raw_rewards_B.shape, dtype=torch.bool, device=raw_rewards_B.device)
    if cfg.reward_lb is None and cfg.reward_ub is None:
        return keep
    r = raw_rewards_B.to(torch.float64)
    for g in torch.unique(group_ids_B):
        sel = group_ids_B == g
        mean = float(r[sel].mean())
        lo = -math.inf if cfg.reward_lb is None else cfg.reward_lb
        hi = math.inf if cfg.reward_ub is None else cfg.reward_ub
        keep[sel] = lo < mean < hi
    return keep


def pmd_needs(cfg: PMDMeanConfig) -> Needs:
    """π_old log-probs only: no reference, no teacher, no critic."""
    return Needs(old_logp=True)


PMD_MEAN = register(Algorithm(
    name="pmd_mean", config_cls=PMDMeanConfig, needs=pmd_needs, loss=pmd_loss,
    advantages=pmd_advantages, group_filter=pmd_group_filter, advantage_reads=frozenset(),
    # One generation batch per step: filtered prompts leave the batch, none are redrawn.
    filter_policy=lambda cfg: FilterPolicy(max_rounds=1, on_short="train"),
    linear_in_advantage=False,  # the squared loss: per-token IS scaling of A would be wrong
))
