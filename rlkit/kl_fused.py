"""The fused chunked pass: hidden states and LM head to token log-probs, entropy and exact KL.

Given final hidden states h [N, D] at the positions that score response tokens and the LM head
W [V, D] (optional bias), it computes, chunk of rows by chunk of rows and never building [N, V]:

* log π(y_n) = z_{n,y} − logsumexp(z_n), z = (h Wᵀ + b)/T (the ``log_softmax → gather`` of TRL's
  ``selective_log_softmax`` and verl's ``logprobs_from_logits``);
* optionally the entropy H_n = logsumexp(z_n) − Σ_v p_v z_v;
* optionally the exact KL per position against a reference distribution given as its own hidden
  states and head, or as logits (``"forward"`` = KL(q‖π), TDPO's; ``"reverse"`` = KL(π‖q)).

The formulas, with the 0·log 0 = 0 conventions, are those of docs/algorithms.md § Exact
full-vocabulary KL and entropy; the memory pattern is that of Liger-Kernel's fused linear losses.
The per-row work of each chunk (``_row_stats``, ``_row_dlogits``) has a Triton twin in
``rlkit.kl_triton``, used for fp32 chunks on CUDA when Triton is importable (and on CPU under
Triton's interpreter, ``TRITON_INTERPRET=1``).

Three entry points, with different backward strategies:

* ``fused_token_logprobs`` returns the per-token values; its custom backward does not know the
  upstream gradients in advance, so it recomputes each chunk's logits (four LM-head matmuls in
  all). ``rlkit.logprobs.token_stats`` calls it for the no-grad reference and teacher passes, and
  the learner for the losses that ``fused_stats_loss`` does not fit (preference pairs, top-k/top-p
  support, a loss found not to be a sum of per-token terms).
* ``fused_token_loss`` takes a per-token loss function and contracts each token's gradient into
  dh and dW inside the forward sweep (three matmuls, no logits kept). bench/kl_bench.py (N = 4096,
  D = 576, V = 49152, fp32, 2 shared CPU cores) measured it at 0.5–0.8x the time and 0.08x the peak
  memory of the full-logits path, the recompute path at 0.9–2x the time.
* ``fused_stats_loss`` (in :mod:`rlkit.kl_stats_loss`, built on this module's sweep) is the learner's
  loss pass (``rlkit.logprobs.token_loss``): the same three
  matmuls for a loss given as a function of the whole per-token vectors (an algorithm's loss on
  [B, T] tensors), with per-token coefficients probed chunk by chunk and checked against the exact
  ones after the sweep; where they differ (a loss that is not a sum of per-token terms) a
  correction sweep over the differing rows makes the gradient exact.

The module imports with torch only; Triton is imported lazily by the CUDA path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.kl import check_choice

KL_DIRECTIONS: tuple[str, ...] = ("forward", "reverse")
# Auto chunk: rows per chunk so one fp32 [chunk, V] buffer is about 64 MB (256 rows at V = 49152).
# Measured on a shared 2-core CPU (noisy): 256 and 512 rows ran the LM-head matmuls fastest, 128
# up to ~2x slower on the forward one. The log-prob-only peak is one such buffer plus dW (V × D)
# and dh (N × D): ~190 MB at N = 4096, V = 49152, against ~2.3 GB for the full-logits path.
_CHUNK_BYTES = 64 * 2**20


@dataclass
class FusedOut:
    """Per-token outputs of the fused pass, shape [N]. None for quantities not asked for.

    logp_N: log π(y_n | s_n) at temperature; entropy_N: H(π(·|s_n)); kl_N: exact per-position KL
    against the reference distribution in the requested direction.
    """

    logp_N: Tensor
    entropy_N: Tensor | None = None
    kl_N: Tensor | None = None


@dataclass
class _Ref:
    """The reference distribution of the fused pass: its own hidden+head, or its logits."""

    hidden_N_D: Tensor | None
    weight_V_D: Tensor | None
    logits_N_V: Tensor | None
    direction: str
    _weight: Tensor | None = None  # the head in the accumulation dtype, converted once

    def log_probs(self, rows: slice, temperature: float, dtype: torch.dtype) -> Tensor:
        """log q for a chunk of rows [C, V], at the same temperature as the policy, no gradient."""
        if self.logits_N_V is not None:
            z = self.logits_N_V[rows].detach().to(dtype)
        else:
            if self._weight is None or self._weight.dtype != dtype:
                self._weight = self.weight_V_D.detach().to(dtype)
            z = self.hidden_N_D[rows].detach().to(dtype) @ self._weight.t()
        if temperature != 1.0:
            z = z / temperature
        return torch.log_softmax(z, -1)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 accumulation for half/bf16 inputs, fp64 stays fp64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(v: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        chunk_size = max(16, min(4096, _CHUNK_BYTES // (4 * max(v, 1))))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size


def _masked_dot(w: Tensor, x: Tensor) -> Tensor:
    """Σ_v w·x per row [C], a term with w = 0 counted as 0 (so w = 0 against x = ±∞ is 0, not NaN).

    The plain product-sum first (two passes over [C, V]); only the rows it left NaN, where some
    w = 0 met an infinite x or either held a NaN, are summed again under ``where(w > 0, …)``. Equal
    to the ``where`` sum on every row (the same products in the same order; a masked term is 0
    instead of −0)."""
    out = (w * x).sum(-1)
    bad = torch.isnan(out)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        wr = w.index_select(0, rows)
        out[rows] = torch.where(wr > 0, wr * x.index_select(0, rows), torch.zeros((), dtype=w.dtype, device=w.device)).sum(-1)
    return out


def _row_stats(z: Tensor, y: Tensor, r: Tensor | None, direction: str, want_entropy: bool):
    """Per-row softmax statistics of scaled logits z [C, V] (may hold −inf) at labels y [C].

    Returns (p [C,V], lse, logp, ez = Σ p·z or None, kl or None); p overwrites z when neither
    entropy nor KL is asked (z is then dead). All reductions treat p = 0 or
    q = 0 terms as 0 (xlogy), so masked vocabulary entries never give NaN. The CUDA twin of this
    function is ``rlkit.kl_triton.row_stats``.
    """
    m = z.amax(-1, keepdim=True)  # a row with every entry −inf is not a distribution: NaN
    z_y = z.gather(1, y[:, None]).squeeze(1)
    # Log-prob only: p overwrites z, so one [C, V] buffer is all the chunk needs.
    p = z.sub(m) if (want_entropy or r is not None) else z.sub_(m)
    p.exp_()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    lse = (m + total.log()).squeeze(1)
    logp = z_y - lse
    ez = _masked_dot(p, z) if want_entropy else None
    kl = None
    if r is not None and direction == "forward":  # Σ q (log q − log π)
        kl = _masked_dot(torch.exp(r), r - z + lse[:, None])
    elif r is not None:  # Σ π (log π − log q)
        kl = _masked_dot(p, z - lse[:, None] - r)
    return p, lse, logp, ez, kl


def _row_dlogits(z, p, y, lse, ez, kl, r, direction, c_logp, c_ent, c_kl) -> Tensor:
    """G = Σ_k c_k ∂out_k/∂z for one chunk, [C, V]; overwrites p. c_* are per-row [C] or None.

    ∂logp/∂z = onehot(y) − p;  ∂H/∂z = p ⊙ (E_p[z] − z);  forward ∂KL(q‖π)/∂z = p − q;
    reverse ∂KL(π‖q)/∂z = p ⊙ (log p − log q − KL).
    """
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    coef = -c_logp[:, None]  # the p-proportional part, [C, 1] or [C, V]
    if c_ent is not None:
        coef = coef + c_ent[:, None] * (ez[:, None] - z)
    if c_kl is not None and direction == "forward":
        coef = coef + c_kl[:, None]
    elif c_kl is not None:
        coef = coef + c_kl[:, None] * (z - lse[:, None] - r - kl[:, None])
    if coef.shape[1] == 1:
        g = p.mul_(coef)  # logp-only: no [C, V] temporary beyond p itself
    else:
        g = torch.where(p > 0, p * coef, zero)
    if c_kl is not None and direction == "forward":
        g.sub_(c_kl[:, None] * torch.exp(r))
    return g.scatter_add_(1, y[:, None], c_logp[:, None].to(g.dtype))


_SCRATCH: dict[tuple, Tensor] = {}


def _logits_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A [rows, cols] buffer for a chunk's logits, kept from chunk to chunk and sweep to sweep on the
    CPU (None elsewhere: CUDA's caching allocator already reuses the block). A fresh ~50 MB
    allocation per chunk is above malloc's mmap threshold, so each one came back from the kernel as
    new pages and was faulted in again as the matmul wrote it. Nothing outlives its chunk: the
    sweep keeps only per-row outputs and the dh/dW/db contractions."""
    if device.type != "cpu":
        return None
    key = (dtype, cols)
    buf = _SCRATCH.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _SCRATCH[key] = torch.empty(rows, cols, dtype=dtype, device=device)
    return buf[:rows]


