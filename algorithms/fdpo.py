"""f-DPO: L = −log σ(β·[s(l_w) − s(l_l)]), DPO with the reverse KL replaced by an f-divergence.

Paper: Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints", arXiv 2309.16240 (ICLR 2024), Theorem 1 / Eq. 8. Formulas, defaults and
decisions: docs/algorithms.md § f-DPO.

Objective: max E[r] − β·D_f(π_θ‖π_ref). The KKT condition gives r = β·f′(π/π_ref) + const(x); the
constant cancels in the Bradley–Terry *difference*, so DPO's β·log-ratio becomes β·f′(u) with
u = π_θ(y|x)/π_ref(y|x), log u = l = ℓ_θ(y) − ℓ_ref(y) (sequence sums). Scores s(l) = f′(e^l) with
additive constants dropped (they cancel):

    reverse_kl   f(u) = u log u        s = l                      (= standard DPO)
    forward_kl   f(u) = −log u         s = −e^{−l}
    js           Jensen–Shannon        s = log σ(l)               (= log(2u/(1+u)) − log 2)
    alpha        α-divergence, α∈(0,1) s = −e^{−α·l}/α            (α→0: reverse KL; α→1: forward)

Reference implementation: huggingface/trl ``DPOTrainer._compute_loss`` (1.x, inlined; formula-level
parity only) and ``DPOTrainer.dpo_loss`` (TRL ≤ 0.28).

α convention (decision): rlkit uses the **paper's** α, as TRL ≤ 0.28 did. TRL ≥ 0.29
scores with (e^{(α'−1)l} − 1)/(α'−1), i.e. **α_TRL = 1 − α_paper**; the two agree at 0.5, which is
our default (and TRL ≥ 0.29's). TRL ≤ 0.28's default 1.0 meant forward KL; TRL ≥ 0.29's 1.0 means
reverse KL.

Overflow (decision): sequence log-ratios are sums over hundreds of tokens, so e^{−l}
overflows. Every exponent is computed in at least fp32 and clamped to ≤ ``exp_clamp`` (80, TRL's α
clamp) before the exp, for forward KL too (TRL HEAD leaves forward KL unclamped: −inf − −inf = NaN).
Where the clamp is active that pair's score gradient is 0.

Only pairwise-*difference* losses are valid for f ≠ reverse KL (the const(x) cancels only in the
chosen − rejected difference); ``loss_type``
accepts ``sigmoid`` (with optional cDPO label smoothing) and ``hinge`` and rejects anything else at
construction.

Shapes: P pairs, T padded length; per-token log-probs ``*_P_T`` and masks; loss is a 0-dim tensor
equal to the pair-sum divided by ``num_pairs_global`` (exact under micro-batching / data parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Algorithm, Metrics, Needs, PairLossInputs, register
from .common import check_choice, masked

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
LOSS_TYPES = ("sigmoid", "hinge")


@dataclass
class FDPOConfig:
    """f-DPO hyperparameters (paper symbols in brackets)."""

    beta: float = 0.1
    """[β] strength of the divergence constraint (TRL ``beta`` default 0.1)."""
    divergence: str = "reverse_kl"
    """[f] one of reverse_kl (= DPO, the default), forward_kl, js, alpha."""
    alpha: float = 0.5
    """[α] α-divergence parameter in the paper's convention, α ∈ (0, 1): α→0 reverse KL, α→1
    forward KL. TRL ≥ 0.29 ``f_alpha_divergence_coef`` = 1 − α. Used only when divergence=alpha."""
    loss_type: str = "sigmoid"
    """Pairwise-difference loss on z = β(s_w − s_l): ``sigmoid`` −log σ(z) or ``hinge`` relu(1 − z)."""
    label_smoothing: float = 0.0
    """[ε] cDPO / robust label noise for ``sigmoid``: (1−ε)·softplus(−z) + ε·softplus(z)."""
    exp_clamp: float = 80.0
    """Upper clamp on every exponent before exp (fp32-safe; TRL's α-branch value)."""

    def __post_init__(self) -> None:
        check_choice("f-DPO divergence", self.divergence, DIVERGENCES)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"f-DPO loss_type {self.loss_type!r} is not supported: only pairwise-difference losses "
                f"keep the f-DPO reparameterization valid; valid: {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.divergence == "alpha" and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) (paper convention), got {self.alpha}; "
                             "use divergence='reverse_kl' (α→0) or 'forward_kl' (α→1) for the limits")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")


