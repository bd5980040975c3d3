"""TDPO: L = −log σ(β·[u − α·(D_r − SG[D_w])]), DPO with each response's sequential forward KL.

Paper: Zeng et al., "Token-level Direct Preference Optimization", arXiv 2404.11999 (ICML 2024),
Eq. 18 (TDPO1) and Eq. 20 (TDPO2). Formulas, defaults and decisions: docs/algorithms.md § TDPO.
Reference implementation: Vance0124/Token-level-Direct-Preference-Optimization @ 2a736ec,
``trainers.py`` ``tdpo_loss`` and ``_tdpo_get_batch_logps`` (matched formula by formula).

Per response y (chosen w / rejected l), summed over response tokens:
  margin(y) = ℓ_θ(y) − ℓ_ref(y)
  D(y) = D_SeqKL(x, y; π_ref‖π_θ) = Σ_t m_t·KL(π_ref(·|s_t) ‖ π_θ(·|s_t))   (exact, full vocabulary)
and u = margin(y_w) − margin(y_l):
  TDPO1: L = −log σ(β·[u − (D_l − D_w)])
  TDPO2: L = −log σ(β·[u − α·(D_l − SG[D_w])])

The stop-gradient is the point of TDPO2: in TDPO1 ∂L/∂D_w = −β(1 − σ(z)) < 0, so training *raises*
the chosen-side KL; TDPO2 keeps D_w in the value but cuts that gradient, and scales the rejected
side by α.

The per-token KL comes from the kernel: the learner computes KL(π_ref‖π_θ) exactly over the
vocabulary from two log-softmaxes (``rlkit.kl.full_kl(..., "forward")`` or the fused pass) and
hands it over as ``ref_full_kl_{c,r}_P_T`` (``Needs.ref_full_kl``). The reference code takes
``log(softmax)`` of the reference and gets NaN when a reference probability underflows; the kernel's
xlogy form stays finite (docs/algorithms.md § Exact full-vocabulary KL and entropy).

Default (decision): TDPO2 (``variant="tdpo2"``, α = 0.5, β = 0.1) — the README's recommendation and
the function default of the reference code; its YAML default is TDPO1 (``if_tdpo2: false``).
``reference_free`` of the reference YAML is ignored by its loss and is not offered.

Shapes: P pairs, T padded response length; every ``*_P_T`` aligned with its mask; the loss is the
pair-sum divided by ``num_pairs_global`` (exact under micro-batching / data parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Algorithm, Metrics, Needs, PairLossInputs, register
from .common import check_choice, masked

VARIANTS = ("tdpo1", "tdpo2")


@dataclass
class TDPOConfig:
    """TDPO hyperparameters (paper symbols in brackets; reference ``config/loss/tdpo.yaml``)."""

    beta: float = 0.1
    """[β] KL-constraint strength (reference default 0.1)."""
    alpha: float = 0.5
    """[α] weight of the rejected-side sequential KL in TDPO2 (reference default 0.5). Unused by TDPO1."""
    variant: str = "tdpo2"
    """``tdpo2`` (default; README, function default) or ``tdpo1`` (reference YAML default)."""

    def __post_init__(self) -> None:
        check_choice("TDPO variant", self.variant, VARIANTS)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def tdpo_pair_loss(
    margin_w_P: Tensor, margin_l_P: Tensor, seqkl_w_P: Tensor, seqkl_l_P: Tensor, cfg: TDPOConfig
) -> tuple[Tensor, Tensor]:
    """Per-pair TDPO loss from per-sequence margins and sequential KLs; returns (loss_P, z_P).

    Mirrors the reference ``tdpo_loss(chosen_logps_margin, rejected_logps_margin,
    chosen_position_kl, rejected_position_kl, beta, alpha, if_tdpo2)``: z = β·(u − δ) with
    δ = D_l − D_w (TDPO1) or α·(D_l − SG[D_w]) (TDPO2); loss = −log σ(z) = softplus(−z).
    """
    u = margin_w_P - margin_l_P
    if cfg.variant == "tdpo1":
        delta = seqkl_l_P - seqkl_w_P
    else:
        delta = cfg.alpha * (seqkl_l_P - seqkl_w_P.detach())
    z = cfg.beta * (u - delta)
    return F.softplus(-z), z


def _seq_sums(logp_P_T: Tensor, ref_logp_P_T: Tensor, kl_P_T: Tensor, mask_P_T: Tensor) -> tuple[Tensor, Tensor]:
    """(margin_P, seqKL_P): masked sums over response tokens (labels −100 ↔ mask 0 contribute 0).

    Half-precision inputs are summed in fp32, as the reference upcasts its logits.
    """
    f32 = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    margin = (masked(f32(logp_P_T), mask_P_T) - masked(f32(ref_logp_P_T.detach()), mask_P_T)).sum(-1)
    return margin, masked(f32(kl_P_T), mask_P_T).sum(-1)


def tdpo_loss(inp: PairLossInputs, cfg: TDPOConfig) -> tuple[Tensor, Metrics]:
    """Σ_pairs TDPO loss / num_pairs_global (paper Eq. 18 / 20), with the kernel's exact per-token KL.

    Metrics (local means, reference names): rewards/chosen and rewards/rejected = β·(margin + D),
    detached; rewards/accuracies; kl/chosen, kl/rejected and kl/margin = D_l − D_w.
    """
    if inp.ref_full_kl_c_P_T is None or inp.ref_full_kl_r_P_T is None:
        raise ValueError("tdpo needs the exact per-token KL(π_ref‖π_θ) (ref_full_kl_c_P_T / "
                         "ref_full_kl_r_P_T); Needs.ref_full_kl must be honoured by the learner")
    mw, dw = _seq_sums(inp.logp_c_P_T, inp.ref_logp_c_P_T, inp.ref_full_kl_c_P_T, inp.mask_c_P_T)
    ml, dl = _seq_sums(inp.logp_r_P_T, inp.ref_logp_r_P_T, inp.ref_full_kl_r_P_T, inp.mask_r_P_T)
    loss_P, z = tdpo_pair_loss(mw, ml, dw, dl, cfg)
    loss = loss_P.sum() / max(float(inp.num_pairs_global), 1.0)
    with torch.no_grad():
        rc, rr = cfg.beta * (mw + dw), cfg.beta * (ml + dl)
        n = rc.numel()
        metrics = {
            "rewards/chosen": float(rc.mean()) if n else 0.0,
            "rewards/rejected": float(rr.mean()) if n else 0.0,
            "rewards/accuracies": float((rc > rr).float().mean()) if n else 0.0,
            "kl/chosen": float(dw.mean()) if n else 0.0,
            "kl/rejected": float(dl.mean()) if n else 0.0,
            "kl/margin": float((dl - dw).mean()) if n else 0.0,
            "tdpo/z_mean": float(z.mean()) if n else 0.0,
        }
    return loss, metrics


def tdpo_needs(cfg: TDPOConfig) -> Needs:
    """Preference pairs, reference log-probs and the differentiable exact full-vocab KL."""
    return Needs(old_logp=False, ref_logp=True, ref_full_kl=True, pairs=True)


TDPO = register(Algorithm(name="tdpo", config_cls=TDPOConfig, needs=tdpo_needs, loss=tdpo_loss,
                          advantage_reads=frozenset()))