def _chunk_backend(device: torch.device, dtype: torch.dtype):
    """(row_stats, row_dlogits): the Triton kernels for fp32 chunks (fp32, bf16 and fp16 inputs)
    where they run (CUDA; CPU under ``TRITON_INTERPRET=1``, how CI tests them), else torch."""
    if dtype == torch.float32:
        try:
            from rlkit import kl_triton
            if kl_triton.available(device):
                return kl_triton.row_stats, kl_triton.row_dlogits
        except ImportError:
            pass
    return _row_stats, _row_dlogits


def _sweep(h, W, b, y, ref: _Ref | None, temperature, chunk, want_entropy, coef_fn=None, need=(True, True)):
    """One pass over token chunks: per-token stats and, when ``coef_fn`` is given, the gradients.

    Per chunk: z = (h_c Wᵀ + b)/T in fp32 (fp64 stays fp64); the reference log-probs of the
    chunk; row statistics; then, with per-token upstream coefficients from ``coef_fn``, the
    logits gradient G and its contractions dh_c = G W / T, dW += Gᵀ h_c / T, db += Σ G / T.
    Nothing of size N × V ever exists. Returns (logp, entropy, kl, dh, dW, db); absent → None.
    """
    n, v = h.shape[0], W.shape[0]
    acc = _acc_dtype(h)
    Wa = W.detach().to(acc)
    ba = None if b is None else b.detach().to(acc)
    row_stats, row_dlogits = _chunk_backend(h.device, acc)
    direction = ref.direction if ref is not None else "forward"
    logp = torch.empty(n, dtype=acc, device=h.device)
    ent = torch.empty_like(logp) if want_entropy else None
    kl = torch.empty_like(logp) if ref is not None else None
    dh = dW = db = None
    if coef_fn is not None:
        dh = torch.empty(n, h.shape[1], dtype=acc, device=h.device) if need[0] else None
        # dW and db are written by the first chunk and accumulated by the rest (no zero fill of V × D).
        alloc = torch.empty if n else torch.zeros  # no chunk at all: the gradient is zero
        dW = alloc(v, h.shape[1], dtype=acc, device=h.device) if need[1] else None
        db = alloc(v, dtype=acc, device=h.device) if (b is not None and need[1]) else None
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        hc = h[rows].detach().to(acc)
        out = _logits_buffer(hc.shape[0], v, acc, h.device)
        z = torch.mm(hc, Wa.t(), out=out) if ba is None else torch.addmm(ba, hc, Wa.t(), out=out)
        if temperature != 1.0:
            z.div_(temperature)
        r = ref.log_probs(rows, temperature, acc) if ref is not None else None
        p, lse, lp, ez, k = row_stats(z, y[rows], r, direction, want_entropy)
        logp[rows] = lp
        h_c = None if ez is None else lse - ez
        if ent is not None:
            ent[rows] = h_c
        if kl is not None:
            kl[rows] = k
        if coef_fn is None:
            continue
        c_lp, c_ent, c_kl = coef_fn(rows, lp, h_c, k)
        g = row_dlogits(z, p, y[rows], lse, ez, k, r, direction, c_lp, c_ent, c_kl)
        del z, p, r
        if temperature != 1.0:
            g.div_(temperature)
        if dh is not None:
            torch.mm(g, Wa, out=dh[rows])
        if dW is not None:
            torch.mm(g.t(), hc, out=dW) if s == 0 else dW.addmm_(g.t(), hc)
        if db is not None:
            torch.sum(g, 0, out=db) if s == 0 else db.add_(g.sum(0))
        del g  # free before the next chunk's logits are allocated: one [C, V] buffer at a time
    return logp, ent, kl, dh, dW, db


