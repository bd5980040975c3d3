"""Pieces shared by the policy-gradient algorithms: loss aggregation, the clipped surrogate, the
group-normalized advantage, KL placed in the loss or in the reward, and the entropy bonus.

Formulas: docs/algorithms.md § Shared pieces (§ Clipped surrogate, § Loss aggregation, § Group
advantages, § KL in the loss or in the reward, § Entropy bonus). Reference implementation: verl
``verl/trainer/ppo/core_algos.py`` (``agg_loss``, ``compute_policy_loss_vanilla``,
``compute_grpo_outcome_advantage``) and ``ray_trainer.apply_kl_penalty``; TRL ``GRPOTrainer`` where
a function says so.

Shapes: B responses, T padded response length; ``mask_B_T`` is 1 on real response tokens (EOS
included) and 0 on padding. Every function here is pure (tensors and numbers in, tensors out).

Masking rule used throughout: masked positions may hold garbage (NaN, ±inf) in any input. Inputs
are replaced with 0 at masked positions by ``torch.where`` *before* any arithmetic, so neither the
value nor the gradient ever sees the garbage (a ``where`` applied only at the end would let a NaN
gradient through: 0 · ∂exp(NaN) = NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# check_choice is defined once, in the lower layer, and re-exported for the algorithms.
from rlkit.kl import check_choice, importance_weight, kl_estimate

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
             "token-sum")
ADV_SCALES = ("group", "batch", "none")
SINGLETON_RULES = ("raw", "zero")


def masked(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """``x`` with exact zeros at masked positions, in value and in gradient (``torch.where``)."""
    return torch.where(mask_B_T.bool(), x_B_T, torch.zeros((), dtype=x_B_T.dtype, device=x_B_T.device))


def masked_mean(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Σ m·x / max(Σ m, 1): a NaN-safe masked mean over all valid tokens (0 when none is valid)."""
    n = mask_B_T.bool().sum().clamp(min=1)
    return masked(x_B_T, mask_B_T).sum() / n


