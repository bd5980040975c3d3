"""Triton row kernels of the fused log-prob / entropy / KL pass (the GPU twin of ``rlkit.kl_fused``).

The chunk loop of ``rlkit.kl_fused._sweep`` keeps the LM-head matmuls in cuBLAS and calls these two
row kernels on each [C, V] chunk of scaled logits, as Liger-Kernel's fused linear losses do:

* ``row_stats``: one online-softmax sweep over the vocabulary per row giving logsumexp, the
  selected-token log-prob, E_p[z] (for the entropy) and the exact KL against the chunk's
  reference log-probs — no [C, V] temporary at all.
* ``row_dlogits``: G = Σ_k c_k ∂out_k/∂z written in place over the logits buffer.

Formulas and the 0·log 0 = 0 conventions are those of ``rlkit.kl_fused._row_stats`` /
``rlkit.kl_fused._row_dlogits``, which are the oracle of tests/test_kl_triton.py. Triton is
optional: ``available(device)`` is False without it, and ``rlkit.kl_fused`` then stays on torch.

The same kernels run on CPU tensors through Triton's interpreter: start Python with
``TRITON_INTERPRET=1`` (the PyPI ``triton`` wheel installs beside the CPU torch wheel, no GPU
needed). The variable must be set before anything imports triton (transformers does), because
``triton.jit`` and Triton's own library functions read it once, when they are defined; then
``available("cpu")`` is True and the whole fused pass of ``rlkit.kl_fused`` runs these kernels on
CPU (tests/test_kl_triton.py, docs/gpu.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # optional dependency: only the CUDA path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

_BLOCK = 2048


def interpreting() -> bool:
    """True when Triton was imported for its CPU interpreter (``TRITON_INTERPRET=1`` from the
    start): its library functions and these kernels are then interpreted, never compiled."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_stats_kernel, InterpretedFunction)


def available(device: str | torch.device = "cuda") -> bool:
    """True when the kernels can run on ``device``: a CUDA device with compiled Triton, or CPU
    with Triton's interpreter (:func:`interpreting`)."""
    if triton is None:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return kind == "cpu" and interpreting()