def _grads_as_coefs(g_lp, g_ent, g_kl, n, like):
    """Upstream gradients of (logp, entropy, kl) as the per-token coefficients of the sweep."""
    zeros = torch.zeros(n, dtype=like.dtype, device=like.device)
    g_lp = zeros if g_lp is None else g_lp.to(like.dtype)
    g_ent = None if g_ent is None else g_ent.to(like.dtype)
    g_kl = None if g_kl is None else g_kl.to(like.dtype)
    return lambda rows, *_: (g_lp[rows], None if g_ent is None else g_ent[rows], None if g_kl is None else g_kl[rows])


class _FusedLogprobs(torch.autograd.Function):
    """Autograd wrapper: forward sweep without gradients, backward sweep that recomputes logits."""

    @staticmethod
    def forward(ctx, h, W, b, y, ref, temperature, chunk, want_entropy):
        logp, ent, kl, *_ = _sweep(h, W, b, y, ref, temperature, chunk, want_entropy)
        ctx.save_for_backward(h, W, b, y)
        ctx.set_materialize_grads(False)  # unused outputs give None: their terms are skipped, so an
        # infinite reverse KL (π > 0 = q) cannot turn a zero coefficient into NaN
        ctx.ref, ctx.temperature, ctx.chunk, ctx.want_entropy = ref, temperature, chunk, want_entropy
        empty = logp.new_empty(0)
        return logp, (ent if ent is not None else empty), (kl if kl is not None else empty)

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_kl):
        h, W, b, y = ctx.saved_tensors
        g_ent = g_ent if ctx.want_entropy else None
        g_kl = g_kl if ctx.ref is not None else None
        coefs = _grads_as_coefs(g_lp, g_ent, g_kl, h.shape[0], torch.empty(0, dtype=_acc_dtype(h), device=h.device))
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        *_, dh, dW, db = _sweep(h, W, b, y, ctx.ref, ctx.temperature, ctx.chunk, ctx.want_entropy,
                                coefs, need)
        return (None if dh is None else dh.to(h.dtype), None if dW is None else dW.to(W.dtype),
                None if db is None else db.to(b.dtype), None, None, None, None, None)


