"""DAPO: J = E[(1/Σ_i|o_i|) Σ_i Σ_t min(s·Â, clip(s, 1−ε_low, 1+ε_high)·Â)], s.t. 0 < #correct < G.

Paper: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv
2503.14476), Eq. 8: clip-higher (ε_low = 0.2, ε_high = 0.28), token-level loss, dynamic sampling
(drop groups whose outcomes are all equal), overlong reward shaping, no KL term.
Formulas, defaults and decisions: docs/algorithms.md § DAPO (and § Clipped surrogate, § Loss
aggregation for the shared pieces).

Reference implementation: verl ``compute_policy_loss_vanilla`` + ``agg_loss("token-mean")``; the
dynamic-sampling filter of ``recipe/dapo/dapo_ray_trainer.py`` ``RayDAPOTrainer.fit`` (tag v0.7.0,
``filter_groups.metric=acc``); overlong shaping of ``verl/workers/reward_manager/dapo.py``
(``DAPORewardManager``), and the script ``recipe/dapo/run_dapo_qwen2.5_32b.sh``.

Decisions:
  * Token-mean over the whole optimizer step (global token count), as every implementation does;
    the paper's per-group normalization is not used.
  * Dual clip c = 10 as in the verl DAPO script (the paper does not mention a dual clip).
  * The group filter runs on the *raw verifier outcome* (verl's ``acc``), not on the shaped reward,
    so a group whose only spread comes from the overlong penalty is dropped; singleton groups are
    kept (verl). ``filter_groups=False`` keeps everything.
  * Overlong shaping: for |y| > L_max the paper's −p (−1 with p = 1) is used; verl's linear
    formula would go below −p there, but verl truncates generation at L_max so it never happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    AdvantageInputs,
    Algorithm,
    FilterPolicy,
    LossInputs,
    Metrics,
    Needs,
    register,
)
from .common import (
    AGG_MODES,
    agg_loss,
    broadcast_advantages,
    check_choice,
    clipped_surrogate,
    finish_loss,
    global_counts,
    group_advantages,
    to_floats,
)


@dataclass
class DAPOConfig:
    """DAPO hyperparameters; paper symbols in brackets (DAPO §3; docs/algorithms.md § DAPO)."""

    clip_low: float = 0.2
    """[ε_low] lower clip (verl ``clip_ratio_low``; TRL ``epsilon``)."""
    clip_high: float = 0.28
    """[ε_high] clip-higher upper bound (verl ``clip_ratio_high``; TRL ``epsilon_high``)."""
    dual_clip_c: float | None = 10.0
    """[c] dual-clip bound for A < 0 (verl DAPO script ``clip_ratio_c=10``); None = off (TRL)."""
    log_ratio_clamp: float | None = 20.0
    """Clamp on λ = ℓ − ℓ^old before the exp (verl ≥ 0.4.1); None = off."""
    loss_agg_mode: str = "token-mean"
    """Token-level loss (paper §3.3; verl ``token-mean``; TRL ``loss_type="dapo"``)."""
    adv_eps: float = 1e-6
    """ε added to the group std in Â = (R − mean)/(std + ε) (verl 1e-6)."""
    filter_groups: bool = True
    """Dynamic sampling (paper §3.2): keep a group iff its raw outcomes are not all equal (or G = 1)."""
    max_num_gen_batches: int = 10
    """Generation batches drawn at most per step before giving up (verl script 10; ≤ 0 = unlimited)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (verl ``entropy_coeff``; the script uses 0)."""

    def __post_init__(self) -> None:
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 or None (got {self.dual_clip_c})")


def overlong_penalty(lengths_B: Tensor, max_len: int, cache_len: int, penalty_factor: float = 1.0) -> Tensor:
    """Soft overlong punishment R_len(|y|) of DAPO Eq. 13 (§3.4), scaled by p (docs/algorithms.md § DAPO).

      R_len = 0                                   if |y| ≤ L_max − L_cache
            = p·((L_max − L_cache) − |y|)/L_cache  if L_max − L_cache < |y| ≤ L_max
            = −p                                  if |y| > L_max  (paper; never reached in verl)

    verl ``DAPORewardManager``: min(−(|y| − (L_max − L_cache))/L_cache · p, 0), with |y| the valid
    response length (EOS included), added to the ±1 correctness reward on the last valid token.
    Args: ``lengths_B`` int/float [B]; ``max_len`` = L_max (``data.max_response_length``);
    ``cache_len`` = L_cache (``overlong_buffer.len``, 0 < L_cache ≤ L_max); ``penalty_factor`` = p.
    Returns float32 (or the input float dtype) [B], never positive.

    >>> overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4).tolist()
    [0.0, 0.0, -0.5, -1.0, -1.0]
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong shaping needs 0 < cache_len <= max_len (got {cache_len}, {max_len})")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0 (got {penalty_factor})")
    dtype = lengths_B.dtype if lengths_B.is_floating_point() else torch.float32
    length = lengths_B.to(torch.float64)
    expected = float(max_len - cache_len)
    pen = ((expected - length) / float(cache_len)).clamp(min=-1.0, max=0.0) * penalty_factor
    return pen.to(dtype)


