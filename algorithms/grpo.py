"""GRPO: J = E[(1/G) Σ_i agg_t{ min(s·Â, clip(s, 1−ε, 1+ε)·Â) − β·KL_t }], Â = (r − mean_g)/std_g.

Paper: Shao et al., "DeepSeekMath" (arXiv 2402.03300), Eq. 3 and §4.1.2 (outcome supervision):
the clipped surrogate over G responses per prompt, k3 against π_ref with β = 0.04, no importance
weight on the KL, each response's tokens averaged then responses averaged (seq-mean-token-mean).
Formulas, defaults and decisions: docs/algorithms.md § GRPO (shared pieces: § Clipped surrogate,
§ Loss aggregation, § Group advantages, § KL estimators).

Reference implementations matched:
  * verl ``core_algos.compute_grpo_outcome_advantage`` (advantage), ``compute_policy_loss_vanilla``
    (surrogate, dual clip, ±20 λ clamp), ``agg_loss``, ``kl_penalty`` (``use_kl_loss``) and
    ``ray_trainer.apply_kl_penalty`` (``use_kl_in_reward``), loss assembled as in ``losses.ppo_loss``:
    total = agg(L_PG) + β·agg(KL) − entropy_coef·agg(H), one ``loss_agg_mode`` for all three terms.
  * TRL ``GRPOTrainer`` by config: ``kl_is_weight="differentiable"`` (``use_bias_correction_kl``,
    TRL ≥ 1.10 default), ``kl_log_ratio_clamp=kl_value_clamp=None`` (TRL has no clamps),
    ``dual_clip_c=None``, ``adv_eps=1e-4``, ``singleton="zero"``, ``loss_agg_mode="token-mean"``.

Decisions:
  * Defaults are the paper's (β = 0.04, k3, ε = 0.2, seq-mean-token-mean, std-normalized group
    advantage) with verl's numerics (ε_std = 1e-6, singleton → raw score, ±20 λ clamp, k3 clamps
    ±20/±10, dual clip c = 3). The paper has no dual clip; it only acts when A < 0 and s > 3.
  * The k3 loss term's gradient is the *forward*-KL gradient (§ KL estimators). Kept as the paper
    default for parity; ``kl_kind="k3+"`` is verl's straight-through fix (k2 gradient) and
    ``kl_is_weight="differentiable"`` is TRL's / DeepSeek-V3.2's unbiased off-policy fix.
  * Sequences: the per-token partial KL gradient, as verl and TRL (Tang & Munos, arXiv 2506.09477,
    give the reward-to-go form of the full sequence gradient); not reward-to-go.
  * KL in the reward (``kl_placement="reward"``) evaluates the estimator (default should then be
    ``kl_kind="k1"``, verl's ``kl_penalty="kl"``) at π_old and subtracts β·Σ_t kl from the outcome
    reward before group normalization, as verl does (the sum enters the group mean/std).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rlkit.kl import IS_MODES, KINDS

from .base import AdvantageInputs, Algorithm, LossInputs, Metrics, Needs, register
from .common import (
    ADV_SCALES,
    AGG_MODES,
    SINGLETON_RULES,
    agg_loss,
    broadcast_advantages,
    check_choice,
    clipped_surrogate,
    finish_loss,
    global_counts,
    group_advantages,
    kl_in_reward,
    kl_loss_term,
    to_floats,
)

KL_PLACEMENTS = ("loss", "reward")


@dataclass
class GRPOConfig:
    """GRPO hyperparameters; paper symbols in brackets (DeepSeekMath §4.1; docs/algorithms.md § GRPO)."""

    beta: float = 0.04
    """[β] KL coefficient (paper 0.04; verl ``kl_loss_coef`` 0.001; TRL ``beta`` 0.0). 0 → no reference."""
    kl_kind: str = "k3"
    """KL estimator (``rlkit.kl.KINDS``): paper/verl ``low_var_kl`` = k3; ``k3+`` = verl's k2-gradient fix."""
    kl_placement: str = "loss"
    """"loss" (paper, verl ``use_kl_loss``, TRL) or "reward" (verl ``use_kl_in_reward``; use k1 there)."""
    kl_is_weight: str = "none"
    """Importance weight s on the KL loss term: "none" (paper, verl), "differentiable" (TRL ≥ 1.10)."""
    kl_log_ratio_clamp: float | None = 20.0
    """Clamp on Δ before the exp in k3 (verl ≥ 0.4.1: 20; TRL: None)."""
    kl_value_clamp: float | None = 10.0
    """Clamp on the KL value (verl: 10; TRL: None). Gradient is 0 where active."""
    clip_low: float = 0.2
    """[ε] lower clip, ratio ≥ 1−ε (verl ``clip_ratio_low``)."""
    clip_high: float = 0.2
    """[ε] upper clip, ratio ≤ 1+ε (verl ``clip_ratio_high``; TRL ``epsilon_high``)."""
    dual_clip_c: float | None = 3.0
    """[c] dual-clip bound for A < 0 (Ye et al. 2020; verl ``clip_ratio_c``); None = off (paper, TRL)."""
    log_ratio_clamp: float | None = 20.0
    """Clamp on λ = ℓ − ℓ^old before exp in the surrogate (verl ≥ 0.4.1); None = off (TRL)."""
    loss_agg_mode: str = "seq-mean-token-mean"
    """agg(·) of docs/algorithms.md § Loss aggregation. Paper: seq-mean-token-mean; verl recipes and
    TRL ≥ 0.22: token-mean."""
    adv_scale: str = "group"
    """Advantage std: "group" (paper; verl ``norm_adv_by_std_in_grpo``), "batch" (TRL), "none" (Dr. GRPO)."""
    adv_eps: float = 1e-6
    """ε added to the std (verl 1e-6; TRL 1e-4)."""
    singleton: str = "raw"
    """One-response group: "raw" → A = r (verl), "zero" → A = 0 (TRL)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (verl ``entropy_coeff``, TRL ``entropy_coef``; paper: none)."""

    def __post_init__(self) -> None:
        check_choice("kl_kind", self.kl_kind, KINDS)
        check_choice("kl_placement", self.kl_placement, KL_PLACEMENTS)
        check_choice("kl_is_weight", self.kl_is_weight, IS_MODES)
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        check_choice("adv_scale", self.adv_scale, ADV_SCALES)
        check_choice("singleton", self.singleton, SINGLETON_RULES)
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (got {self.beta})")
        if self.kl_placement == "reward" and self.kl_is_weight != "none":
            raise ValueError("kl_is_weight applies to the KL loss term only (kl_placement='loss')")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 or None (got {self.dual_clip_c})")