class _FusedLoss(torch.autograd.Function):
    """Gradient-in-forward: the loss's per-token gradients are contracted inside the forward sweep."""

    @staticmethod
    def forward(ctx, h, W, b, y, ref, temperature, chunk, want_entropy, token_loss_fn):
        total = torch.zeros((), dtype=_acc_dtype(h), device=h.device)

        def coef_fn(rows, lp, ent, kl):
            nonlocal total
            leaves = [None if t is None else t.detach().requires_grad_() for t in (lp, ent, kl)]
            with torch.enable_grad():
                loss_C = token_loss_fn(rows, *leaves)
                live = [t for t in leaves if t is not None]
                grads = iter(torch.autograd.grad(loss_C.sum(), live, allow_unused=True))
            total = total + loss_C.detach().sum().to(total.dtype)
            g = [None if t is None else next(grads) for t in leaves]
            return (torch.zeros_like(lp) if g[0] is None else g[0]), g[1], g[2]

        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        logp, ent, kl, dh, dW, db = _sweep(h, W, b, y, ref, temperature, chunk, want_entropy, coef_fn, need)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dW, db)))
        ctx.dtypes = (h.dtype, W.dtype, None if b is None else b.dtype)
        ctx.present = (dh is not None, dW is not None, db is not None)
        empty = logp.new_empty(0)
        ctx.mark_non_differentiable(logp)
        outs = (logp, ent if ent is not None else empty, kl if kl is not None else empty)
        for t in outs[1:]:
            ctx.mark_non_differentiable(t)
        return (total, *outs)

    @staticmethod
    def backward(ctx, g_loss, *_):
        return (*_stored_grads(ctx, g_loss), None, None, None, None, None, None)


