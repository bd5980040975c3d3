"""The Triton row kernels and the fused pass on them, against the torch path (the oracle).

Two ways to run the same kernels:

* on CPU tensors through Triton's interpreter (the PyPI ``triton`` wheel, ``TRITON_INTERPRET=1``):
  the ``interp`` tests. The variable must be set before triton is first imported (transformers
  imports it), so in an ordinary test process ``test_interpreter_suite`` runs them in a child
  process started with the variable set; with the variable set from the start they run here.
* compiled on CUDA: the tests marked ``gpu``.

The torch oracle runs in float64 from the same (rounded) inputs.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from rlkit import kl_fused

kl_triton = pytest.importorskip("rlkit.kl_triton")
needs_triton = pytest.mark.skipif(kl_triton.triton is None, reason="needs the triton package")
interp = pytest.mark.skipif(not kl_triton.available("cpu"),
                            reason="runs in the TRITON_INTERPRET=1 child process of test_interpreter_suite")
cuda_only = pytest.mark.skipif(not kl_triton.available("cuda"), reason="needs CUDA and triton")
# −inf − (−inf) and 0·inf appear in lanes that tl.where then discards; numpy warns about them.
quiet = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _chunk(c=7, v=5000, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(c, v, generator=g)
    zr = 3 * torch.randn(c, v, generator=g)
    if masked:  # vocabulary masked for both distributions
        z[:, ::97] = float("-inf")
        zr[:, ::97] = float("-inf")
    r = torch.log_softmax(zr, -1)
    y = torch.randint(0, v, (c,), generator=g)
    y = torch.where(y % 97 == 0, y + 1, y)
    return z, r, y


def _extreme_chunk(v=3000):
    """Rows the online softmax must survive: a spread of ±1e4, a 3e4 offset, one finite entry,
    two tied maxima, and logits at bf16's coarse spacing."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, v, generator=g)
    z[0] *= 1e4
    z[1] += 3e4
    z[2] = float("-inf")
    z[2, 17] = 2.0
    z[3] = -50.0
    z[3, [3, 2500]] = 50.0  # the maximum sits in two different blocks
    z[4] = (z[4] * 256).round()
    zr = torch.randn(5, v, generator=g)
    zr[2] = float("-inf")
    zr[2, 17] = 0.0
    r = torch.log_softmax(zr, -1)
    y = torch.tensor([int(z[0].argmax()), 7, 17, 2500, 11])
    return z, r, y


def _compare_rows(z, r, y, direction, tol):
    """The Triton kernels on z's device and dtype vs torch in fp64: the statistics from the same
    rounded logits, then the logits gradient from the statistics the kernel returned (for bf16
    logits they are rounded to bf16, and row_dlogits must use them as given)."""
    c = z.shape[0]
    g = torch.Generator().manual_seed(3)
    coefs = [torch.randn(c, generator=g) for _ in range(3)]
    zd, rd, yc = z.double().cpu(), r.double().cpu(), y.cpu()
    _, lse, logp, ez, k = kl_fused._row_stats(zd.clone(), yc, rd, direction, True)
    dev = z.device
    _, lse2, logp2, ez2, k2 = kl_triton.row_stats(z, y.to(dev), r.to(dev), direction, True)
    for got, want in [(lse2, lse), (logp2, logp), (ez2, ez), (k2, k)]:
        torch.testing.assert_close(got.double().cpu(), want, **tol)
    stats = [t.double().cpu() for t in (lse2, ez2, k2)]
    p = torch.exp(zd - stats[0][:, None])
    g_ref = kl_fused._row_dlogits(zd, p, yc, *stats, rd, direction, *[t.double() for t in coefs])
    g_tri = kl_triton.row_dlogits(z.clone(), None, y.to(dev), *[t.float().to(dev) for t in stats], r.to(dev),
                                  direction, *[t.to(dev) for t in coefs])
    assert torch.isfinite(g_tri).all()
    torch.testing.assert_close(g_tri.double().cpu(), g_ref, **tol)


ROW_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-4}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