def grpo_needs(cfg: GRPOConfig) -> Needs:
    """Old log-probs always; the reference only when β > 0; entropy only when its coef ≠ 0."""
    return Needs(old_logp=True, ref_logp=cfg.beta > 0, entropy=cfg.entropy_coef != 0.0)


def grpo_advantages(inp: AdvantageInputs, cfg: GRPOConfig) -> tuple[Tensor, Metrics]:
    """A_{i,t} = m_{i,t}·(r_i − mean_g)/(std_g + ε), with r_i − β·Σ_t kl_t first if KL is in the reward.

    docs/algorithms.md § GRPO; verl ``compute_grpo_outcome_advantage`` (+ ``apply_kl_penalty``).
    Shapes: rewards_B [B], group_ids_B [B], mask_B_T [B, T] → advantages [B, T].
    """
    rewards_B = inp.rewards_B.detach()
    metrics: dict[str, Tensor | float] = {}
    if cfg.beta > 0 and cfg.kl_placement == "reward":
        if inp.old_logp_B_T is None or inp.ref_logp_B_T is None:
            raise ValueError("GRPO kl_placement='reward' needs old and reference log-probs")
        rewards_B, kl_m = kl_in_reward(rewards_B, inp.old_logp_B_T, inp.ref_logp_B_T, inp.mask_B_T,
                                       beta=cfg.beta, kind=cfg.kl_kind,
                                       log_ratio_clamp=cfg.kl_log_ratio_clamp,
                                       value_clamp=cfg.kl_value_clamp)
        metrics.update(kl_m)
    adv_B = group_advantages(rewards_B, inp.group_ids_B, scale=cfg.adv_scale, eps=cfg.adv_eps,
                             singleton=cfg.singleton)
    metrics["adv_mean"] = adv_B.mean()
    metrics["adv_abs_max"] = adv_B.abs().max()
    return broadcast_advantages(adv_B, inp.mask_B_T), to_floats(metrics)


def grpo_loss(inp: LossInputs, cfg: GRPOConfig) -> tuple[Tensor, Metrics]:
    """agg(L_clip) + β·agg(kl(ℓ, ℓ^ref)) − c_H·agg(H) on one micro-batch; docs/algorithms.md § GRPO.

    Global normalization: ``inp.num_tokens_global`` / ``num_seqs_global`` are the counts of the whole
    optimizer step, so micro-batch losses sum to the full-batch loss. Shapes: [B, T] → 0-dim.
    """
    counts = global_counts(inp)
    if inp.old_logp_B_T is None:
        raise ValueError("GRPO loss needs old log-probs")
    pg_B_T, m = clipped_surrogate(inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
                                  clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                  dual_clip_c=cfg.dual_clip_c, log_ratio_clamp=cfg.log_ratio_clamp)
    pg_loss = agg_loss(pg_B_T, inp.mask_B_T, cfg.loss_agg_mode, **counts)
    total = pg_loss
    metrics: dict[str, Tensor | float] = {**m, "pg_loss": pg_loss.detach()}
    if cfg.beta > 0 and cfg.kl_placement == "loss":
        if inp.ref_logp_B_T is None:
            raise ValueError("GRPO with beta > 0 needs reference log-probs")
        kl_loss, kl_mean = kl_loss_term(
            inp.logp_B_T, inp.ref_logp_B_T, inp.mask_B_T, kind=cfg.kl_kind, agg_mode=cfg.loss_agg_mode,
            old_logp_B_T=inp.old_logp_B_T, is_weight=cfg.kl_is_weight,
            log_ratio_clamp=cfg.kl_log_ratio_clamp, value_clamp=cfg.kl_value_clamp, **counts)
        total = total + cfg.beta * kl_loss
        metrics.update(kl_loss=kl_loss.detach(), kl_mean=kl_mean)
    return finish_loss(total, metrics, inp, entropy_coef=cfg.entropy_coef, agg_mode=cfg.loss_agg_mode,
                       who="GRPO")


GRPO = register(Algorithm(
    name="grpo", config_cls=GRPOConfig, needs=grpo_needs,
    loss=grpo_loss, advantages=grpo_advantages,
    advantage_reads=frozenset({"old_logp", "ref_logp"}),  # the KL-in-reward placement
))

__all__ = ["GRPO", "KL_PLACEMENTS", "GRPOConfig", "grpo_advantages", "grpo_loss", "grpo_needs"]
