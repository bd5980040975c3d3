"""RPG: J = E_θ[R] − β·D(π_old, π_θ), D ∈ {KL(π_old‖π_θ), KL(π_θ‖π_old), UKL(π_old‖π_θ), UKL(π_θ‖π_old)}.

Paper: Zhang, Liu, Yuan, Gu, Yao, "On the Design of KL-Regularized Policy Gradient Algorithms for
LLM Reasoning" (arXiv 2505.17508, ICLR 2026): Tables 1/4 (fully differentiable surrogates),
Table 2 and Appendix F (REINFORCE-style surrogates with stop-gradient), Algorithm 2 (RPG dual clip).
The KL reference is π_old itself ("iterative reference", ℓ^ref := ℓ^old, as in every RPG script).
Formulas, defaults and decisions: docs/algorithms.md § RPG (the KL family: § KL estimators).

The eight forms (``kl_direction`` × ``normalized`` × ``style``), w = exp(ℓ − ℓ^old) per token:

  style="differentiable" (RPG repo ``dp_actor.update_policy`` with ``use_kl_loss=True``):
      loss = agg(dual-clip PPO surrogate with A) + β·agg(kl_estimate(ℓ, ℓ^ref, rpg_{fkl,rkl,ufkl,urkl}))
      FKL: −log w, RKL: w log w, UFKL: w − log w − 1, URKL: w(log w − 1) + 1 — through ``rlkit.kl``.
  style="reinforce" (RPG repo ``compute_policy_loss_reinforce``; paper Table 2, Algorithm 2):
      per token L = −SG(A·w̄ + C)·ℓ with w̄ = clip(w, 1−ε_low, 1+ε_high) and the KL component
      FKL: C = β, RKL: C = −β·w̄(log w̄ + 1), UFKL: C = β(1 − w̄), URKL: C = −β·w̄·log w̄,
      either hard-clipped as written (``reinforce_clip="hard"``) or with the RPG dual clip
      (``reinforce_clip="dual"``, Algorithm 2): A' = A + SG(C)/SG(w), live loss −A'·ℓ·SG(w) (gradient
      −(A·w + C)∇ℓ) for w < 1+ε_high when A > 0 and for 1−ε_low ≤ w < c when A ≤ 0, constant otherwise.

Reference implementation: complex-reasoning/RPG @ ec8e30b (a verl ≈ 0.3 fork):
``core_algos.kl_penalty`` (rpg_* kinds), ``compute_policy_loss_reinforce``,
``compute_rpg_outcome_advantage`` / ``compute_rpg_batchmean_outcome_advantage``; scripts
``recipe/rpg/7b/*.sh`` (β = 1e-4, ε = 0.2/0.28, c = 10, token-mean).

Decisions:
  * Default form: fully differentiable UFKL, the form the public training scripts actually run
    (``compute_policy_loss_reinforce`` is never called by them). The REINFORCE forms are
    implemented from ``compute_policy_loss_reinforce`` / Algorithm 2, as the paper describes them.
  * λ is clamped to ±20 before every exp (surrogate, KL estimate, w); the RPG code does not clamp
    and can overflow. The KL values of rkl/ufkl/urkl are clamped to ±10 as in the RPG code.
  * Dual-clip branch rule: the code's (sign of the plain advantage A, ``branch_on="advantage"``);
    the paper's Algorithm 2 branches on the sign of A' (``branch_on="paper"``). They agree whenever
    |C/w| < |A|. The code's ``clip_ppo_v3`` rule (the opposite of the paper's) is not offered.
  * The constant (clipped) branches report the RPG code's values, e.g. −(A(1+ε_high) − C)·SG(ℓ)
    (Algorithm 2 writes +C); they carry no gradient, so only the logged loss depends on this.
  * Advantage: r − group mean, no std (``compute_rpg_outcome_advantage``), or r − batch mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import AdvantageInputs, Algorithm, LossInputs, Metrics, Needs, register
from .common import (
    AGG_MODES,
    agg_loss,
    broadcast_advantages,
    check_choice,
    clipped_surrogate,
    finish_loss,
    global_counts,
    kl_loss_term,
    masked,
    masked_mean,
    mean_baseline_advantages,
    to_floats,
)

RPG_KL_KINDS = ("fkl", "rkl", "ufkl", "urkl")


@dataclass
class RPGConfig:
    """RPG hyperparameters; paper symbols in brackets (arXiv 2505.17508 §4, App. H)."""

    kl_direction: str = "forward"
    """"forward" = KL(π_old‖π_θ) (FKL/UFKL) or "reverse" = KL(π_θ‖π_old) (RKL/URKL)."""
    normalized: bool = False
    """True: KL (FKL/RKL); False: the unnormalized UKL (UFKL/URKL)."""
    style: str = "differentiable"
    """"differentiable" (paper Table 1/4, the RPG scripts) or "reinforce" (Table 2, SG(Weight)·ℓ)."""
    beta: float = 1e-4
    """[β] KL strength (paper App. H: 1e-4; RPG code ``kl_loss_coef``)."""
    clip_low: float = 0.2
    """[ε_low] lower clip (paper: 0.2)."""
    clip_high: float = 0.28
    """[ε_high] upper clip (paper: 0.28)."""
    dual_clip_c: float | None = 10.0
    """[c] dual-clip bound for A ≤ 0 (scripts ``clip_ratio_c=10``); None = no dual clip (differentiable only)."""
    reinforce_clip: str = "dual"
    """REINFORCE forms: "dual" (Algorithm 2, code ``*_clip_ppo``) or "hard" (w̄ inside the weight)."""
    branch_on: str = "advantage"
    """Dual-clip branch: "advantage" = sign of A (RPG code) or "paper" = sign of A' (Algorithm 2)."""
    kl_reference: str = "old"
    """"old": iterative reference ℓ^ref := ℓ^old (paper, scripts); "ref": a frozen π_ref (differentiable only)."""
    log_ratio_clamp: float | None = 20.0
    """Clamp on log w before every exp (our choice; the RPG code has none and can overflow)."""
    kl_value_clamp: float | None = 10.0
    """Clamp on the rkl/ufkl/urkl values (RPG code: 10); rpg_fkl is never clamped."""
    baseline: str = "group"
    """Advantage baseline b in A = r − b: "group" mean (``rpg``) or "batch" mean (``rpg_batchmean``)."""
    loss_agg_mode: str = "token-mean"
    """agg(·) of docs/algorithms.md § Loss aggregation (RPG scripts: token-mean)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (scripts: 0)."""

    def __post_init__(self) -> None:
        check_choice("kl_direction", self.kl_direction, ("forward", "reverse"))
        check_choice("style", self.style, ("differentiable", "reinforce"))
        check_choice("reinforce_clip", self.reinforce_clip, ("dual", "hard"))
        check_choice("branch_on", self.branch_on, ("advantage", "paper"))
        check_choice("kl_reference", self.kl_reference, ("old", "ref"))
        check_choice("baseline", self.baseline, ("group", "batch"))
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1) (got {self.clip_low})")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 or None (got {self.dual_clip_c})")
        if self.style == "reinforce" and self.kl_reference != "old":
            raise ValueError("REINFORCE-style RPG is defined with the iterative reference (kl_reference='old')")
        if self.style == "reinforce" and self.reinforce_clip == "dual" and self.dual_clip_c is None:
            raise ValueError("reinforce_clip='dual' needs dual_clip_c (the paper's c)")

    @property
    def kl_kind(self) -> str:
        """The short form name: fkl, rkl, ufkl or urkl."""
        return ("" if self.normalized else "u") + ("fkl" if self.kl_direction == "forward" else "rkl")


