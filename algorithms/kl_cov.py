"""KL-Cov: L_i = −A_i·s_i + β·|ℓ_i − ℓ^old_i|·[i ∈ top-k Cov]; Clip-Cov: detach random mid-Cov tokens.

Paper: Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617), §4: the entropy change is driven by Cov(log π, A) per token; KL-Cov applies a
KL-style penalty β·|log π_θ − log π_old| to the top-k·N tokens by covariance, Clip-Cov removes the
gradient of a random r·N subset of tokens whose covariance lies in (ω_low, ω_high).
Formulas, defaults and decisions: docs/algorithms.md § KL-Cov and Clip-Cov.

Covariance (per valid token of the micro-batch, flattened): Cov_i = (A_i − mean A)(SG ℓ_i − mean SG ℓ),
means over the micro-batch's valid tokens; the selection is therefore per micro-batch by design
(the paper's and verl's behaviour), and it is not differentiable.

Reference implementation: verl ``core_algos.compute_policy_loss_kl_cov`` / ``compute_policy_loss_clip_cov``
(registered "kl_cov" / "clip_cov", ≥ 0.4.1), ported from PRIME-RL/Entropy-Mechanism-of-RL @ 8850579.

Decisions:
  * ``ppo_kl_coef`` (β) = 1.0: the paper's value and verl's function fallback; verl's *config*
    default is 0.1. The ratio ``kl_cov_ratio`` is a *fraction* (verl): the original repository's
    ``k_percent`` is a percentage, so ``kl_cov_ratio = k_percent / 100``. Default 0.002 (the
    paper's Qwen2.5-7B setting; 0.0002 for 32B).
  * No ratio clipping and no λ clamp in KL-Cov (as in verl); ``log_ratio_clamp`` can switch one on.
  * The penalty |λ| goes through ``rlkit.kl`` (``abs``). Its gradient is sign(λ)·∇ℓ, zero when
    ℓ^old is exactly SG(ℓ) (first mini-batch of an on-policy pass).
  * Clip-Cov uses the global torch RNG (``torch.randperm``), like verl; the trainer seeds it and
    checkpoints it. Zeroed tokens keep counting in the token-mean denominator (verl).
  * A ratio of 0 disables the selection in both methods; verl skips KL-Cov at 0 but still
    detaches one token in Clip-Cov (its max(1, ·) applies before the check).
  * Clip-Cov defaults follow the released scripts: ε_low = ε_high = 1 (ordinary clip range [0, 2]),
    ratio 2e-4, bounds (1, 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.kl import kl_estimate

from .base import AdvantageInputs, Algorithm, LossInputs, Metrics, Needs, register
from .common import (
    AGG_MODES,
    agg_loss,
    broadcast_advantages,
    check_choice,
    finish_loss,
    global_counts,
    group_advantages,
    masked,
    masked_mean,
    to_floats,
)


@dataclass
class KLCovConfig:
    """KL-Cov hyperparameters; paper symbols in brackets (arXiv 2505.22617 §4.2)."""

    kl_cov_ratio: float = 0.002
    """[k] fraction of valid tokens penalized (verl ``kl_cov_ratio``; original ``k_percent``/100)."""
    ppo_kl_coef: float = 1.0
    """[β] penalty coefficient (paper and verl function: 1.0; verl config default 0.1)."""
    log_ratio_clamp: float | None = None
    """Optional clamp on λ before exp; None = verl (no clamp)."""
    loss_agg_mode: str = "token-mean"
    """agg(·) of docs/algorithms.md § Loss aggregation (scripts: token-mean)."""
    adv_eps: float = 1e-6
    """ε in the GRPO group advantage the scripts use (``adv_estimator=grpo``)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (scripts: 0)."""

    def __post_init__(self) -> None:
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        if not 0.0 <= self.kl_cov_ratio <= 1.0:
            raise ValueError(f"kl_cov_ratio is a fraction in [0, 1] (got {self.kl_cov_ratio})")


@dataclass
class ClipCovConfig:
    """Clip-Cov hyperparameters; paper symbols in brackets (arXiv 2505.22617 §4.2)."""

    clip_cov_ratio: float = 0.0002
    """[r] fraction of valid tokens whose gradient is removed (verl ``clip_cov_ratio``)."""
    clip_cov_lb: float = 1.0
    """[ω_low] lower covariance bound (exclusive)."""
    clip_cov_ub: float = 5.0
    """[ω_high] upper covariance bound (exclusive)."""
    clip_low: float = 1.0
    """[ε_low] ordinary PPO lower clip (scripts: 1, i.e. no lower clip)."""
    clip_high: float = 1.0
    """[ε_high] ordinary PPO upper clip (scripts: 1, ratio ≤ 2)."""
    log_ratio_clamp: float | None = None
    """Optional clamp on λ before exp; None = verl (no clamp)."""
    loss_agg_mode: str = "token-mean"
    """agg(·) of docs/algorithms.md § Loss aggregation (scripts: token-mean)."""
    adv_eps: float = 1e-6
    """ε in the GRPO group advantage the scripts use."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (scripts: 0)."""

    def __post_init__(self) -> None:
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        if not 0.0 <= self.clip_cov_ratio <= 1.0:
            raise ValueError(f"clip_cov_ratio is a fraction in [0, 1] (got {self.clip_cov_ratio})")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError("clip_cov_lb must be < clip_cov_ub")