def fdpo_score(logratio_P: Tensor, divergence: str, *, alpha: float = 0.5, exp_clamp: float = 80.0) -> Tensor:
    """s(l) = f′(e^l) up to an additive constant (paper Table 1).

    Exponents are clamped to ≤ ``exp_clamp`` and evaluated in ≥ fp32, so the score is finite for
    any finite l. Shapes: [P] → [P] (fp32, or fp64 for fp64 input).
    """
    check_choice("f-DPO divergence", divergence, DIVERGENCES)
    l = logratio_P if logratio_P.dtype == torch.float64 else logratio_P.float()
    if divergence == "reverse_kl":
        return l
    if divergence == "js":
        return F.logsigmoid(l)
    a = 1.0 if divergence == "forward_kl" else alpha
    return -torch.exp(torch.clamp(-a * l, max=exp_clamp)) / a


def _f32(x: Tensor) -> Tensor:
    """Half-precision log-probs are summed in fp32 (sequence sums of hundreds of tokens)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _seq_logratio(logp_P_T: Tensor, ref_logp_P_T: Tensor, mask_P_T: Tensor) -> Tensor:
    """l = Σ_t m·(ℓ_θ − ℓ_ref): the sequence log-ratio (masked by ``where``, garbage-safe)."""
    return (masked(_f32(logp_P_T), mask_P_T) - masked(_f32(ref_logp_P_T.detach()), mask_P_T)).sum(-1)


def fdpo_pair_loss(lw_P: Tensor, ll_P: Tensor, cfg: FDPOConfig) -> tuple[Tensor, Tensor]:
    """Per-pair f-DPO loss from the chosen/rejected sequence log-ratios; returns (loss_P, z_P)."""
    kw = {"alpha": cfg.alpha, "exp_clamp": cfg.exp_clamp}
    z = cfg.beta * (fdpo_score(lw_P, cfg.divergence, **kw) - fdpo_score(ll_P, cfg.divergence, **kw))
    if cfg.loss_type == "hinge":
        return torch.relu(1.0 - z), z
    eps = cfg.label_smoothing
    return (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z), z


def fdpo_loss(inp: PairLossInputs, cfg: FDPOConfig) -> tuple[Tensor, Metrics]:
    """Σ_pairs −log σ(β[s(l_w) − s(l_l)]) / num_pairs_global (docs/algorithms.md § f-DPO).

    Only the reference log-probs are constant; the gradient flows through the exp in
    the score. Metrics (local means, TRL names): rewards/chosen = β·l_w, rewards/rejected = β·l_l,
    rewards/margins, rewards/accuracies (l_w > l_l), and the f-margin z.
    """
    lw = _seq_logratio(inp.logp_c_P_T, inp.ref_logp_c_P_T, inp.mask_c_P_T)
    ll = _seq_logratio(inp.logp_r_P_T, inp.ref_logp_r_P_T, inp.mask_r_P_T)
    loss_P, z = fdpo_pair_loss(lw, ll, cfg)
    loss = loss_P.sum() / max(float(inp.num_pairs_global), 1.0)
    with torch.no_grad():
        rc, rr = cfg.beta * lw, cfg.beta * ll
        metrics = {
            "rewards/chosen": float(rc.mean()) if rc.numel() else 0.0,
            "rewards/rejected": float(rr.mean()) if rr.numel() else 0.0,
            "rewards/margins": float((rc - rr).mean()) if rc.numel() else 0.0,
            "rewards/accuracies": float((rc > rr).float().mean()) if rc.numel() else 0.0,
            "fdpo/z_mean": float(z.mean()) if z.numel() else 0.0,
        }
    return loss, metrics


def fdpo_needs(cfg: FDPOConfig) -> Needs:
    """Preference pairs with reference log-probs; no π_old (offline), no full-vocab pass."""
    return Needs(old_logp=False, ref_logp=True, pairs=True)


FDPO = register(Algorithm(name="fdpo", config_cls=FDPOConfig, needs=fdpo_needs, loss=fdpo_loss,
                          advantage_reads=frozenset()))