@torch.no_grad()
def dapo_group_filter(raw_rewards_B: Tensor, group_ids_B: Tensor, cfg: DAPOConfig) -> Tensor:
    """Dynamic sampling: keep_i iff std(outcomes of i's group) > 0 or the group has one response.

    DAPO §3.2; verl ``RayDAPOTrainer.fit`` (``np.std(metric_vals) > 0 or len(metric_vals) == 1``).
    Runs on the raw verifier outcome (``acc``). std > 0 is tested as max ≠ min, which is
    exact (no floating-point mean involved). Shapes: [B], [B] → bool [B].
    """
    if not cfg.filter_groups:
        return torch.ones(raw_rewards_B.shape, dtype=torch.bool)
    r = raw_rewards_B.detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(r).all():
        raise ValueError("dapo_group_filter: non-finite raw outcome (handle reward failures upstream)")
    _, inv = torch.unique(group_ids_B.reshape(-1), return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    lo = torch.full((n,), math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    hi = torch.full((n,), -math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    size = torch.zeros(n, dtype=torch.int64).index_add_(0, inv, torch.ones_like(inv))
    keep_g = (hi > lo) | (size == 1)
    return keep_g[inv].reshape(raw_rewards_B.shape)


def dapo_needs(cfg: DAPOConfig) -> Needs:
    """Old log-probs only: no reference model (no KL); entropy only when its coef ≠ 0."""
    return Needs(old_logp=True, ref_logp=False, entropy=cfg.entropy_coef != 0.0)


def dapo_advantages(inp: AdvantageInputs, cfg: DAPOConfig) -> tuple[Tensor, Metrics]:
    """Â_{i,t} = m_{i,t}·(R_i − mean_g)/(std_g + ε) with R the shaped reward (DAPO Eq. 8; verl GRPO)."""
    adv_B = group_advantages(inp.rewards_B, inp.group_ids_B, scale="group", eps=cfg.adv_eps,
                             singleton="raw")
    metrics = {"adv_mean": adv_B.mean(), "adv_abs_max": adv_B.abs().max()}
    return broadcast_advantages(adv_B, inp.mask_B_T), to_floats(metrics)


def dapo_loss(inp: LossInputs, cfg: DAPOConfig) -> tuple[Tensor, Metrics]:
    """agg_token-mean(clipped surrogate with ε_low/ε_high) − c_H·agg(H); no KL (DAPO Eq. 8)."""
    if inp.old_logp_B_T is None:
        raise ValueError("DAPO loss needs old log-probs")
    counts = global_counts(inp)
    pg_B_T, m = clipped_surrogate(inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
                                  clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                  dual_clip_c=cfg.dual_clip_c, log_ratio_clamp=cfg.log_ratio_clamp)
    total = agg_loss(pg_B_T, inp.mask_B_T, cfg.loss_agg_mode, **counts)
    metrics: dict[str, Tensor | float] = {**m, "pg_loss": total.detach()}
    return finish_loss(total, metrics, inp, entropy_coef=cfg.entropy_coef, agg_mode=cfg.loss_agg_mode,
                       who="DAPO")


DAPO = register(Algorithm(
    name="dapo", config_cls=DAPOConfig, needs=dapo_needs, loss=dapo_loss,
    advantages=dapo_advantages, group_filter=dapo_group_filter, advantage_reads=frozenset(),
    # verl RayDAPOTrainer.fit: draw up to max_num_gen_batches (≤ 0 = unlimited), then raise.
    filter_policy=lambda cfg: FilterPolicy(max_rounds=max(0, cfg.max_num_gen_batches), on_short="raise"),
))

__all__ = ["DAPO", "DAPOConfig", "dapo_advantages", "dapo_group_filter", "dapo_loss", "dapo_needs",
           "overlong_penalty"]
