"""The fused chunked pass against the obvious full-logits computation (values and gradients)."""

import math

import pytest
import torch

from rlkit.kl import entropy_from_logits, full_kl
from rlkit.kl_fused import fused_token_logprobs, fused_token_loss
from rlkit.kl_stats_loss import fused_stats_loss

N, D, V, DR = 11, 5, 9, 4
F64 = {"rtol": 1e-10, "atol": 1e-12}


def _inputs(dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(N, D, generator=g, dtype=dtype)).requires_grad_()
    W = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    rh = torch.randn(N, DR, generator=g, dtype=dtype)
    rW = torch.randn(V, DR, generator=g, dtype=dtype)
    return h, W, b, y, rh, rW


def _reference(h, W, b, y, T, ref_logits, direction):
    """Full [N, V] logits through autograd: the slow, obvious oracle."""
    lp = torch.log_softmax((h @ W.t() + (0 if b is None else b)) / T, -1)
    logp = lp.gather(1, y[:, None]).squeeze(1)
    ent = -(lp.exp() * lp).sum(-1)
    kl = full_kl(lp, torch.log_softmax(ref_logits / T, -1), direction)
    return logp, ent, kl


def _grads(outs, coefs, params):
    total = sum((c * o).sum() for c, o in zip(coefs, outs))
    return torch.autograd.grad(total, params)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("ref_as", ["hidden", "logits"])
@pytest.mark.parametrize("chunk", [1, 4, N, None])
def test_fused_matches_full_logits(direction, ref_as, chunk):
    h, W, b, y, rh, rW = _inputs()
    T = 0.7
    ref_kw = {"ref_hidden_N_D": rh, "ref_weight_V_D": rW} if ref_as == "hidden" else {"ref_logits_N_V": rh @ rW.t()}
    out = fused_token_logprobs(h, W, y, temperature=T, chunk_size=chunk, with_entropy=True,
                               kl_direction=direction, bias_V=b, **ref_kw)
    want = _reference(h, W, b, y, T, rh @ rW.t(), direction)
    for got, exp in zip((out.logp_N, out.entropy_N, out.kl_N), want):
        torch.testing.assert_close(got, exp, **F64)
    coefs = torch.randn(3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got_g = _grads((out.logp_N, out.entropy_N, out.kl_N), coefs, (h, W, b))
    want_g = _grads(want, coefs, (h, W, b))
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, **F64)


def test_only_requested_outputs_and_no_bias():
    h, W, _, y, _, _ = _inputs()
    out = fused_token_logprobs(h, W, y, chunk_size=3)
    assert out.entropy_N is None and out.kl_N is None
    (g,) = torch.autograd.grad(out.logp_N.sum(), W)
    (e,) = torch.autograd.grad(torch.log_softmax(h @ W.t(), -1).gather(1, y[:, None]).sum(), W)
    torch.testing.assert_close(g, e, **F64)
    # the weight alone may require grad (frozen trunk) and vice versa
    out = fused_token_logprobs(h.detach(), W, y)
    assert torch.autograd.grad(out.logp_N.sum(), W)[0].shape == W.shape


def test_gradcheck_tiny():
    h, W, b, y, rh, rW = _inputs()

    def f(h, W, b):
        o = fused_token_logprobs(h, W, y, temperature=1.3, chunk_size=4, with_entropy=True,
                                 ref_hidden_N_D=rh, ref_weight_V_D=rW, kl_direction="reverse", bias_V=b)
        return o.logp_N, o.entropy_N, o.kl_N

    assert torch.autograd.gradcheck(f, (h, W, b))

    def g(h, W, b):
        loss, _ = fused_token_loss(h, W, y, lambda rows, lp, e, k: torch.sin(lp) * e + k * k, chunk_size=3,
                                   with_entropy=True, ref_logits_N_V=rh @ rW.t(), bias_V=b)
        return loss

    assert torch.autograd.gradcheck(g, (h, W, b))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gradient_in_forward_matches_autograd(direction):
    """A clipped-surrogate-like nonlinear per-token loss with entropy and KL terms."""
    h, W, b, y, rh, rW = _inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    adv, old = torch.randn(N, generator=g, dtype=torch.float64), -2 + torch.randn(N, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, generator=g) > 0.3).double()
    denom = mask.sum()

    def per_token(lp, ent, kl, rows=slice(None)):
        ratio = torch.exp(lp - old[rows])
        pg = -torch.minimum(ratio * adv[rows], ratio.clamp(0.8, 1.28) * adv[rows])
        return (pg - 0.01 * ent + 0.1 * kl) * mask[rows] / denom

    loss, out = fused_token_loss(h, W, y, lambda rows, lp, e, k: per_token(lp, e, k, rows), chunk_size=4,
                                 temperature=0.9, with_entropy=True, ref_hidden_N_D=rh, ref_weight_V_D=rW,
                                 kl_direction=direction, bias_V=b)
    lp, ent, kl = _reference(h, W, b, y, 0.9, rh @ rW.t(), direction)
    want = per_token(lp, ent, kl).sum()
    torch.testing.assert_close(loss, want, **F64)
    torch.testing.assert_close(out.logp_N, lp.detach(), **F64)
    assert not out.logp_N.requires_grad
    got_g = torch.autograd.grad(2.5 * loss, (h, W, b))  # the backward scales the stored gradients
    want_g = torch.autograd.grad(2.5 * want, (h, W, b))
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, **F64)


