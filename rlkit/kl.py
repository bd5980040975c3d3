"""The one KL kernel of rlkit: every KL quantity of every algorithm goes through this module.

Formulas, directions and gradient semantics: docs/algorithms.md § KL estimators and § Exact
full-vocabulary KL and entropy.

Two layers here, smallest first:

* ``kl_estimate`` — per-token sample estimators on log-probs ``[B, T]`` (k1/k2/k3/abs, the
  straight-through "+" forms, forward k1/k3, the RPG family), plus ``importance_weight`` and
  ``tempered_logp``.
* ``full_kl`` / ``entropy_from_logits`` — exact per-position quantities over the vocabulary from
  full ``[..., V]`` tensors, chunked over positions.

The third layer, the fused chunked pass from hidden states and the LM head (``fused_token_logprobs``,
``fused_token_loss``, ``FusedOut``), lives in ``rlkit.kl_fused``; those names are still importable
from here.

Sign conventions: Δ = logp − ref_logp, ρ = exp(−Δ) = q/π_θ, w = exp(Δ) = π_θ/q, where q is the
comparison distribution (reference, teacher, π_old, or a tempered reference).
The module imports with torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Chunk of positions for the exact full-vocabulary helpers: bounds the temporaries to chunk × V.
DEFAULT_CHUNK = 1024

_BASE_KINDS = ("k1", "k2", "k3", "abs")
KINDS: tuple[str, ...] = (
    *_BASE_KINDS,
    "k1+", "k2+", "k3+", "abs+",
    "forward_k1", "forward_k3",
    "rpg_fkl", "rpg_rkl", "rpg_ufkl", "rpg_urkl",
)
# Kinds whose value goes through an exp of the log-ratio: these take the log-ratio clamp before
# the exp and the value clamp after it (verl clamps only k3, RAPO's forward k3 clamps like verl,
# the RPG code value-clamps rkl/ufkl/urkl). k1, k2, abs and rpg_fkl are never clamped, matching
# verl and the RPG code.
_EXP_KINDS = frozenset({"k3", "forward_k1", "forward_k3", "rpg_rkl", "rpg_ufkl", "rpg_urkl"})
IS_MODES: tuple[str, ...] = ("none", "detached", "differentiable")


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` and the valid choices if ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _base_value(delta: Tensor, kind: str) -> Tensor:
    """Value of one base estimator from the (already clamped) log-ratio Δ = logp − ref_logp."""
    if kind == "k1":
        return delta
    if kind == "abs":
        return delta.abs()
    if kind == "k2":
        return 0.5 * delta.square()
    if kind == "k3":  # ρ − 1 − log ρ with ρ = e^{−Δ}
        return torch.expm1(-delta) + delta
    if kind == "forward_k1":  # ρ·log ρ = −ρΔ
        return -torch.exp(-delta) * delta
    if kind == "forward_k3":  # ρ·log ρ − ρ + 1
        rho = torch.exp(-delta)
        return -rho * delta - torch.expm1(-delta)
    if kind == "rpg_fkl":  # −log w
        return -delta
    if kind == "rpg_rkl":  # w·log w
        return torch.exp(delta) * delta
    if kind == "rpg_ufkl":  # w − log w − 1
        return torch.expm1(delta) - delta
    if kind == "rpg_urkl":  # w·(log w − 1) + 1
        return torch.exp(delta) * (delta - 1.0) + 1.0
    raise ValueError(f"unknown KL kind {kind!r}; valid: {', '.join(KINDS)}")


def kl_estimate(
    logp: Tensor,
    ref_logp: Tensor,
    kind: str,
    *,
    mask: Tensor | None = None,
    log_ratio_clamp: float | None = 20.0,
    value_clamp: float | None = 10.0,
) -> Tensor:
    """Per-token KL estimate from log-probs of the same tokens, Δ = logp − ref_logp.

    docs/algorithms.md § KL estimators. Estimators: Schulman 2020, "Approximating KL Divergence";
    Tang & Munos, arXiv 2506.09477; RPG, arXiv 2505.17508 Tables 1/4 and Appendix D. Matches verl
    ``kl_penalty`` (k1/k2/k3/abs and "+", verl ≥ 0.8.0) and the RPG repo's ``kl_penalty`` ``rpg_*``
    types.

    ==============  =====================  =====================================================
    kind            value                  gradient when used directly as a loss term
    ==============  =====================  =====================================================
    k1              Δ                      E_π[∇k1] = 0: pure noise; put k1 in the *reward*
                                           (detached), where E[SG(k1)∇ℓ] = ∇KL(π‖q)
    k2              ½Δ²                    E_π[∇k2] = ∇KL(π‖q) (per token, on-policy)
    k3              e^{−Δ} + Δ − 1         E_π[∇k3] = ∇KL(q‖π): the *forward*-KL gradient,
                                           although its value estimates KL(π‖q)
    abs             |Δ|                    sign(Δ)∇ℓ; not a KL estimate (KL-Cov's penalty)
    k1+ k2+ k3+     value of the base,     k2 − SG(k2) + SG(base): the k2 gradient, so
    abs+            gradient of ½Δ²        ∇KL(π‖q) on-policy (verl's straight-through fix)
    forward_k1      ρ·log ρ = −ρΔ          estimates KL(q‖π) from samples of π (RAPO)
    forward_k3      ρ·log ρ − ρ + 1        estimates KL(q‖π), ≥ 0; gradient −ρ log ρ ∇ℓ
    rpg_fkl         −log w                 samples of q: E_q[∇] = ∇KL(q‖π)
    rpg_rkl         w·log w                samples of q: E_q[∇] = ∇KL(π‖q)
    rpg_ufkl        w − log w − 1          samples of q: E_q[∇] = ∇KL(q‖π)
    rpg_urkl        w(log w − 1) + 1       samples of q: E_q[∇] = ∇KL(π‖q)
    ==============  =====================  =====================================================

    (ρ = e^{−Δ} = q/π, w = e^{Δ} = π/q; for the RPG kinds q is π_old, "iterative reference".)

    Off-policy (samples from π_old): multiply by ``importance_weight(logp, old_logp, mode)``.
    ``"differentiable"`` s·k3 gives exactly ∇KL(π‖q) (TRL ``use_bias_correction_kl``, DeepSeek-V3.2
    arXiv 2512.02556); ``"detached"`` SG(s)·k2 gives ∇KL(π‖q); SG(s)·k3 stays biased.
    Sequences (Tang & Munos): summing per-token k2/k3+ gives the per-token *partial* gradient, as verl and
    TRL do; the full sequence gradient would use k1 as reward-to-go. Kept on purpose for parity.

    Clamps: for the kinds that exponentiate the log-ratio (k3, forward k1/k3, rpg_rkl,
    rpg_ufkl, rpg_urkl) Δ is clamped to ±``log_ratio_clamp`` before the exp and the value to
    ±``value_clamp`` after; the gradient is 0 where a clamp is active. k1, k2, abs and rpg_fkl are
    never clamped (verl and RPG don't). ``None`` switches a clamp off. Parity: verl = defaults;
    TRL = both ``None``; RPG = ``log_ratio_clamp=None`` (we default to clamping, a documented
    divergence from the RPG code, which can overflow). The straight-through gradient
    (½Δ²) is never clamped, as in verl.

    Masking: positions with ``mask == 0`` are exactly 0 in value and gradient, whatever garbage
    (NaN, ±inf) the inputs hold there (inputs are sanitized with ``torch.where`` before any op).

    Shapes: logp, ref_logp, mask: [B, T] (any matching shape works); returns [B, T].
    """
    check_choice("KL kind", kind, KINDS)
    if mask is not None:
        keep = mask.bool()
        logp = torch.where(keep, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        ref_logp = torch.where(keep, ref_logp, torch.zeros((), dtype=ref_logp.dtype, device=ref_logp.device))
    delta = logp - ref_logp
    base = kind.rstrip("+")
    clamped = base in _EXP_KINDS
    d = delta.clamp(-log_ratio_clamp, log_ratio_clamp) if clamped and log_ratio_clamp is not None else delta
    value = _base_value(d, base)
    if clamped and value_clamp is not None:
        value = value.clamp(-value_clamp, value_clamp)
    if kind.endswith("+"):
        surrogate = 0.5 * delta.square()  # k2's gradient, Δ·∇ℓ; the value is the base's
        value = surrogate - surrogate.detach() + value.detach()
    if mask is not None:
        value = torch.where(mask.bool(), value, torch.zeros((), dtype=value.dtype, device=value.device))
    return value


def importance_weight(
    logp: Tensor, old_logp: Tensor, mode: str, *, log_ratio_clamp: float | None = 20.0
) -> Tensor:
    """Importance ratio s = exp(logp − old_logp) = π_θ/π_old per token (docs/algorithms.md § KL estimators).

    ``"none"`` → ones; ``"detached"`` → SG(s); ``"differentiable"`` → s with its gradient
    s·∇ℓ (the TRL ≥ 1.10 default ``use_bias_correction_kl``; with k3 it is the unbiased
    off-policy reverse-KL gradient). The log-ratio is clamped to ±``log_ratio_clamp`` before the
    exp (verl's ±20 on λ), so s never overflows. Shapes: [B, T] → [B, T].
    """
    check_choice("importance-weight mode", mode, IS_MODES)
    if mode == "none":
        return torch.ones_like(logp)
    lam = logp - old_logp
    if log_ratio_clamp is not None:
        lam = lam.clamp(-log_ratio_clamp, log_ratio_clamp)
    s = torch.exp(lam)
    return s.detach() if mode == "detached" else s


def tempered_logp(
    ref_logp: Tensor,
    phi: float,
    *,
    ref_logits: Tensor | None = None,
    normalized: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """log q_φ(y) of the tempered comparison q_φ = softmax(φ·log q) at the given tokens.

    Exact: φ·log q(y) − logsumexp_v(φ·log q(v)); with log q = z − lse(z) for the reference
    logits z this is φ·log q(y) − lse(φz) + φ·lse(z), computed in chunks of positions. Cheap
    (``normalized=False``): φ·log q(y), dropping the normalizer, which overstates q_φ for φ < 1.
    RAPO (arXiv 2510.03865; docs/algorithms.md § RAPO) has no public code; the default is exact.
    The result carries no gradient (q is a fixed comparison distribution).

    Shapes: ref_logp [B, T]; ref_logits [B, T, V] (temperature already applied); returns [B, T].
    """
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"tempering exponent phi must be in [0, 1], got {phi}")
    ref_logp = ref_logp.detach()
    if not normalized:
        return phi * ref_logp
    if ref_logits is None:
        raise ValueError("tempered_logp(normalized=True) needs ref_logits [B, T, V]; "
                         "pass normalized=False for the cheap φ·log q variant")
    z = ref_logits.detach().reshape(-1, ref_logits.shape[-1])
    log_norm = torch.empty(z.shape[0], dtype=torch.float32 if z.dtype != torch.float64 else z.dtype,
                           device=z.device)
    for s in range(0, z.shape[0], chunk_size):
        zc = z[s:s + chunk_size].to(log_norm.dtype)
        log_norm[s:s + chunk_size] = torch.logsumexp(phi * zc, -1) - phi * torch.logsumexp(zc, -1)
    return phi * ref_logp - log_norm.reshape(ref_logp.shape).to(ref_logp.dtype)


def _xlogy_diff(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """Σ_v a_v (log a_v − log b_v) over the last dim from log-probs, with 0·log 0 = 0.

    Where a_v = 0 (log a_v = −inf) the term is 0 and, because the inputs are replaced before any
    op, so is its gradient (no 0·inf NaN). Where b_v = 0 < a_v the result is +inf, as it should be.
    """
    dead = torch.isneginf(logp_a)
    a = torch.where(dead, torch.zeros((), dtype=logp_a.dtype, device=logp_a.device), logp_a)
    b = torch.where(dead, torch.zeros((), dtype=logp_b.dtype, device=logp_b.device), logp_b)
    return (torch.exp(a) * (a - b)).masked_fill(dead, 0.0).sum(-1)


def full_kl(
    logp_full: Tensor,
    ref_logp_full: Tensor,
    direction: str,
    *,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Exact per-position KL over the vocabulary from two log-softmaxes (docs/algorithms.md § Exact
    full-vocabulary KL and entropy).

    ``"reverse"``: KL(π‖q) = Σ_v π(v)(log π(v) − log q(v)).
    ``"forward"``: KL(q‖π) = Σ_v q(v)(log q(v) − log π(v)) — TDPO's sequential-KL term.
    Inputs must be log-probs (``log_softmax`` outputs), never ``log(softmax)``, which gives NaN
    where a probability underflows. 0·log 0 is taken as 0 (xlogy), so −inf entries are safe.
    Differentiable in both inputs (detach the reference yourself). verl raises on "full"; this is
    the formula, computed in chunks of ``chunk_size`` positions to bound temporaries.

    Shapes: logp_full, ref_logp_full [B, T, V] (or [N, V]); mask [B, T]; returns [B, T].
    """
    check_choice("KL direction", direction, ("reverse", "forward"))
    lead = logp_full.shape[:-1]
    a = logp_full.reshape(-1, logp_full.shape[-1])
    b = ref_logp_full.reshape(-1, ref_logp_full.shape[-1])
    if direction == "forward":
        a, b = b, a
    pieces = [_xlogy_diff(a[s:s + chunk_size], b[s:s + chunk_size]) for s in range(0, a.shape[0], chunk_size)]
    out = (torch.cat(pieces) if pieces else a.new_zeros(0)).reshape(lead)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _entropy_rows(z: Tensor) -> Tensor:
    """H = logsumexp(z) − Σ_v softmax(z)_v·z_v per row, with −inf logits contributing 0."""
    lse = torch.logsumexp(z, -1, keepdim=True)
    dead = torch.isneginf(z)
    z_safe = torch.where(dead, torch.zeros((), dtype=z.dtype, device=z.device), z)
    p = torch.exp(z_safe - lse).masked_fill(dead, 0.0)
    return lse.squeeze(-1) - (p * z_safe).sum(-1)


def entropy_from_logits(logits: Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Entropy of softmax(logits) per position, H = logsumexp(z) − Σ_v p_v z_v = −Σ_v p_v log p_v.

    docs/algorithms.md § Exact full-vocabulary KL and entropy. Matches verl
    ``verl.utils.torch_functional.entropy_from_logits`` and TRL ``trl.trainer.utils.entropy_from_logits``
    (chunks of rows). Pass temperature-scaled logits.
    Differentiable; computed in fp32 for bf16/fp16 inputs; −inf logits (masked vocabulary) are
    handled without NaN. Shapes: logits [..., V] → [...].
    """
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    pieces = [_entropy_rows(z[s:s + chunk_size]) for s in range(0, z.shape[0], chunk_size)]
    return (torch.cat(pieces) if pieces else z.new_zeros(0)).reshape(lead)


# The fused pass lives in rlkit.kl_fused, which imports check_choice from here; importing it
# lazily keeps the older import path ``rlkit.kl.fused_token_logprobs`` (and the row functions that
# tests/test_kl_triton.py compares with their CUDA twins) working without an import cycle.
_FUSED_NAMES = frozenset({"FusedOut", "KL_DIRECTIONS", "fused_token_logprobs", "fused_token_loss",
                          "_row_stats", "_row_dlogits"})


def __getattr__(name: str):
    if name in _FUSED_NAMES:
        from rlkit import kl_fused
        return getattr(kl_fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
