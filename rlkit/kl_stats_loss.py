"""``fused_stats_loss``: the learner's loss pass for a loss of the whole per-token vectors.

The sweep of :mod:`rlkit.kl_fused` with a ``coef_fn`` that probes each chunk's per-token
coefficients ∂loss/∂stat (log-prob, entropy, KL) from the algorithm's loss on [B, T] tensors,
contracts them into dh and dW inside the forward (three LM-head matmuls, no logits kept), and
after the sweep checks them against the exact coefficients from the finished vectors; rows whose
probe differed (a loss that is not a sum of per-token terms) go through a correction sweep, so the
gradient is always exact (docs/algorithms.md § Exact full-vocabulary KL and entropy).
:func:`rlkit.logprobs.token_loss` calls it; tests/test_kl_fused.py checks it against autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.kl_fused import FusedOut, _acc_dtype, _prepare, _Ref, _stored_grads, _sweep

# ----------------------------------------------------------------------------------------------
# A loss of the whole per-token vectors: probed per-token coefficients, checked, corrected
# ----------------------------------------------------------------------------------------------


@dataclass
class ProbeReport:
    """How ``fused_stats_loss`` got its gradient: ``corrected_rows`` of the ``rows`` tokens had a
    probed coefficient that differed from the exact one and went through the correction sweep
    (``resweep``: all rows again, when a differing probe was not finite)."""

    rows: int
    chunks: int
    corrected_rows: int = 0
    resweep: bool = False

    @property
    def per_token(self) -> bool:
        """Every probed coefficient was exact: three LM-head matmuls, no correction."""
        return self.corrected_rows == 0


def _coef_grads(loss: Tensor, leaves: list) -> list:
    """∂loss/∂leaf for each leaf (None for an absent leaf or one the loss does not use)."""
    live = [t for t in leaves if t is not None]
    if not loss.requires_grad or not live:
        return [None] * len(leaves)
    grads = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return [None if t is None else next(grads) for t in leaves]


class _Probe:
    """The sweep's ``coef_fn`` for a loss f(logp_N, H_N, KL_N) -> (scalar, aux) of whole vectors.

    For chunk rows C it evaluates f with the chunk's values as leaves, the earlier chunks' true
    values and zeros for rows not computed yet, and takes ∂f/∂stat_n for n in C. When f is a sum of
    per-token terms (∂f/∂stat_n depends on token n alone: PPO-clip surrogates, KL and entropy
    terms, any aggregation whose normalizers are constants) these are the exact coefficients; when
    the sweep has one chunk they are exact for any f. ``exact`` then evaluates f on the true
    vectors: the loss, its aux, and the exact coefficients to check the probed ones against.
    """

    def __init__(self, loss_fn, n: int, like: Tensor, want_entropy: bool, want_kl: bool):
        self.loss_fn = loss_fn
        zeros = lambda: torch.zeros(n, dtype=like.dtype, device=like.device)
        self.vals = [zeros(), zeros() if want_entropy else None, zeros() if want_kl else None]
        self.used: list = [None, None, None]  # probed coefficients [N] per stat (None: unused)

    def __call__(self, rows: slice, lp: Tensor, ent, kl):
        leaves = []
        for buf, v in zip(self.vals, (lp, ent, kl)):
            if buf is not None:
                buf[rows] = v
            leaves.append(None if buf is None else v.detach().clone().requires_grad_())
        with torch.enable_grad():
            full = [None if t is None else torch.cat((buf[:rows.start], t, buf[rows.stop:]))
                    for buf, t in zip(self.vals, leaves)]
            loss, _ = self.loss_fn(*full)
            grads = _coef_grads(loss, leaves)
        for k, g in enumerate(grads):
            if g is not None:
                if self.used[k] is None:
                    self.used[k] = torch.zeros_like(self.vals[0])
                self.used[k][rows] = g
        return (torch.zeros_like(lp) if grads[0] is None else grads[0]), grads[1], grads[2]

    def exact(self):
        """(loss detached, aux, exact coefficients [N] per stat or None) on the true vectors."""
        leaves = [None if v is None else v.clone().requires_grad_() for v in self.vals]
        with torch.enable_grad():
            loss, aux = self.loss_fn(*leaves)
            grads = _coef_grads(loss, leaves)
        return loss.detach(), aux, grads

    def mismatch(self, exact: list) -> tuple[Tensor, bool]:
        """Rows [N] bool where a probed coefficient differs from the exact one (NaN = NaN), and
        whether a differing probed coefficient is non-finite (its contribution cannot be undone)."""
        rows = torch.zeros_like(self.vals[0], dtype=torch.bool)
        bad = torch.zeros_like(rows)
        for used, want in zip(self.used, exact):
            if used is None and want is None:
                continue
            used = torch.zeros_like(self.vals[0]) if used is None else used
            want = torch.zeros_like(used) if want is None else want
            diff = ~((used == want) | (used.isnan() & want.isnan()))
            rows |= diff
            bad |= diff & ~used.isfinite()
        return rows, bool(bad.any())


def _delta_coefs(probe: _Probe, exact: list, idx: Tensor, full: bool):
    """Coefficients of the correction sweep over rows ``idx``: exact − probed, or exact (``full``)."""
    out = []
    for used, want in zip(probe.used, exact):
        if want is None and (used is None or full):
            out.append(None)
            continue
        w = torch.zeros_like(probe.vals[0]) if want is None else want
        out.append(w[idx] if full or used is None else (w - used)[idx])
    if out[0] is None:
        out[0] = torch.zeros(idx.numel(), dtype=probe.vals[0].dtype, device=idx.device)
    return lambda rows, *_: tuple(None if c is None else c[rows] for c in out)


def _ref_rows(ref: _Ref | None, idx: Tensor) -> _Ref | None:
    if ref is None:
        return None
    return _Ref(None if ref.hidden_N_D is None else ref.hidden_N_D[idx], ref.weight_V_D,
                None if ref.logits_N_V is None else ref.logits_N_V[idx], ref.direction)


def _correct(h, W, b, y, ref, temperature, chunk, want_entropy, need, probe, exact, grads, report):
    """Make (dh, dW, db) exact where probed coefficients were not: a sweep over the differing rows
    with coefficients exact − probed (the gradient is linear in them), or over all rows with the
    exact ones when a differing probe was non-finite (its NaN/inf is already in dW)."""
    rows, bad = probe.mismatch(exact)
    if not bool(rows.any()):
        return grads
    idx = torch.arange(rows.numel(), device=rows.device) if bad else rows.nonzero().squeeze(1)
    report.corrected_rows, report.resweep = int(idx.numel()), bad
    *_, dh_c, dW_c, db_c = _sweep(h[idx], W, b, y[idx], _ref_rows(ref, idx), temperature, chunk, want_entropy,
                                  _delta_coefs(probe, exact, idx, bad), need)
    if bad:
        return dh_c, dW_c, db_c
    dh, dW, db = grads
    if dh is not None:
        dh.index_add_(0, idx, dh_c)
    if dW is not None:
        dW.add_(dW_c)
    if db is not None:
        db.add_(db_c)
    return dh, dW, db


class _StatsLoss(torch.autograd.Function):
    """Gradient-in-forward for a loss of the whole per-token vectors (``fused_stats_loss``)."""

    @staticmethod
    def forward(ctx, h, W, b, y, ref, temperature, chunk, want_entropy, loss_fn, side):
        n = h.shape[0]
        probe = _Probe(loss_fn, n, torch.empty(0, dtype=_acc_dtype(h), device=h.device), want_entropy,
                       ref is not None)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        logp, ent, kl, *grads = _sweep(h, W, b, y, ref, temperature, chunk, want_entropy, probe, need)
        loss, side["aux"], exact = probe.exact()
        side["report"] = report = ProbeReport(rows=n, chunks=-(-n // chunk))
        dh, dW, db = _correct(h, W, b, y, ref, temperature, chunk, want_entropy, need, probe, exact, grads, report)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dW, db)))
        ctx.dtypes = (h.dtype, W.dtype, None if b is None else b.dtype)
        ctx.present = (dh is not None, dW is not None, db is not None)
        empty = logp.new_empty(0)
        outs = (logp, ent if ent is not None else empty, kl if kl is not None else empty)
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, g_loss, *_):
        return (*_stored_grads(ctx, g_loss), None, None, None, None, None, None, None)


def fused_stats_loss(
    hidden_N_D: Tensor,
    weight_V_D: Tensor,
    labels_N: Tensor,
    loss_fn,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    ref_hidden_N_D: Tensor | None = None,
    ref_weight_V_D: Tensor | None = None,
    ref_logits_N_V: Tensor | None = None,
    kl_direction: str = "forward",
    bias_V: Tensor | None = None,
):
    """L = f(logp_N, H_N, KL_N) with its exact gradient, computed inside the forward sweep.

    ``loss_fn(logp_N, entropy_N, kl_N) -> (loss scalar, aux)`` sees the whole per-token vectors
    (``entropy_N``/``kl_N`` None unless asked for), as an algorithm's loss sees its [B, T] tensors;
    it may depend on them and on constants only. By the chain rule the gradient is
    Σ_n c_n·∂stat_n/∂(h, W, b) with c_n = ∂f/∂stat_n, and stat_n depends on row n alone, so the
    sweep of ``fused_token_loss`` applies once the c_n are known. They are probed per chunk
    (``_Probe``), which is exact for a sum of per-token terms, and for any f when all rows fit one
    chunk. After the sweep f is evaluated on the true vectors: that is the returned loss and aux,
    and its coefficients are compared with the probed ones bit for bit; rows that differ get a
    correction sweep (``_correct``). So the gradient is exact for every f: three LM-head matmuls
    when the probe held, three more over the differing rows when it did not (the recompute path of
    ``fused_token_logprobs`` takes four).

    Other arguments and shapes as ``fused_token_logprobs``. Returns (loss, differentiable; FusedOut
    of detached per-token values; aux of the exact evaluation; ProbeReport).
    """
    y, chunk, ref = _prepare(hidden_N_D, weight_V_D, labels_N, chunk_size, ref_hidden_N_D,
                             ref_weight_V_D, ref_logits_N_V, kl_direction, temperature)
    side: dict = {}
    loss, logp, ent, kl = _StatsLoss.apply(hidden_N_D, weight_V_D, bias_V, y, ref, float(temperature),
                                           chunk, with_entropy, loss_fn, side)
    out = FusedOut(logp, ent if with_entropy else None, kl if ref is not None else None)
    return loss, out, side["aux"], side["report"]