@torch.no_grad()
def token_covariance(advantages_B_T: Tensor, logp_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Cov_i = (A_i − mean A)(SG ℓ_i − mean SG ℓ), means over valid tokens (paper §4); −inf where masked."""
    keep = mask_B_T.bool()
    adv = masked(advantages_B_T.detach(), keep)
    lp = masked(logp_B_T.detach(), keep)
    cov = (adv - masked_mean(adv, keep)) * (lp - masked_mean(lp, keep))
    return torch.where(keep, cov, torch.full_like(cov, -torch.inf))


def _ratio(logp: Tensor, old_logp: Tensor, keep: Tensor, clamp: float | None) -> tuple[Tensor, Tensor]:
    lam = masked(logp - masked(old_logp.detach(), keep), keep)
    if clamp is not None:
        lam = lam.clamp(-clamp, clamp)
    return lam, torch.exp(lam)


def kl_cov_token_loss(
    logp_B_T: Tensor, old_logp_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor, *,
    kl_cov_ratio: float = 0.002, ppo_kl_coef: float = 1.0, log_ratio_clamp: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token KL-Cov loss −A·s + β·|λ|·[top-k Cov] (verl ``compute_policy_loss_kl_cov``).

    k = max(1, ⌊N_valid·ratio⌋) tokens (none when ratio = 0 or nothing is valid), chosen by
    ``torch.topk`` over the valid tokens. Shapes: [B, T] → (loss_B_T, metrics with ``ppo_kl`` =
    masked mean |λ|, ``kl_cov_selected`` = number of penalized tokens, and ``selected_B_T``).
    """
    keep = mask_B_T.bool()
    _, ratio = _ratio(logp_B_T, old_logp_B_T, keep, log_ratio_clamp)
    adv = masked(advantages_B_T.detach(), keep)
    abs_kl = kl_estimate(logp_B_T, old_logp_B_T.detach(), "abs", mask=keep,
                         log_ratio_clamp=log_ratio_clamp, value_clamp=None)
    cov = token_covariance(adv, logp_B_T, keep).reshape(-1)
    n_valid = int(keep.sum())
    selected = torch.zeros(cov.shape, dtype=torch.bool, device=cov.device)
    if kl_cov_ratio > 0 and n_valid > 0:
        k = max(1, int(n_valid * kl_cov_ratio))
        selected[torch.topk(cov, k, largest=True).indices] = True
    selected = selected.reshape(keep.shape) & keep
    loss = masked(-adv * ratio + ppo_kl_coef * abs_kl * selected.to(ratio.dtype), keep)
    with torch.no_grad():
        metrics = {"ppo_kl": masked_mean(abs_kl, keep),
                   "kl_cov_selected": selected.sum().to(ratio.dtype),
                   "selected_B_T": selected}
    return loss, metrics


def clip_cov_token_loss(
    logp_B_T: Tensor, old_logp_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor, *,
    clip_cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
    clip_low: float = 1.0, clip_high: float = 1.0, log_ratio_clamp: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token Clip-Cov loss max(−A·s, −A·clip(s))·corr (verl ``compute_policy_loss_clip_cov``).

    Candidates: valid, not already clipped (L2 > L1), ω_low < Cov < ω_high. A uniformly random subset
    of min(max(1, ⌊r·N_valid⌋), #candidates) gets corr = 0 (loss and gradient 0; still counted by
    token-mean). ``generator=None`` uses the global RNG, like verl. Shapes: [B, T] → (loss_B_T,
    metrics with ``pg_clipfrac`` = zeroed fraction of valid tokens, ``ppo_kl``, ``selected_B_T``).
    """
    keep = mask_B_T.bool()
    lam, ratio = _ratio(logp_B_T, old_logp_B_T, keep, log_ratio_clamp)
    adv = masked(advantages_B_T.detach(), keep)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = (loss2 > loss1) & keep
    cov = token_covariance(adv, logp_B_T, keep)
    cand = keep & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    cand_idx = torch.nonzero(cand.reshape(-1)).squeeze(-1)
    selected = torch.zeros(cand.numel(), dtype=torch.bool, device=cand.device)
    n_valid = int(keep.sum())
    if cand_idx.numel() > 0 and clip_cov_ratio > 0:
        n_pick = min(max(1, int(clip_cov_ratio * n_valid)), cand_idx.numel())
        perm = torch.randperm(cand_idx.numel(), generator=generator, device=cand_idx.device)
        selected[cand_idx[perm[:n_pick]]] = True
    selected = selected.reshape(keep.shape)
    loss = torch.where(clipped, loss2, loss1)
    loss = masked(torch.where(selected, torch.zeros_like(loss), loss), keep)
    with torch.no_grad():
        metrics = {"pg_clipfrac": masked_mean(selected.to(ratio.dtype), keep),
                   "ppo_kl": masked_mean(-lam, keep),
                   "selected_B_T": selected}
    return loss, metrics


def _needs(cfg) -> Needs:
    """Old log-probs only (no reference: the penalty is against π_old)."""
    return Needs(old_logp=True, ref_logp=False, entropy=cfg.entropy_coef != 0.0)


def _advantages(inp: AdvantageInputs, cfg) -> tuple[Tensor, Metrics]:
    """GRPO group advantage (the scripts' ``adv_estimator=grpo``; docs/algorithms.md § Group advantages)."""
    adv_B = group_advantages(inp.rewards_B, inp.group_ids_B, scale="group", eps=cfg.adv_eps)
    return broadcast_advantages(adv_B, inp.mask_B_T), to_floats({"adv_mean": adv_B.mean()})


def _finish(tok: Tensor, m: dict, inp: LossInputs, cfg) -> tuple[Tensor, Metrics]:
    total = agg_loss(tok, inp.mask_B_T, cfg.loss_agg_mode, **global_counts(inp))
    m = {k: v for k, v in m.items() if k != "selected_B_T"}
    m["pg_loss"] = total.detach()
    return finish_loss(total, m, inp, entropy_coef=cfg.entropy_coef, agg_mode=cfg.loss_agg_mode,
                       who="KL-Cov/Clip-Cov")


def kl_cov_loss(inp: LossInputs, cfg: KLCovConfig) -> tuple[Tensor, Metrics]:
    """agg(KL-Cov per-token loss) − c_H·agg(H) on one micro-batch (module docstring)."""
    if inp.old_logp_B_T is None:
        raise ValueError("KL-Cov needs old log-probs")
    tok, m = kl_cov_token_loss(inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
                               kl_cov_ratio=cfg.kl_cov_ratio, ppo_kl_coef=cfg.ppo_kl_coef,
                               log_ratio_clamp=cfg.log_ratio_clamp)
    return _finish(tok, m, inp, cfg)


def clip_cov_loss(inp: LossInputs, cfg: ClipCovConfig) -> tuple[Tensor, Metrics]:
    """agg(Clip-Cov per-token loss) − c_H·agg(H) on one micro-batch (module docstring)."""
    if inp.old_logp_B_T is None:
        raise ValueError("Clip-Cov needs old log-probs")
    tok, m = clip_cov_token_loss(inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
                                 clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb,
                                 clip_cov_ub=cfg.clip_cov_ub, clip_low=cfg.clip_low,
                                 clip_high=cfg.clip_high, log_ratio_clamp=cfg.log_ratio_clamp)
    return _finish(tok, m, inp, cfg)


KL_COV = register(Algorithm(name="kl_cov", config_cls=KLCovConfig, needs=_needs,
                            loss=kl_cov_loss, advantages=_advantages,
                            advantage_reads=frozenset()))
CLIP_COV = register(Algorithm(name="clip_cov", config_cls=ClipCovConfig, needs=_needs,
                              loss=clip_cov_loss, advantages=_advantages,
                              advantage_reads=frozenset()))

__all__ = [
    "CLIP_COV",
    "KL_COV",
    "ClipCovConfig",
    "KLCovConfig",
    "clip_cov_loss",
    "clip_cov_token_loss",
    "kl_cov_loss",
    "kl_cov_token_loss",
    "token_covariance",
]
