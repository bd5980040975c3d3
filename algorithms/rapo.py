"""RAPO: L = agg(clipped surrogate) + α·agg(forward k3 to π̂_ref) − β·agg(H), π̂_ref ∝ π_ref^φ(r).

Paper: Deng, Wei, Yu, Wu, "Unlocking Reasoning Capabilities in LLMs via Reinforcement Learning
Exploration", arXiv 2510.03865. Formulas and options: docs/algorithms.md § RAPO.
Reference implementation: **none public**. The formulas follow a reading of the paper taken from
secondary write-ups, **not verified against the paper's method section**; no parity is claimed,
and every open part is a config option marked UNVERIFIED.

Objective: J = E[r] − α·KL(π̂_ref‖π_θ) + β·H(π_θ): GRPO with the reverse k3 replaced by the
**forward** KL (mass-covering, lets the policy leave the reference's high-density region) against a
**reward-aware tempered reference** π̂_ref(y|x) = π_ref(y|x)^φ(r) / Z. Low reward → φ small → a
flatter reference (exploration); high reward → φ = 1 → π_ref itself.

Per token, with ρ = π̂_ref/π_θ, the estimator is k = ρ·log ρ − ρ + 1 (``rlkit.kl`` kind
``forward_k3``: log-ratio clamped to ±20 before the exp, value clamped to ±10, as verl's k3). Used as
a loss term its gradient is −ρ·log ρ·∇ℓ, not the exact forward-KL gradient (docs/algorithms.md
§ KL estimators): this is the estimator-in-loss form the paper describes. Advantages are GRPO's
(group mean/std, verl ε and singleton rule); the surrogate is verl's clipped surrogate.

UNVERIFIED options:
* ``phi_mode`` — φ(r). ``binary`` (default; the minimal choice for 0/1 rewards): φ = 1 if
  r > ``reward_threshold`` else ``phi_low`` (default 0, the uniform distribution). ``linear``:
  φ = clip((r − ``reward_min``)/(``reward_max`` − ``reward_min``), 0, 1).
* ``normalization`` — ``exact`` (default, q_φ = softmax(φ·log π_ref)) or ``cheap`` (φ·log π_ref,
  which overstates q_φ for φ < 1). Exact needs log q_φ from the reference worker
  (``Needs.ref_temper_phi``); that contract carries one φ, so exact is available for ``binary``
  (φ ∈ {phi_low, 1}; φ = 1 is π_ref itself) and rejected for ``linear``.
* ``granularity`` — ``token`` (default; φ(r_i) at every token of response i, aggregated like the PG
  loss) or ``sequence`` (ρ from summed log-ratios, one k per response / num_seqs_global; overflows
  easily, kept only as the other reading).
* Defaults α = 1e−3, β = 0, ε = 0.2, c = 3 are GRPO-derived placeholders, not the paper's numbers.
Not offered: the "exact forward KL" (full vocabulary against the tempered reference) — the loss
contract has no tempered full-vocab KL input yet.

Shapes: B responses, T padded response length; ``rewards_B`` (raw outcome rewards) must be present
in the loss inputs, because φ depends on each response's reward.
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
    clipped_surrogate,
    entropy_bonus,
    group_advantages,
    masked,
    masked_mean,
    to_floats,
)

PHI_MODES = ("binary", "linear")
NORMALIZATIONS = ("exact", "cheap")
GRANULARITIES = ("token", "sequence")


@dataclass
class RAPOConfig:
    """RAPO hyperparameters (paper symbols in brackets). Fields marked UNVERIFIED are open in the paper."""

    kl_coef: float = 1e-3
    """[α] forward-KL weight. UNVERIFIED placeholder (GRPO ``kl_loss_coef``)."""
    entropy_coef: float = 0.0
    """[β] entropy-bonus weight. UNVERIFIED placeholder (0: the entropy pass is not scheduled)."""
    clip_low: float = 0.2
    """[ε] surrogate clip, low side. UNVERIFIED placeholder (GRPO)."""
    clip_high: float = 0.2
    """[ε] surrogate clip, high side. UNVERIFIED placeholder (GRPO)."""
    dual_clip_c: float | None = 3.0
    """Dual clip c for A < 0 (verl default; None: off)."""
    loss_agg_mode: str = "token-mean"
    """Aggregation of the PG, KL and entropy terms (verl default)."""
    adv_eps: float = 1e-6
    """ε of the group std normalization (verl)."""
    phi_mode: str = "binary"
    """[φ] UNVERIFIED: ``binary`` or ``linear`` map from reward to the tempering exponent."""
    phi_low: float = 0.0
    """[φ] UNVERIFIED: φ of a below-threshold response in ``binary`` mode (0 = uniform reference)."""
    reward_threshold: float = 0.5
    """UNVERIFIED: ``binary`` mode: φ = 1 iff r > this."""
    reward_min: float = 0.0
    """UNVERIFIED: ``linear`` mode: reward mapped to φ = 0."""
    reward_max: float = 1.0
    """UNVERIFIED: ``linear`` mode: reward mapped to φ = 1."""
    normalization: str = "exact"
    """UNVERIFIED: ``exact`` (softmax-normalized q_φ) or ``cheap`` (φ·log π_ref, no normalizer)."""
    granularity: str = "token"
    """UNVERIFIED: ``token`` or ``sequence`` forward-KL estimate."""
    log_ratio_clamp: float | None = 20.0
    """Clamp on log ρ before the exp (as verl's k3)."""
    kl_value_clamp: float | None = 10.0
    """Clamp on the k value (verl's k3 clamp)."""

    def __post_init__(self) -> None:
        check_choice("phi_mode", self.phi_mode, PHI_MODES)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        if not 0.0 <= self.phi_low <= 1.0:
            raise ValueError(f"phi_low must be in [0, 1], got {self.phi_low}")
        if self.reward_max <= self.reward_min:
            raise ValueError("reward_max must be > reward_min")
        if self.normalization == "exact" and self.phi_mode != "binary":
            raise ValueError("normalization='exact' needs per-response tempered reference log-probs, "
                             "which the runtime provides for one φ only: use phi_mode='binary' or "
                             "normalization='cheap'")


@torch.no_grad()
def rapo_phi(rewards_B: Tensor, cfg: RAPOConfig) -> Tensor:
    """φ(r) ∈ [0, 1] per response (UNVERIFIED map, module docstring). [B] → [B] float."""
    r = rewards_B.detach().to(torch.float64)
    if cfg.phi_mode == "binary":
        return torch.where(r > cfg.reward_threshold, torch.ones_like(r), torch.full_like(r, cfg.phi_low))
    return ((r - cfg.reward_min) / (cfg.reward_max - cfg.reward_min)).clamp(0.0, 1.0)


@torch.no_grad()
def tempered_ref_logp(
    ref_logp_B_T: Tensor, phi_B: Tensor, cfg: RAPOConfig, ref_tempered_logp_B_T: Tensor | None = None
) -> Tensor:
    """log π̂_ref(y_t) per token for the per-response φ (docs/algorithms.md § KL estimators, tempering).

    exact/binary: φ = 1 → log π_ref; φ = phi_low → the runtime's exact log q_{phi_low}(y_t).
    cheap: φ_i·log π_ref(y_t). Shapes: [B, T], [B] → [B, T]; no gradient.
    """
    phi = phi_B.to(ref_logp_B_T.dtype).unsqueeze(-1)
    if cfg.normalization == "cheap":
        return phi * ref_logp_B_T.detach()
    if cfg.phi_low == 1.0 or bool((phi == 1.0).all()):
        return ref_logp_B_T.detach()
    if ref_tempered_logp_B_T is None:
        raise ValueError("rapo normalization='exact' needs ref_tempered_logp_B_T "
                         "(Needs.ref_temper_phi = phi_low) from the reference worker")
    return torch.where(phi == 1.0, ref_logp_B_T.detach(), ref_tempered_logp_B_T.detach())


def rapo_advantages(inp: AdvantageInputs, cfg: RAPOConfig) -> tuple[Tensor, Metrics]:
    """GRPO group advantage (r − mean_g)/(std_g + ε), broadcast over tokens."""
    adv_B = group_advantages(inp.rewards_B, inp.group_ids_B, scale="group", eps=cfg.adv_eps)
    phi = rapo_phi(inp.rewards_B, cfg)
    return broadcast_advantages(adv_B, inp.mask_B_T), {"rapo/phi_mean": float(phi.mean())}


def _forward_kl_term(inp: LossInputs, q_logp_B_T: Tensor, cfg: RAPOConfig) -> tuple[Tensor, Tensor]:
    """(aggregated forward-k3 loss term, detached mean k) at the chosen granularity."""
    kw = {"log_ratio_clamp": cfg.log_ratio_clamp, "value_clamp": cfg.kl_value_clamp}
    if cfg.granularity == "token":
        k_B_T = kl_estimate(inp.logp_B_T, q_logp_B_T, "forward_k3", mask=inp.mask_B_T, **kw)
        term = agg_loss(k_B_T, inp.mask_B_T, cfg.loss_agg_mode, num_tokens=inp.num_tokens_global,
                        num_seqs=inp.num_seqs_global, max_response_len=inp.max_response_len or None)
        return term, masked_mean(k_B_T.detach(), inp.mask_B_T)
    seq_logp = masked(inp.logp_B_T, inp.mask_B_T).sum(-1, keepdim=True)
    seq_q = masked(q_logp_B_T, inp.mask_B_T).sum(-1, keepdim=True)
    k_B = kl_estimate(seq_logp, seq_q, "forward_k3", **kw).squeeze(-1)
    return k_B.sum() / max(float(inp.num_seqs_global), 1.0), k_B.detach().mean()


def rapo_loss(inp: LossInputs, cfg: RAPOConfig) -> tuple[Tensor, Metrics]:
    """PG surrogate + α·forward k3 to the tempered reference − β·entropy (docs/algorithms.md § RAPO)."""
    if inp.old_logp_B_T is None or inp.ref_logp_B_T is None:
        raise ValueError("rapo needs old and reference log-probs (Needs.old_logp, Needs.ref_logp)")
    if inp.rewards_B is None:
        raise ValueError("rapo needs rewards_B in the loss inputs (φ depends on each response's reward)")
    per_tok, metrics = clipped_surrogate(
        inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c)
    agg = {"num_tokens": inp.num_tokens_global, "num_seqs": inp.num_seqs_global,
           "max_response_len": inp.max_response_len or None}
    pg = agg_loss(per_tok, inp.mask_B_T, cfg.loss_agg_mode, **agg)
    q_logp = tempered_ref_logp(inp.ref_logp_B_T, rapo_phi(inp.rewards_B, cfg), cfg, inp.ref_tempered_logp_B_T)
    kl_term, kl_mean = _forward_kl_term(inp, q_logp, cfg)
    loss = pg + cfg.kl_coef * kl_term
    metrics.update(pg_loss=pg.detach(), kl_forward_k3=kl_mean)
    if cfg.entropy_coef:
        if inp.entropy_B_T is None:
            raise ValueError("rapo entropy_coef > 0 needs entropy_B_T (Needs.entropy)")
        loss = loss + entropy_bonus(inp.entropy_B_T, inp.mask_B_T, coef=cfg.entropy_coef,
                                    agg_mode=cfg.loss_agg_mode, **agg)
        metrics["entropy"] = masked_mean(inp.entropy_B_T.detach(), inp.mask_B_T)
    return loss, to_floats(metrics)


def rapo_needs(cfg: RAPOConfig) -> Needs:
    """π_old, π_ref, log q_{phi_low} for exact binary tempering, entropy when β > 0."""
    temper = cfg.phi_low if (cfg.normalization == "exact" and cfg.phi_low != 1.0) else None
    return Needs(old_logp=True, ref_logp=True, ref_temper_phi=temper, entropy=cfg.entropy_coef != 0)


RAPO = register(Algorithm(name="rapo", config_cls=RAPOConfig, needs=rapo_needs,
                          loss=rapo_loss, advantages=rapo_advantages, advantage_reads=frozenset()))
