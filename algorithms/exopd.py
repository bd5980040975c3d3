"""G-OPD / ExOPD: PPO on the dense per-token advantage A_t = λ·log π*(y_t) + (1−λ)·log π_ref(y_t) − log π_old(y_t).

Paper: Yang et al., "Learning beyond Teacher: Generalized On-Policy Distillation with Reward
Extrapolation", arXiv 2602.12125, Eq. 22 (discount 0). Formulas, defaults and decisions:
docs/algorithms.md § G-OPD / ExOPD. Reference implementation: the authors' verl fork
(PraMamba/G-OPD @ 208daab, algorithm code from ea72caa), ``DataParallelPPOActor.update_policy``
block ``only_reverse_kl_advantages`` (inlined: formula-level parity), with verl's
``compute_policy_loss_vanilla`` + ``agg_loss`` (token-mean).

G-OPD maximizes E_{y~π_θ}[λ·log(π*/π_ref) − KL(π_θ‖π_ref)], whose optimum is π ∝ π*^λ·π_ref^(1−λ):
λ = 1 is on-policy distillation (π_ref cancels: A_t = log π* − log π_old, the negative reverse k1
to the teacher); 0 < λ < 1 interpolates; **λ > 1 is ExOPD** (reward extrapolation, 1.25 in the
paper's script). Written with the kernel's reverse k1 at the student's tokens,
  A_t = −λ·k1(π_old‖π*)_t + (λ−1)·k1(π_old‖π_ref)_t,
a detached reward (reward placement of the KL), so the score-function gradient of k1 is the
correct reverse-KL gradient (docs/algorithms.md § KL estimators). The loss is verl's clipped
surrogate (ε = 0.2, dual clip c = 3, λ-log-ratio clamp ±20) aggregated token-mean with the global
token count. At ratio 1 (ℓ^old = SG[ℓ], the released one-mini-batch setting) the gradient is
−A_t·∇ℓ_t per token.

Decisions:
* λ ≠ 1 needs reference log-probs. The reference code silently ignores λ when no base model is
  configured; here ``reference=None`` with λ ≠ 1 fails at config construction, ``needs()`` asks
  for ``ref_logp`` exactly when λ ≠ 1 (tolerance 1e−9, not float equality), and the advantage
  raises if the runtime did not provide them.
* Off-policy mini-batches: ``advantage_policy="old"`` (default, reference parity) keeps A_t from
  π_old; ``"current"`` recomputes A_t in the loss from SG[ℓ] of the current policy, the paper's
  on-policy A_t.
* ``reference`` names the reference model role: ``student_init`` (default choice of the paper) or
  ``teacher_base`` (the paper's "reward correction" for strong-to-weak distillation). The run config
  maps it to a model; the algorithm only needs its log-probs.

Shapes: B responses, T padded response length; all log-probs are of the student's sampled tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.kl import kl_estimate

from .base import AdvantageInputs, Algorithm, LossInputs, Metrics, Needs, register
from .common import (
    AGG_MODES,
    agg_loss,
    check_choice,
    clipped_surrogate,
    masked,
    masked_mean,
    to_floats,
)

LAMBDA_TOL = 1e-9
REFERENCES = ("student_init", "teacher_base")
ADVANTAGE_POLICIES = ("old", "current")


@dataclass
class ExOPDConfig:
    """G-OPD / ExOPD hyperparameters (paper symbols in brackets; reference config names in quotes)."""

    lam: float = 1.0
    """[λ] reward-scaling / extrapolation coefficient, "lambda_vals": 1 = OPD, > 1 = ExOPD (1.25)."""
    reference: str | None = None
    """[π_ref] ``student_init`` | ``teacher_base`` | None; required (not None) when λ ≠ 1."""
    advantage_policy: str = "old"
    """Policy whose log-prob enters A_t: ``old`` (π_old, reference parity) or ``current`` (SG[π_θ])."""
    clip_low: float = 0.2
    """[ε_low] PPO clip, "clip_ratio_low"."""
    clip_high: float = 0.2
    """[ε_high] PPO clip, "clip_ratio_high"."""
    dual_clip_c: float | None = 3.0
    """[c] dual clip for A < 0, "clip_ratio_c" (None: off)."""
    loss_agg_mode: str = "token-mean"
    """verl ``loss_agg_mode`` (the scripts use token-mean)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lam (λ) must be finite and >= 0, got {self.lam}")
        if self.reference is not None:
            check_choice("reference", self.reference, REFERENCES)
        if self.needs_reference and self.reference is None:
            raise ValueError(
                f"lam (λ) = {self.lam} ≠ 1 needs a reference policy: set reference to one of "
                f"{list(REFERENCES)} (with λ = 1 the reference cancels and is not needed)")
        check_choice("advantage_policy", self.advantage_policy, ADVANTAGE_POLICIES)
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)

    @property
    def needs_reference(self) -> bool:
        return abs(self.lam - 1.0) > LAMBDA_TOL