# ------------------------------------------------------------------ interpreter (CPU CI)
@needs_triton
def test_interpreter_suite():
    """The ``interp`` tests below in a child process that imports triton for its interpreter."""
    if kl_triton.available("cpu"):
        pytest.skip("TRITON_INTERPRET=1 is set here: the interp tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interp and not suite",
           "-m", "not gpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " skipped" not in tail.splitlines()[-1], tail  # every interp test ran, none skipped
    assert f"{N_INTERP} passed" in tail, tail


@interp
@quiet
def test_interp_kernels_are_the_backend():
    """Under the interpreter the fused pass really runs the Triton kernels (for fp32 chunks)."""
    assert kl_fused._chunk_backend(torch.device("cpu"), torch.float32) == (kl_triton.row_stats, kl_triton.row_dlogits)
    assert kl_fused._chunk_backend(torch.device("cpu"), torch.float64)[0] is kl_fused._row_stats


@interp
@quiet
def test_interp_uniform_row_by_hand():
    """z = (0, 0, 0), y = 1: lse = log 3, log p_y = −log 3, E_p[z] = 0; against q = (1/2, 1/4, 1/4)
    forward KL(q‖π) = Σ q log(q / (1/3)) = log 3 − 1.5 log 2; with c_logp = 1 the logits
    gradient is onehot(y) − p = (−1/3, 2/3, −1/3)."""
    z = torch.zeros(1, 3)
    r = torch.tensor([[0.5, 0.25, 0.25]]).log()
    y = torch.tensor([1])
    _, lse, logp, ez, k = kl_triton.row_stats(z, y, r, "forward", True)
    torch.testing.assert_close(lse, torch.tensor([math.log(3)]))
    torch.testing.assert_close(logp, torch.tensor([-math.log(3)]))
    torch.testing.assert_close(ez, torch.tensor([0.0]))
    torch.testing.assert_close(k, torch.tensor([math.log(3) - 1.5 * math.log(2)]))
    g = kl_triton.row_dlogits(z.clone(), None, y, lse, ez, k, r, "forward", torch.ones(1), None, None)
    torch.testing.assert_close(g, torch.tensor([[-1 / 3, 2 / 3, -1 / 3]]))


@interp
@quiet
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_interp_row_kernels_match_torch(direction, dtype):
    """Masked vocabulary (every 97th entry −inf for π and q), several 2048-wide blocks per row."""
    z, r, y = _chunk(c=4, v=4500)
    _compare_rows(z.to(dtype), r, y, direction, ROW_TOL[dtype])


@interp
@quiet
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_interp_extreme_logits(direction):
    """Values and gradient stay exact where the logits are huge, flat, tied or all but one masked."""
    # Logits near 3e4 have an fp32 spacing of 2e-3: a kernel that formed lse − z_y or E_p[z] − lse
    # from absolute values would miss these tolerances by an order of magnitude; sums relative to
    # the running maximum meet them.
    z, r, y = _extreme_chunk()
    _compare_rows(z, r, y, direction, {"rtol": 1e-5, "atol": 1e-4})


def _fused_run(h, W, y, adv, rh, rW, direction, device, dtype):
    """Values and gradients of the fused pass (both entry points) from inputs cast to ``dtype``."""
    hh = h.to(device, dtype).requires_grad_()
    WW = W.to(device, dtype).requires_grad_()
    loss, out = kl_fused.fused_token_loss(
        hh, WW, y.to(device), lambda rows, lp, e, k: adv.to(device)[rows] * lp + 0.1 * e + 0.2 * k,
        temperature=0.8, chunk_size=16, with_entropy=True, ref_hidden_N_D=rh.to(device, dtype),
        ref_weight_V_D=rW.to(device, dtype), kl_direction=direction)
    loss.backward()
    out2 = kl_fused.fused_token_logprobs(hh, WW, y.to(device), temperature=0.8, chunk_size=16, with_entropy=True)
    gh, gW = torch.autograd.grad((adv.to(device) * out2.logp_N).sum() - 0.3 * out2.entropy_N.sum(), (hh, WW))
    return [t.double().cpu() for t in (out.logp_N, out.entropy_N, out.kl_N, hh.grad, WW.grad, out2.logp_N, gh, gW)]


def _fused_inputs(n=40, d=32, v=2100):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, d, generator=g)
    W = torch.randn(v, d, generator=g) * d ** -0.5
    rh, rW = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d ** -0.5
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    return h, W, y, adv, rh, rW


FUSED_TOL = {torch.float32: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}


@interp
@quiet
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_interp_fused_pass_matches_torch(dtype, direction):
    """The whole fused pass (log-probs, entropy, exact KL; dh and dW of both entry points) with the
    Triton kernels on CPU against the torch path in fp64 from the same rounded inputs."""
    h, W, y, adv, rh, rW = _fused_inputs()
    rounded = [t.to(dtype).double() for t in (h, W)]
    want = _fused_run(*rounded, y, adv, rh.to(dtype).double(), rW.to(dtype).double(), direction, "cpu", torch.float64)
    got = _fused_run(h, W, y, adv, rh, rW, direction, "cpu", dtype)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FUSED_TOL[dtype])


N_INTERP = 1 + 1 + 4 + 2 + 4
"""Interpreter tests the child process must pass (kept next to the tests it counts)."""


# ------------------------------------------------------------------ CUDA (marked gpu)
@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_row_kernels_match_torch(direction):
    z, r, y = _chunk()
    _compare_rows(z.cuda(), r, y, direction, ROW_TOL[torch.float32])


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_cuda_matches_cpu(dtype, direction):
    g = torch.Generator().manual_seed(1)
    n, d, v = 300, 64, 3001
    h = torch.randn(n, d, generator=g).to(dtype)
    W = (torch.randn(v, d, generator=g) * d ** -0.5).to(dtype)
    rh, rW = torch.randn(n, d, generator=g).to(dtype), (torch.randn(v, d, generator=g) * d ** -0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    cpu = _fused_run(h.double(), W.double(), y, adv, rh.double(), rW.double(), direction, "cpu", torch.float64)
    gpu = _fused_run(h, W, y, adv, rh, rW, direction, "cuda", dtype)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a, b, **FUSED_TOL[dtype])