def rpg_kl_component(w_bar_B_T: Tensor, kind: str, beta: float) -> Tensor:
    """KL component C of the REINFORCE weight (paper Table 2, RPG code ``kl_term``), from w̄ = clip(w).

    FKL: β; RKL: −β·w̄(log w̄ + 1); UFKL: β(1 − w̄); URKL: −β·w̄·log w̄. These are REINFORCE weights
    (the KL's score-function coefficients), not divergences, so they do not go through ``rlkit.kl``.
    """
    check_choice("RPG KL kind", kind, RPG_KL_KINDS)
    if kind == "fkl":
        return torch.full_like(w_bar_B_T, beta)
    if kind == "ufkl":
        return beta * (1.0 - w_bar_B_T)
    log_w = torch.log(w_bar_B_T)
    return -beta * w_bar_B_T * (log_w + 1.0) if kind == "rkl" else -beta * w_bar_B_T * log_w


def rpg_reinforce_token_loss(
    logp_B_T: Tensor, old_logp_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor, *,
    kind: str, beta: float, clip_low: float = 0.2, clip_high: float = 0.28,
    dual_clip_c: float | None = 10.0, clip: str = "dual", branch_on: str = "advantage",
    log_ratio_clamp: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token REINFORCE-style RPG loss −SG(Weight)·ℓ with the RPG clipping (Table 2, Algorithm 2).

    Matches RPG ``compute_policy_loss_reinforce`` (``kl_type="rpg_rf_<kind>[_clip_ppo]"``) before
    aggregation, plus the ±20 clamp on log w. Gradient per token: −(A·w̄ + C)∇ℓ (hard clip) or
    −(A·w + C)∇ℓ in the live region of the dual clip and exactly 0 in its clipped regions.
    Shapes: [B, T] inputs → (loss_B_T with zeros at masked positions, metrics of 0-dim tensors).
    """
    keep = mask_B_T.bool()
    logp = masked(logp_B_T, keep)
    lam = masked(logp - masked(old_logp_B_T.detach(), keep), keep)
    if log_ratio_clamp is not None:
        lam = lam.clamp(-log_ratio_clamp, log_ratio_clamp)
    adv = masked(advantages_B_T.detach(), keep)
    w = torch.exp(lam).detach()
    w_bar = w.clamp(1.0 - clip_low, 1.0 + clip_high)
    c_kl = rpg_kl_component(w_bar, kind, beta).detach()
    lp_sg = logp.detach()
    if clip == "hard":
        loss = -(adv * w_bar + c_kl) * logp
        lower, upper = w < 1.0 - clip_low, w > 1.0 + clip_high
        clipfrac, clipfrac_lower = (lower | upper), lower
    else:
        a_prime = adv + c_kl / w  # A' = A + SG(C)/SG(w); −A'·ℓ·SG(w) has gradient −(A·w + C)∇ℓ
        live = -a_prime * logp * w
        const_high = -(adv * (1.0 + clip_high) - c_kl) * lp_sg
        const_low = -(adv * (1.0 - clip_low) - c_kl) * lp_sg
        const_c = -(adv * dual_clip_c + c_kl) * lp_sg
        pos_branch = torch.where(w < 1.0 + clip_high, live, const_high)
        neg_inner = torch.where(w < 1.0 - clip_low, const_low, live)
        neg_branch = torch.where(w < dual_clip_c, neg_inner, const_c)
        positive = adv > 0 if branch_on == "advantage" else a_prime > 0
        loss = torch.where(positive, pos_branch, neg_branch)
        clipfrac = torch.where(positive, w >= 1.0 + clip_high, (w < 1.0 - clip_low) | (w >= dual_clip_c))
        clipfrac_lower = (~positive) & (w >= dual_clip_c)
    loss = masked(loss, keep)
    with torch.no_grad():
        metrics = {"pg_clipfrac": masked_mean(clipfrac.to(lam.dtype), keep),
                   "pg_clipfrac_lower": masked_mean(clipfrac_lower.to(lam.dtype), keep),
                   "ppo_kl": masked_mean(-lam, keep)}
    return loss, metrics


def rpg_needs(cfg: RPGConfig) -> Needs:
    """Old log-probs (ratio and iterative reference); π_ref only for ``kl_reference="ref"``."""
    return Needs(old_logp=True, ref_logp=cfg.kl_reference == "ref" and cfg.beta > 0,
                 entropy=cfg.entropy_coef != 0.0)


def rpg_advantages(inp: AdvantageInputs, cfg: RPGConfig) -> tuple[Tensor, Metrics]:
    """A_{i,t} = m_{i,t}·(r_i − b), b the group (singleton: 0) or batch mean; no std."""
    adv_B = mean_baseline_advantages(inp.rewards_B, inp.group_ids_B, baseline=cfg.baseline)
    metrics = {"adv_mean": adv_B.mean(), "adv_abs_max": adv_B.abs().max()}
    return broadcast_advantages(adv_B, inp.mask_B_T), to_floats(metrics)


def rpg_loss(inp: LossInputs, cfg: RPGConfig) -> tuple[Tensor, Metrics]:
    """One micro-batch of RPG in the configured form (module docstring; docs/algorithms.md § RPG)."""
    if inp.old_logp_B_T is None:
        raise ValueError("RPG loss needs old log-probs")
    counts = global_counts(inp)
    metrics: dict[str, Tensor | float] = {}
    if cfg.style == "reinforce":
        tok, m = rpg_reinforce_token_loss(
            inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T, kind=cfg.kl_kind,
            beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c,
            clip=cfg.reinforce_clip, branch_on=cfg.branch_on, log_ratio_clamp=cfg.log_ratio_clamp)
        total = agg_loss(tok, inp.mask_B_T, cfg.loss_agg_mode, **counts)
        metrics.update(m, pg_loss=total.detach())
    else:
        tok, m = clipped_surrogate(inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
                                   clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                   dual_clip_c=cfg.dual_clip_c, log_ratio_clamp=cfg.log_ratio_clamp)
        total = agg_loss(tok, inp.mask_B_T, cfg.loss_agg_mode, **counts)
        metrics.update(m, pg_loss=total.detach())
        if cfg.beta > 0:
            ref = inp.old_logp_B_T if cfg.kl_reference == "old" else inp.ref_logp_B_T
            if ref is None:
                raise ValueError("RPG with kl_reference='ref' needs reference log-probs")
            kl_loss, kl_mean = kl_loss_term(
                inp.logp_B_T, ref.detach(), inp.mask_B_T, kind=f"rpg_{cfg.kl_kind}",
                agg_mode=cfg.loss_agg_mode, log_ratio_clamp=cfg.log_ratio_clamp,
                value_clamp=cfg.kl_value_clamp, **counts)
            total = total + cfg.beta * kl_loss
            metrics.update(kl_loss=kl_loss.detach(), kl_mean=kl_mean)
    return finish_loss(total, metrics, inp, entropy_coef=cfg.entropy_coef, agg_mode=cfg.loss_agg_mode,
                       who="RPG")


RPG = register(Algorithm(
    name="rpg", config_cls=RPGConfig, needs=rpg_needs, loss=rpg_loss,
    advantages=rpg_advantages, advantage_reads=frozenset(),
))

__all__ = [
    "RPG",
    "RPG_KL_KINDS",
    "RPGConfig",
    "rpg_advantages",
    "rpg_kl_component",
    "rpg_loss",
    "rpg_needs",
    "rpg_reinforce_token_loss",
]