def _stored_grads(ctx, g_loss: Tensor) -> list:
    """The (dh, dW, db) computed in the forward, scaled by the loss's upstream gradient. g_loss is
    1 for a plain loss.backward(): the stored buffers are handed over without a copy, which would
    double the dW peak (V × D)."""
    one = bool(g_loss == 1)
    return [(t if one else t * g_loss).to(dt) if ok else None
            for t, dt, ok in zip(ctx.saved_tensors, ctx.dtypes, ctx.present)]


def _prepare(hidden_N_D, weight_V_D, labels_N, chunk_size, ref_hidden_N_D, ref_weight_V_D,
             ref_logits_N_V, kl_direction, temperature):
    """Validate the fused-pass inputs; returns (labels as int64, chunk rows, reference or None)."""
    n, d = hidden_N_D.shape
    v = weight_V_D.shape[0]
    if weight_V_D.shape[1] != d or labels_N.shape != (n,):
        raise ValueError(f"shapes: hidden {tuple(hidden_N_D.shape)}, weight {tuple(weight_V_D.shape)}, "
                         f"labels {tuple(labels_N.shape)}; want [N, D], [V, D], [N]")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    check_choice("KL direction", kl_direction, KL_DIRECTIONS)
    ref = None
    if ref_logits_N_V is not None or ref_hidden_N_D is not None or ref_weight_V_D is not None:
        by_hidden = ref_hidden_N_D is not None and ref_weight_V_D is not None
        if by_hidden == (ref_logits_N_V is not None):
            raise ValueError("give the reference as ref_hidden_N_D + ref_weight_V_D, or as ref_logits_N_V")
        ref = _Ref(ref_hidden_N_D, ref_weight_V_D, ref_logits_N_V, kl_direction)
    return labels_N.long(), _chunk_rows(v, chunk_size), ref