def test_two_pass_sequence_level_loss():
    """DPO-style loss, nonlinear in sequence sums: no-grad pass for sums, then per-token weights."""
    h, W, _, y, _, _ = _inputs(seed=3)
    seq = torch.tensor([0] * 3 + [1] * 4 + [2] * 2 + [3] * 2)  # 4 sequences: (0, 1) and (2, 3) pairs
    beta = 0.3

    def seq_loss(logp_N):
        s = torch.zeros(4, dtype=logp_N.dtype).index_add(0, seq, logp_N)
        return -torch.nn.functional.logsigmoid(beta * (s[0::2] - s[1::2])).sum()

    with torch.no_grad():
        lp0 = fused_token_logprobs(h, W, y, chunk_size=4).logp_N
    s = lp0.detach().requires_grad_()
    (w_tok,) = torch.autograd.grad(seq_loss(s), s)  # ∂L/∂logp_n, constant within a sequence
    loss, _ = fused_token_loss(h, W, y, lambda rows, lp, e, k: w_tok[rows] * lp, chunk_size=4)
    full = torch.log_softmax(h @ W.t(), -1).gather(1, y[:, None]).squeeze(1)
    for a, e in zip(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(seq_loss(full), (h, W))):
        torch.testing.assert_close(a, e, **F64)


SEQ = torch.tensor([0] * 3 + [1] * 4 + [2] * 2 + [3] * 2)  # 4 sequences over the N = 11 tokens


def _clipped(lp, ent, kl):
    """Per-token: a PPO-clip-like surrogate, an entropy bonus and a KL penalty, token-mean."""
    g = torch.Generator().manual_seed(2)
    adv, old = torch.randn(N, generator=g, dtype=lp.dtype), torch.randn(N, generator=g, dtype=lp.dtype) - 2
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    return ((pg - 0.01 * ent + 0.1 * kl).sum() / 7.0, "aux")


def _pairs(lp, ent, kl):
    """Not per-token: DPO on sequence sums, plus an entropy term."""
    s = torch.zeros(4, dtype=lp.dtype).index_add(0, SEQ, lp)
    return -torch.nn.functional.logsigmoid(0.3 * (s[0::2] - s[1::2])).sum() + 0.01 * ent.sum(), None


def _log_of_mean(lp, ent, kl):
    """Not per-token, and its probe is infinite: log(−max logp) is log 0 while rows are still zeros."""
    return (lp * torch.log(-lp.max())).sum() + kl.sum(), None


@pytest.mark.parametrize("loss_fn,per_token", [(_clipped, True), (_pairs, False), (_log_of_mean, False)],
                         ids=["per-token", "pairs", "inf-probe"])