def agg_loss(
    loss_B_T: Tensor,
    mask_B_T: Tensor,
    mode: str,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar by one of the five modes of verl ``agg_loss``.

    docs/algorithms.md § Loss aggregation. With N = Σ m, S = number of rows with Σ_t m > 0,
    n_i = Σ_t m_{i,t}:

    ==========================  ============================================================
    ``token-mean`` (DAPO)       Σ_{i,t} m·L / N
    ``seq-mean-token-sum``      (1/S) Σ_i Σ_t m·L
    ``seq-mean-token-mean``     (1/S) Σ_i [Σ_t m·L / n_i]      (GRPO paper; empty row → 0)
    ``seq-mean-token-sum-norm`` (1/S) Σ_i Σ_t m·L / T_norm     (Dr. GRPO)
    ``token-sum``               Σ_{i,t} m·L                    (verl ≥ 0.9.0; no normalizer)
    ==========================  ============================================================

    ``num_tokens`` / ``num_seqs`` are the *global* N and S of the whole optimizer step (all
    micro-batches and data-parallel ranks). Each micro-batch then returns its share and the sum of
    the micro-batch results equals the full-batch loss, with the same gradient (verl ≥ 0.7.0
    ``batch_num_tokens`` / ``global_batch_size``; TRL ``loss_type="dapo"``). ``None`` uses the local
    counts (verl with one micro-batch and one rank). Rows are counted only when non-empty (verl ≥
    0.6.1); TRL ``loss_type="grpo"`` would count empty rows too. ``token-sum`` has no normalizer and
    ignores both counts: the micro-batch sums already add up to the full-batch sum (verl returns
    ``masked_sum × dp_size``; here the dp_size factor is the learner's, as for every mode, below).

    Data parallelism: the contract is "Σ over all micro-batches of all ranks = full-batch loss".
    DDP/DeepSpeed *average* gradients over the dp ranks, so a learner that backpropagates this value
    on each rank must multiply it by dp_size (verl's ``* dp_size`` inside ``agg_loss``), and must not
    let the engine divide again by the accumulation steps.

    ``seq-mean-token-sum-norm`` follows verl ≥ 0.7.1 (with the division by S) and takes T_norm =
    ``max_response_len``, a true constant, never the padded width (which changes per batch and would
    break micro-batch invariance). It equals TRL ``dr_grpo`` when no row is empty.

    A zero denominator (no valid token at all) gives 0, not verl ≥ 0.7.0's inf/NaN. Garbage at
    masked positions never leaks (module docstring).

    Shapes: loss_B_T, mask_B_T: [B, T]; returns a 0-dim tensor of ``loss_B_T``'s dtype.
    """
    check_choice("loss_agg_mode", mode, AGG_MODES)
    keep = mask_B_T.bool()
    per_tok = masked(loss_B_T, keep)
    if mode == "token-mean":
        n = float(keep.sum()) if num_tokens is None else float(num_tokens)
        return per_tok.sum() / n if n > 0 else per_tok.sum() * 0.0
    if mode == "token-sum":
        return per_tok.sum()
    n_i = keep.sum(-1)
    row_sum = per_tok.sum(-1)
    if mode == "seq-mean-token-sum":
        per_row = row_sum
    elif mode == "seq-mean-token-mean":
        per_row = row_sum / n_i.clamp(min=1).to(per_tok.dtype)
    else:
        if max_response_len is None or max_response_len <= 0:
            raise ValueError("loss_agg_mode 'seq-mean-token-sum-norm' needs max_response_len > 0")
        per_row = row_sum / float(max_response_len)
    s = float((n_i > 0).sum()) if num_seqs is None else float(num_seqs)
    return per_row.sum() / s if s > 0 else per_row.sum() * 0.0


def clipped_surrogate(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
    log_ratio_clamp: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO loss max(−A·s, −A·clip(s, 1−ε_low, 1+ε_high)), dual-clipped at −c·A for A < 0.

    PPO (Schulman et al. 2017, arXiv 1707.06347) with the dual clip of Ye et al. 2020 (arXiv
    1912.09729); docs/algorithms.md § Clipped surrogate.
    Matches verl ``compute_policy_loss_vanilla`` (≥ 0.4.1) before aggregation:
      λ = clamp(ℓ − ℓ^old, ±``log_ratio_clamp``), s = e^λ; L1 = −A·s; L2 = −A·clip(s);
      L = max(L1, L2), and for A < 0: L = min(L, −c·A).
    ``dual_clip_c=None`` gives TRL's loss (no dual clip); ``log_ratio_clamp=None`` matches TRL and
    the older verl/RPG forks, which do not clamp λ.

    Gradient: −A·s·∇ℓ where no clip is active; exactly 0 where the clipped branch is taken (s >
    1+ε_high with A > 0, s < 1−ε_low with A < 0, s > c with A < 0, or |λ| beyond the clamp). A and
    ℓ^old are constants (detached here, as verl's callers do).

    Metrics (0-dim detached tensors, local masked means over tokens): ``pg_clipfrac`` = mean[L2 > L1],
    ``ppo_kl`` = mean[−λ] (k1 estimate of KL(π_old‖π_θ)), ``pg_clipfrac_lower`` = mean[(max(L1,L2) >
    −c·A) ∧ (A < 0)] (0 when the dual clip is off).

    Shapes: all inputs [B, T]; returns (loss_B_T with zeros at masked positions, metrics).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c}); use None to disable")
    keep = mask_B_T.bool()
    # Sanitize first (module docstring): a masked token gets λ = 0, A = 0, hence loss 0, grad 0.
    lam = masked(logp_B_T - masked(old_logp_B_T.detach(), keep), keep)
    adv = masked(advantages_B_T.detach(), keep)
    if log_ratio_clamp is not None:
        lam = lam.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(lam)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # torch.where (not torch.maximum) so that the gradient goes to exactly one branch.
    clipped = loss2 > loss1
    loss_clip = torch.where(clipped, loss2, loss1)
    if dual_clip_c is not None:
        loss3 = -adv * dual_clip_c
        lower = (adv < 0) & (loss_clip > loss3)
        loss = torch.where(lower, loss3, loss_clip)
    else:
        lower = torch.zeros_like(keep)
        loss = loss_clip
    loss = masked(loss, keep)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(clipped.to(lam.dtype), keep),
            "ppo_kl": masked_mean(-lam, keep),
            "pg_clipfrac_lower": masked_mean(lower.to(lam.dtype), keep),
        }
    return loss, metrics


def _group_index(group_ids_B: Tensor) -> tuple[Tensor, int]:
    uniq, inv = torch.unique(group_ids_B, return_inverse=True)
    return inv, int(uniq.numel())


@torch.no_grad()
def group_advantages(
    rewards_B: Tensor,
    group_ids_B: Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "raw",
) -> Tensor:
    """Group-relative outcome advantage A_i = (r_i − mean_g) / (std + ε).

    Shao et al., DeepSeekMath (arXiv 2402.03300) §4.1.2; docs/algorithms.md § Group advantages.
    Matches verl ``compute_grpo_outcome_advantage`` (per-sequence scalar, before broadcasting) and
    TRL ``GRPOTrainer`` advantage arithmetic:
      * ``scale="group"``: std = the group's Bessel (n−1) std (verl ``norm_adv_by_std_in_grpo=True``;
        TRL ``scale_rewards="group"``);
      * ``scale="batch"``: std = the Bessel std of the whole batch, mean still the group's (TRL);
      * ``scale="none"``: A = r − mean_g (Dr. GRPO; verl ``norm_adv_by_std_in_grpo=False``).
    ε: verl 1e-6 (default), TRL 1e-4.

    One-sample groups (no baseline exists): ``singleton="raw"`` (verl) sets mean 0 and std 1, so
    A = r/(1+ε) with group scaling (r/(std_batch+ε) with batch scaling, r with none);
    ``singleton="zero"`` (TRL) gives A = 0.
    A group whose rewards are all equal gets A = 0 *exactly* (its numerator is forced to 0, so the
    floating-point error of the mean never becomes a tiny nonzero advantage). Under batch scaling a
    batch of one reward uses std 1.

    Shapes: rewards_B float [B], group_ids_B int [B] (any ids; groups need not be contiguous);
    returns [B] in ``rewards_B``'s float dtype (float32 for integer rewards). Computed in float64.
    """
    check_choice("advantage scale", scale, ADV_SCALES)
    check_choice("singleton rule", singleton, SINGLETON_RULES)
    out_dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.float32
    r = rewards_B.detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(r).all():
        raise ValueError("group_advantages: non-finite reward (reward failures must be handled upstream)")
    inv, n_groups = _group_index(group_ids_B.reshape(-1))
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r) / count
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, (r - mean[inv]) ** 2)
    std_g = torch.sqrt(sq / (count - 1).clamp(min=1))
    lo = torch.full((n_groups,), math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    hi = torch.full((n_groups,), -math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    single = (count == 1)[inv]
    num = torch.where((lo == hi)[inv], torch.zeros_like(r), r - mean[inv])
    num = torch.where(single, r, num)  # singleton "raw": mean := 0
    if scale == "group":
        std = torch.where(single, torch.ones_like(r), std_g[inv])
        adv = num / (std + eps)
    elif scale == "batch":
        std_b = r.std() if r.numel() > 1 else torch.ones((), dtype=torch.float64)
        adv = num / (std_b + eps)
    else:
        adv = num
    if singleton == "zero":
        adv = torch.where(single, torch.zeros_like(adv), adv)
    return adv.to(out_dtype).reshape(rewards_B.shape)


@torch.no_grad()
def mean_baseline_advantages(rewards_B: Tensor, group_ids_B: Tensor, *, baseline: str = "group") -> Tensor:
    """A_i = r_i − b with b the group mean (``"group"``) or the batch mean (``"batch"``); no std.

    The RPG advantage (docs/algorithms.md § RPG): RPG repo ``compute_rpg_outcome_advantage``
    (group; a singleton has mean 0, so A = r) and ``compute_rpg_batchmean_outcome_advantage``
    (batch). An all-equal group gives exactly 0. Shapes: [B] → [B].
    """
    check_choice("baseline", baseline, ("group", "batch"))
    if baseline == "group":
        return group_advantages(rewards_B, group_ids_B, scale="none", singleton="raw")
    out_dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.float32
    r = rewards_B.detach().to(torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("mean_baseline_advantages: non-finite reward")
    return (r - r.mean()).to(out_dtype)


def broadcast_advantages(adv_B: Tensor, mask_B_T: Tensor) -> Tensor:
    """Outcome advantage per token: A_{i,t} = A_i·m_{i,t} (verl returns advantages pre-masked)."""
    return masked(adv_B.detach().unsqueeze(-1).expand(mask_B_T.shape).to(adv_B.dtype), mask_B_T)


@torch.no_grad()
def kl_in_reward(
    rewards_B: Tensor,
    old_logp_B_T: Tensor,
    ref_logp_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    beta: float,
    kind: str = "k1",
    log_ratio_clamp: float | None = 20.0,
    value_clamp: float | None = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL as a detached reward: r'_i = r_i − β·Σ_t m·kl(ℓ^old, ℓ^ref)_t.

    docs/algorithms.md § KL in the loss or in the reward.

    verl ``ray_trainer.apply_kl_penalty`` (``algorithm.use_kl_in_reward``, ``kl_penalty="kl"`` = k1)
    subtracts β·kl per token from the token rewards; GRPO's outcome advantage then sums the token
    rewards, which is this per-sequence sum. As a detached reward, k1 gives the correct reverse-KL
    score-function gradient (docs/algorithms.md § KL estimators). Evaluated at π_old, the policy
    that sampled the tokens.

    Shapes: rewards_B [B]; log-probs and mask [B, T]; returns (rewards_B, {"kl_reward_mean":
    token-mean KL, "kl_reward_seq_mean": mean per-sequence sum}).
    """
    kl_B_T = kl_estimate(old_logp_B_T, ref_logp_B_T, kind, mask=mask_B_T,
                         log_ratio_clamp=log_ratio_clamp, value_clamp=value_clamp)
    seq_kl_B = kl_B_T.sum(-1)
    out = rewards_B.to(kl_B_T.dtype) - beta * seq_kl_B
    return out, {"kl_reward_mean": masked_mean(kl_B_T, mask_B_T), "kl_reward_seq_mean": seq_kl_B.mean()}


def kl_loss_term(
    logp_B_T: Tensor,
    ref_logp_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    kind: str,
    agg_mode: str,
    old_logp_B_T: Tensor | None = None,
    is_weight: str = "none",
    log_ratio_clamp: float | None = 20.0,
    value_clamp: float | None = 10.0,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_response_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """agg(s·kl(ℓ, ℓ^ref)): a KL estimate used directly as a loss term.

    docs/algorithms.md § KL in the loss or in the reward; s as in § KL estimators (off-policy).

    verl ``use_kl_loss`` (``kl_loss_type``; ``is_weight="none"``) and TRL ``beta > 0`` (k3 ×
    differentiable ``coef_1`` when ``use_bias_correction_kl``: ``is_weight="differentiable"``).
    The estimate goes through :func:`rlkit.kl.kl_estimate`; s through
    :func:`rlkit.kl.importance_weight` (needs ``old_logp_B_T`` unless ``"none"``). Not multiplied by β.

    Shapes: [B, T] inputs; returns (aggregated 0-dim loss, detached per-token mean of the KL value).
    """
    kl_B_T = kl_estimate(logp_B_T, ref_logp_B_T, kind, mask=mask_B_T,
                         log_ratio_clamp=log_ratio_clamp, value_clamp=value_clamp)
    term = kl_B_T
    if is_weight != "none":
        if old_logp_B_T is None:
            raise ValueError(f"is_weight={is_weight!r} needs old log-probs")
        s = importance_weight(masked(logp_B_T, mask_B_T), masked(old_logp_B_T, mask_B_T), is_weight,
                              log_ratio_clamp=log_ratio_clamp)
        term = s * kl_B_T
    value = agg_loss(term, mask_B_T, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                     max_response_len=max_response_len)
    return value, masked_mean(kl_B_T.detach(), mask_B_T)


def entropy_bonus(
    entropy_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    coef: float,
    agg_mode: str,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """−coef·agg(H): the entropy term added to the loss (verl ``entropy_coeff``).

    docs/algorithms.md § Entropy bonus. H is differentiable (from ``rlkit.kl.entropy_from_logits``
    or the fused pass) and is aggregated with the same mode and global counts as the PG loss, as
    verl's ``ppo_loss`` does (≥ 0.7.1).
    Shapes: [B, T] → 0-dim.
    """
    return -coef * agg_loss(entropy_B_T, mask_B_T, agg_mode, num_tokens=num_tokens,
                            num_seqs=num_seqs, max_response_len=max_response_len)


def global_counts(inp) -> dict:
    """The normalizers of ``agg_loss`` for one micro-batch of ``LossInputs`` (global counts)."""
    return {"num_tokens": inp.num_tokens_global, "num_seqs": inp.num_seqs_global,
            "max_response_len": inp.max_response_len or None}


def finish_loss(total: Tensor, metrics: dict, inp, *, entropy_coef: float, agg_mode: str,
                who: str) -> tuple[Tensor, dict[str, float]]:
    """Add −coef·agg(H) when ``entropy_coef`` ≠ 0, record ``loss``, return floats."""
    if entropy_coef != 0.0:
        if inp.entropy_B_T is None:
            raise ValueError(f"{who} with entropy_coef != 0 needs the entropy pass")
        ent = entropy_bonus(inp.entropy_B_T, inp.mask_B_T, coef=entropy_coef, agg_mode=agg_mode,
                            **global_counts(inp))
        total = total + ent
        metrics["entropy_loss"] = ent.detach()
    metrics["loss"] = total.detach()
    return total, to_floats(metrics)


def to_floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Metrics dict of 0-dim tensors → plain Python floats (the ``Metrics`` type of ``base``)."""
    return {k: float(v) for k, v in metrics.items()}


__all__ = [
    "ADV_SCALES", "AGG_MODES", "SINGLETON_RULES", "agg_loss", "broadcast_advantages", "check_choice",
    "clipped_surrogate", "entropy_bonus", "group_advantages", "kl_in_reward", "kl_loss_term",
    "masked", "masked_mean", "mean_baseline_advantages", "to_floats",
]