def fused_token_logprobs(
    hidden_N_D: Tensor,
    weight_V_D: Tensor,
    labels_N: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    ref_hidden_N_D: Tensor | None = None,
    ref_weight_V_D: Tensor | None = None,
    ref_logits_N_V: Tensor | None = None,
    kl_direction: str = "forward",
    bias_V: Tensor | None = None,
) -> FusedOut:
    """log π(y_n) = z_{n,y} − logsumexp(z_n), z = (h Wᵀ + b)/T, chunk by chunk (module docstring).

    Optional entropy H_n = logsumexp(z_n) − Σ_v p z and exact KL per position against a
    reference q (``"forward"`` = KL(q‖π), TDPO's; ``"reverse"`` = KL(π‖q)). The reference is its own
    hidden states + head (computed per chunk, never stored) or its logits; it gets the same
    temperature and no gradient. Pattern of Liger-Kernel's fused linear losses; the formulas are
    those of ``log_softmax → gather`` (TRL ``selective_log_softmax``, verl ``logprobs_from_logits``).

    Memory: a few [chunk, V] buffers, never [N, V]; ``chunk_size=None`` sizes one fp32 [chunk, V]
    buffer to ~64 MB.
    Half/bf16 inputs are computed in fp32; outputs are fp32 (fp64 for fp64 inputs). −inf logits
    (e.g. from ``bias_V`` masking vocabulary) contribute 0 to sums, never NaN.

    Gradients flow to hidden, weight and bias through a custom backward that recomputes each
    chunk's logits (four LM-head matmuls in all). This is the learner's path, for the policy and
    for the no-grad old/reference/teacher passes. When a loss is a sum of per-token terms,
    ``fused_token_loss`` needs three matmuls by contracting the gradients inside the forward.

    Shapes: hidden_N_D [N, D]; weight_V_D [V, D]; labels_N [N]; ref_hidden_N_D [N, D'];
    ref_weight_V_D [V, D']; ref_logits_N_V [N, V]; bias_V [V]. Outputs [N].
    """
    y, chunk, ref = _prepare(hidden_N_D, weight_V_D, labels_N, chunk_size, ref_hidden_N_D,
                             ref_weight_V_D, ref_logits_N_V, kl_direction, temperature)
    logp, ent, kl = _FusedLogprobs.apply(hidden_N_D, weight_V_D, bias_V, y, ref, float(temperature),
                                         chunk, with_entropy)
    return FusedOut(logp, ent if with_entropy else None, kl if ref is not None else None)


def fused_token_loss(
    hidden_N_D: Tensor,
    weight_V_D: Tensor,
    labels_N: Tensor,
    token_loss_fn,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    ref_hidden_N_D: Tensor | None = None,
    ref_weight_V_D: Tensor | None = None,
    ref_logits_N_V: Tensor | None = None,
    kl_direction: str = "forward",
    bias_V: Tensor | None = None,
) -> tuple[Tensor, FusedOut]:
    """L = Σ_n ℓ_n(logp_n, H_n, KL_n) with its gradient computed inside the forward sweep.

    "Gradient in the forward" (the pattern of Liger-Kernel's FusedLinearCrossEntropy): per chunk,
    ``token_loss_fn(rows, logp_C, entropy_C, kl_C) -> [C]`` gives the chunk's per-token losses;
    their gradients wrt logp/H/KL (autograd on [C] vectors) are contracted with ∂/∂logits at once
    into dh and dW, so the backward only scales stored gradients: three LM-head matmuls instead of
    four, and no logits kept.

    Contract for ``token_loss_fn``: ``rows`` is a slice into [0, N); the arguments are fp32
    leaves (``entropy_C``/``kl_C`` None unless asked for); it returns the per-token loss, already
    weighted by any normalizer (e.g. mask / total token count for token-mean), so that the total
    loss is the sum over all tokens. It may depend on its arguments and on constants only (no other
    tensors requiring grad). A loss that is not a per-token sum (f-DPO, TDPO) would need two
    passes: a no-grad ``fused_token_logprobs`` for the sequence sums, then this with the resulting
    per-token weights.

    Other arguments and shapes as ``fused_token_logprobs``. Returns (loss scalar, differentiable;
    FusedOut with detached per-token values for metrics).
    """
    y, chunk, ref = _prepare(hidden_N_D, weight_V_D, labels_N, chunk_size, ref_hidden_N_D,
                             ref_weight_V_D, ref_logits_N_V, kl_direction, temperature)
    loss, logp, ent, kl = _FusedLoss.apply(hidden_N_D, weight_V_D, bias_V, y, ref, float(temperature),
                                           chunk, with_entropy, token_loss_fn)
    return loss, FusedOut(logp.detach(), ent.detach() if with_entropy else None,
                          kl.detach() if ref is not None else None)