@pytest.mark.parametrize("chunk", [3, N])
def test_stats_loss_exact_for_any_loss(loss_fn, per_token, chunk):
    """fused_stats_loss: value and gradients of f(fused stats) for any f; no correction when f is a
    sum of per-token terms or when one chunk holds every row."""
    h, W, b, y, rh, rW = _inputs(seed=8)
    loss, out, aux, report = fused_stats_loss(h, W, y, loss_fn, temperature=0.8, chunk_size=chunk,
                                              with_entropy=True, ref_hidden_N_D=rh, ref_weight_V_D=rW,
                                              bias_V=b)
    lp, ent, kl = _reference(h, W, b, y, 0.8, rh @ rW.t(), "forward")
    want, want_aux = loss_fn(lp, ent, kl)
    torch.testing.assert_close(loss, want, **F64)
    assert aux == want_aux and not out.logp_N.requires_grad
    torch.testing.assert_close(out.kl_N, kl.detach(), **F64)
    for a, e in zip(torch.autograd.grad(-1.5 * loss, (h, W, b)), torch.autograd.grad(-1.5 * want, (h, W, b))):
        torch.testing.assert_close(a, e, **F64)
    assert (report.rows, report.chunks) == (N, -(-N // chunk))
    assert report.per_token == (per_token or chunk == N)
    assert report.resweep == (loss_fn is _log_of_mean and chunk < N)


def test_stats_loss_unused_stats_and_frozen_head():
    """A loss of logp alone (entropy asked for but unused), gradient to the hidden states only."""
    h, W, _, y, _, _ = _inputs(seed=9)
    loss, out, _, report = fused_stats_loss(h, W.detach(), y, lambda lp, e, k: ((lp * lp).sum(), None),
                                            chunk_size=4, with_entropy=True)
    full = torch.log_softmax(h @ W.detach().t(), -1).gather(1, y[:, None]).squeeze(1)
    (got,) = torch.autograd.grad(loss, h)
    (want,) = torch.autograd.grad((full * full).sum(), h)
    torch.testing.assert_close(got, want, **F64)
    assert report.per_token and out.kl_N is None and out.entropy_N is not None


def test_entropy_matches_definition():
    h, W, b, y, _, _ = _inputs(seed=4)
    out = fused_token_logprobs(h, W, y, with_entropy=True, bias_V=b, chunk_size=2)
    z = (h @ W.t() + b).detach()
    torch.testing.assert_close(out.entropy_N.detach(), entropy_from_logits(z), **F64)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(out.entropy_N.detach(), -(p * p.log()).sum(-1), **F64)


def test_bf16_inputs_accumulate_in_fp32():
    h, W, _, y, rh, rW = _inputs(dtype=torch.float32, seed=5)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    out = fused_token_logprobs(hb, Wb, y, with_entropy=True, ref_logits_N_V=(rh @ rW.t()).bfloat16(), chunk_size=4)
    by_hidden = fused_token_logprobs(hb, Wb, y, ref_hidden_N_D=rh.bfloat16(), ref_weight_V_D=rW.bfloat16())
    want_kl = _reference(hb.double(), Wb.double(), None, y, 1.0, rh.bfloat16().double() @ rW.bfloat16().double().t(),
                         "forward")[2]
    torch.testing.assert_close(by_hidden.kl_N.double(), want_kl.detach(), rtol=0, atol=2e-5)
    assert out.logp_N.dtype == torch.float32 and out.entropy_N.dtype == torch.float32
    # oracle: the same bf16-rounded numbers in fp64; fp32 accumulation keeps us within ~1e-5
    want = _reference(hb.double(), Wb.double(), None, y, 1.0, (rh @ rW.t()).bfloat16().double(), "forward")
    for got, exp in zip((out.logp_N, out.entropy_N, out.kl_N), want):
        torch.testing.assert_close(got.double(), exp.detach(), rtol=0, atol=2e-5)
    gh, gW = torch.autograd.grad(out.logp_N.sum(), (hb, Wb))
    assert gh.dtype == torch.bfloat16 and gW.dtype == torch.bfloat16
    hd, Wd = hb.detach().double().requires_grad_(), Wb.detach().double().requires_grad_()
    eh, eW = torch.autograd.grad(_reference(hd, Wd, None, y, 1.0, rh @ rW.t(), "forward")[0].sum(), (hd, Wd))
    torch.testing.assert_close(gh.double(), eh, rtol=2e-2, atol=2e-2)  # bf16 output rounding only
    torch.testing.assert_close(gW.double(), eW, rtol=2e-2, atol=2e-2)


def test_extreme_and_masked_logits_no_nan():
    h, W, _, y, rh, rW = _inputs(seed=6, scale=1e3)  # logits ~ ±1e3: softmax is one-hot
    bias = torch.zeros(V, dtype=torch.float64)
    bias[[1, 4]] = float("-inf")  # masked vocabulary entries
    y = torch.where((y == 1) | (y == 4), torch.zeros_like(y), y)
    ref = rh @ rW.t()
    ref[:, 2] = float("-inf")  # q(v) = 0 somewhere
    for direction in ("forward", "reverse"):
        out = fused_token_logprobs(h, W, y, with_entropy=True, bias_V=bias, ref_logits_N_V=ref,
                                   kl_direction=direction, chunk_size=3)
        vals = torch.stack([out.logp_N, out.entropy_N])
        assert not torch.isnan(vals).any() and (out.logp_N <= 0).all() and (out.entropy_N >= -1e-9).all()
        assert not torch.isnan(out.kl_N).any()
        want = _reference(h, W, bias, y, 1.0, ref, direction)
        torch.testing.assert_close(out.logp_N, want[0], **F64)
        if direction == "forward":  # both finite here; reverse may be +inf where π > 0 = q
            torch.testing.assert_close(out.kl_N, want[2], **F64)
        grads = torch.autograd.grad((out.logp_N + out.entropy_N).sum(), (h, W))
        assert all(torch.isfinite(g).all() for g in grads)
    # uniform over the live entries: entropy = log(#live)
    out = fused_token_logprobs(torch.zeros(2, D), torch.zeros(V, D), torch.zeros(2, dtype=torch.long),
                               with_entropy=True, bias_V=bias.float())
    torch.testing.assert_close(out.entropy_N, torch.full((2,), math.log(V - 2)))


def test_memory_no_n_by_v_allocation():
    """Profile allocations: the largest single buffer is chunk × V, never N × V."""
    n, d, v, chunk = 512, 16, 1024, 32
    g = torch.Generator().manual_seed(7)
    h = torch.randn(n, d, generator=g).requires_grad_()
    W = torch.randn(v, d, generator=g).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    ref_h, ref_W = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = fused_token_loss(h, W, y, lambda rows, lp, e, k: lp + e + k, chunk_size=chunk,
                                   with_entropy=True, ref_hidden_N_D=ref_h, ref_weight_V_D=ref_W,
                                   kl_direction="reverse")
        loss.backward()
        out = fused_token_logprobs(h, W, y, chunk_size=chunk, with_entropy=True, ref_hidden_N_D=ref_h,
                                   ref_weight_V_D=ref_W)
        (out.logp_N + out.entropy_N + out.kl_N).sum().backward()
    # Per tensor op (the autograd functions' own events net several buffers, the kept chunk
    # logits buffer of rlkit.kl_fused._logits_buffer included).
    allocs = [e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage > 0]
    assert allocs, "profiler recorded no allocations"
    assert max(allocs) <= chunk * v * 4 * 1.01 < n * v * 4 / 8


def test_older_import_path_and_import_order():
    """rlkit.kl still hands out the fused names, whichever of the two modules is imported first."""
    import subprocess
    import sys

    for first in ("rlkit.kl_fused", "rlkit.kl"):
        code = (f"import sys, importlib; importlib.import_module('{first}');"
                " from rlkit.kl import FusedOut, KL_DIRECTIONS, fused_token_logprobs, fused_token_loss;"
                " import rlkit.kl, rlkit.kl_fused as f;"
                " assert rlkit.kl.fused_token_loss is f.fused_token_loss and rlkit.kl.FusedOut is f.FusedOut;"
                " assert rlkit.kl.check_choice is f.check_choice;"
                " bad = {'triton', 'transformers', 'ray', 'deepspeed', 'vllm'} & set(sys.modules);"
                " assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True)
    import rlkit.kl

    with pytest.raises(AttributeError):
        rlkit.kl.no_such_name  # noqa: B018


def test_masked_dot_equals_where_sum_on_every_row():
    """Σ w·x with w = 0 terms as 0: finite rows, a zero weight against ±∞, and NaN rows give what
    the ``where(w > 0, w·x, 0)`` sum gives."""
    from rlkit.kl_fused import _masked_dot

    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(6, 50, generator=g, dtype=torch.float64), -1)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64) * 5
    w[1, :10] = 0.0
    x[1, :10] = float("-inf")  # masked entries: 0 · −∞
    w[2, 3], x[2, 4] = 0.0, float("inf")  # a zero weight elsewhere; an infinite term with w > 0 stays ∞
    w[3, :] = float("nan")  # a row that is not a distribution
    x[4, 7] = float("nan")
    want = torch.where(w > 0, w * x, torch.zeros((), dtype=w.dtype)).sum(-1)
    got = _masked_dot(w, x)
    assert torch.isinf(got[2]) and not torch.isnan(got[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