if triton is not None:

    @triton.jit
    def _stats_kernel(Z, R, Y, LSE, LOGP, EZ, KL, V, stride_z, stride_r,
                      HAS_REF: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride_z
        r_row = R + row * stride_r
        # Every sum is taken relative to the running maximum m and rescaled when m grows, so
        # log-probs, E_p[z] and the KL are never differences of two numbers of the logits' size
        # (at logits near 3e4, fp32 spacing is 2e-3: lse − z_y would be exact to that and no better).
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)  # Σ e^{z−m}
        t = tl.zeros((), tl.float32)  # Σ e^{z−m}·(z − m)         (entropy: E_p[z] = m + t/s)
        u = tl.zeros((), tl.float32)  # Σ e^{z−m}·(z − m − r)     (reverse KL = u/s − log s)
        a = tl.zeros((), tl.float32)  # Σ q·(r − z + m)           (forward KL = a + log s·Σq)
        sq = tl.zeros((), tl.float32)  # Σ q (1 up to rounding; kept so the KL is exact)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < V
            z = tl.load(z_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
            live = z > float("-inf")
            m_new = tl.maximum(m, tl.max(z, 0))
            seen = m > float("-inf")
            scale = tl.where(seen, tl.exp(m - m_new), 0.0)
            shift = tl.where(seen, m - m_new, 0.0)  # moves the old terms from m to m_new
            zm = tl.where(live, z - m_new, 0.0)
            e = tl.where(live, tl.exp(zm), 0.0)
            if HAS_REF:
                r = tl.load(r_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
                if REVERSE:
                    u = scale * (u + shift * s) + tl.sum(tl.where(e > 0, e * (zm - r), 0.0), 0)
                else:
                    q = tl.exp(r)
                    a = a - shift * sq + tl.sum(tl.where(q > 0, q * (r - z + m_new), 0.0), 0)
                    sq += tl.sum(q, 0)
            t = scale * (t + shift * s) + tl.sum(e * zm, 0)
            s = s * scale + tl.sum(e, 0)
            m = m_new
        log_s = tl.log(s)
        y = tl.load(Y + row)
        tl.store(LSE + row, m + log_s)
        tl.store(LOGP + row, (tl.load(z_row + y).to(tl.float32) - m) - log_s)
        tl.store(EZ + row, m + t / s)
        if HAS_REF:
            if REVERSE:
                tl.store(KL + row, u / s - log_s)
            else:
                tl.store(KL + row, a + log_s * sq)

    @triton.jit
    def _dlogits_kernel(Z, R, Y, LSE, EZ, KL, C_LP, C_ENT, C_KL, V, stride_z, stride_r,
                        HAS_ENT: tl.constexpr, HAS_KL: tl.constexpr, REVERSE: tl.constexpr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col0 = tl.program_id(1) * BLOCK
        cols = col0 + tl.arange(0, BLOCK)
        inb = cols < V
        z_row = Z + row * stride_z
        z = tl.load(z_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        lse = tl.load(LSE + row)
        c_lp = tl.load(C_LP + row)
        live = z > float("-inf")
        z0 = tl.where(live, z, 0.0)
        p = tl.where(live, tl.exp(z0 - lse), 0.0)
        coef = tl.zeros((BLOCK,), tl.float32) - c_lp
        if HAS_ENT:
            coef += tl.load(C_ENT + row) * (tl.load(EZ + row) - z0)
        if HAS_KL:
            c_kl = tl.load(C_KL + row)
            r = tl.load(R + row * stride_r + cols, mask=inb, other=float("-inf")).to(tl.float32)
            if REVERSE:
                coef += c_kl * (z0 - lse - r - tl.load(KL + row))
        g = tl.where(p > 0, p * coef, 0.0)
        if HAS_KL and not REVERSE:
            g = g + c_kl * p - c_kl * tl.exp(r)
        y = tl.load(Y + row)
        g = tl.where(cols == y, g + c_lp, g)
        tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=inb)


def row_stats(z: Tensor, y: Tensor, r: Tensor | None, direction: str, want_entropy: bool):
    """Triton twin of ``rlkit.kl_fused._row_stats``; returns (None, lse, logp, ez | None, kl | None).

    No probability buffer is built (the CPU twin returns p); ``row_dlogits`` recomputes it.
    Shapes: z [C, V] (contiguous rows), y [C], r [C, V] reference log-probs or None.
    """
    c, v = z.shape
    f32 = {"dtype": torch.float32, "device": z.device}
    lse, logp, ez = torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(c, **f32)
    kl = torch.empty(c, **f32) if r is not None else None
    rr = r if r is not None else z
    _stats_kernel[(c,)](z, rr, y, lse, logp, ez, kl if kl is not None else ez, v, z.stride(0), rr.stride(0),
                        HAS_REF=r is not None, REVERSE=direction == "reverse", BLOCK=_BLOCK)
    ez = ez.to(z.dtype) if want_entropy else None
    return None, lse.to(z.dtype), logp.to(z.dtype), ez, None if kl is None else kl.to(z.dtype)


def row_dlogits(z, p, y, lse, ez, kl, r, direction, c_logp, c_ent, c_kl) -> Tensor:
    """Triton twin of ``rlkit.kl_fused._row_dlogits``: writes G over z and returns it (p is unused)."""
    c, v = z.shape
    dummy = lse
    rr = r if r is not None else z
    grid = (c, triton.cdiv(v, _BLOCK))
    _dlogits_kernel[grid](z, rr, y, lse, ez if ez is not None else dummy, kl if kl is not None else dummy,
                          c_logp.contiguous(), c_ent.contiguous() if c_ent is not None else dummy,
                          c_kl.contiguous() if c_kl is not None else dummy, v, z.stride(0), rr.stride(0),
                          HAS_ENT=c_ent is not None, HAS_KL=c_kl is not None, REVERSE=direction == "reverse",
                          BLOCK=_BLOCK)
    return z