@torch.no_grad()
def gopd_token_advantages(
    policy_logp_B_T: Tensor,
    teacher_logp_B_T: Tensor,
    ref_logp_B_T: Tensor | None,
    mask_B_T: Tensor,
    *,
    lam: float,
) -> Tensor:
    """A_t = λ·log π* + (1−λ)·log π_ref − log π (paper Eq. 22), via the kernel's reverse k1.

    ``policy_logp_B_T`` is log π_old (or SG of the current policy). With |λ − 1| ≤ 1e−9 the
    reference is not used (A_t = −k1(π‖π*)); otherwise it is required. No clamps: the reference
    code uses the raw log-probs. Shapes: [B, T] → [B, T], zero at masked positions.
    """
    kw = {"mask": mask_B_T, "log_ratio_clamp": None, "value_clamp": None}
    kl_teacher = kl_estimate(policy_logp_B_T, teacher_logp_B_T, "k1", **kw)
    if abs(lam - 1.0) <= LAMBDA_TOL:
        return -kl_teacher
    if ref_logp_B_T is None:
        raise ValueError(f"G-OPD with λ = {lam} ≠ 1 needs reference log-probs (ref_logp_B_T is None)")
    kl_ref = kl_estimate(policy_logp_B_T, ref_logp_B_T, "k1", **kw)
    return -lam * kl_teacher + (lam - 1.0) * kl_ref


def exopd_advantages(inp: AdvantageInputs, cfg: ExOPDConfig) -> tuple[Tensor, Metrics]:
    """Per-token G-OPD advantage at π_old; the verifiable reward, if any, is ignored."""
    if inp.old_logp_B_T is None or inp.teacher_logp_B_T is None:
        raise ValueError("exopd needs old and teacher log-probs (Needs.old_logp, Needs.teacher_logp)")
    adv = gopd_token_advantages(inp.old_logp_B_T, inp.teacher_logp_B_T, inp.ref_logp_B_T,
                                inp.mask_B_T, lam=cfg.lam)
    m = inp.mask_B_T
    metrics = {"gopd/adv_mean": masked_mean(adv, m),
               "gopd/kl_teacher_k1": masked_mean(kl_estimate(inp.old_logp_B_T, inp.teacher_logp_B_T,
                                                             "k1", mask=m, value_clamp=None), m)}
    return adv, to_floats(metrics)


def exopd_loss(inp: LossInputs, cfg: ExOPDConfig) -> tuple[Tensor, Metrics]:
    """agg(clipped surrogate with A_t), token-mean over ``num_tokens_global`` (module docstring)."""
    if inp.old_logp_B_T is None:
        raise ValueError("exopd needs old log-probs (Needs.old_logp)")
    adv = inp.advantages_B_T
    if cfg.advantage_policy == "current":
        if inp.teacher_logp_B_T is None:
            raise ValueError("advantage_policy='current' needs teacher log-probs in the loss pass")
        adv = gopd_token_advantages(inp.logp_B_T.detach(), inp.teacher_logp_B_T, inp.ref_logp_B_T,
                                    inp.mask_B_T, lam=cfg.lam)
    per_tok, metrics = clipped_surrogate(
        inp.logp_B_T, inp.old_logp_B_T, adv, inp.mask_B_T,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c)
    loss = agg_loss(per_tok, inp.mask_B_T, cfg.loss_agg_mode, num_tokens=inp.num_tokens_global,
                    num_seqs=inp.num_seqs_global, max_response_len=inp.max_response_len or None)
    metrics["gopd/adv_mean"] = masked_mean(masked(adv.detach(), inp.mask_B_T), inp.mask_B_T)
    return loss, to_floats(metrics)


def exopd_needs(cfg: ExOPDConfig) -> Needs:
    """Teacher log-probs always; reference log-probs exactly when λ ≠ 1."""
    return Needs(old_logp=True, teacher_logp=True, ref_logp=cfg.needs_reference)


EXOPD = register(Algorithm(name="exopd", config_cls=ExOPDConfig, needs=exopd_needs,
                           loss=exopd_loss, advantages=exopd_advantages,
                           advantage_reads=frozenset({"old_logp", "ref_logp", "teacher_logp"})))
