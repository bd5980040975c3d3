"""The Triton row kernels and the CUDA fused pass against the CPU path (the oracle)."""

import pytest
import torch

from rlkit import kl

kl_triton = pytest.importorskip("rlkit.kl_triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not kl_triton.available(), reason="needs CUDA and triton"),
]


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


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_row_kernels_match_torch(direction):
    z, r, y = _chunk()
    c = z.shape[0]
    coefs = [torch.randn(c) for _ in range(3)]
    p, lse, logp, ez, k = kl._row_stats(z.double(), y, r.double(), direction, True)
    g_cpu = kl._row_dlogits(z.double(), p, y, lse, ez, k, r.double(), direction, *[t.double() for t in coefs])
    zc, rc, yc = z.cuda(), r.cuda(), y.cuda()
    _, lse2, logp2, ez2, k2 = kl_triton.row_stats(zc, yc, rc, direction, True)
    for a, b in [(lse2, lse), (logp2, logp), (ez2, ez), (k2, k)]:
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-4)
    g_gpu = kl_triton.row_dlogits(zc.clone(), None, yc, lse2, ez2, k2, rc, direction, *[t.cuda() for t in coefs])
    torch.testing.assert_close(g_gpu.double().cpu(), g_cpu, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(g_gpu).all()


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

    def run(device, dt):
        hh = h.to(device, dt).requires_grad_()
        WW = W.to(device, dt).requires_grad_()
        loss, out = kl.fused_token_loss(
            hh, WW, y.to(device), lambda rows, lp, e, k: adv.to(device)[rows] * lp + 0.1 * e + 0.2 * k,
            temperature=0.8, chunk_size=64, with_entropy=True, ref_hidden_N_D=rh.to(device, dt),
            ref_weight_V_D=rW.to(device, dt), kl_direction=direction)
        loss.backward()
        out2 = kl.fused_token_logprobs(hh, WW, y.to(device), temperature=0.8, chunk_size=64)
        (gh,) = torch.autograd.grad(out2.logp_N.sum(), hh)
        return [t.double().cpu() for t in (out.logp_N, out.entropy_N, out.kl_N, hh.grad, WW.grad, gh)]

    cpu = run("cpu", torch.float64)  # the CPU path in fp64, from the same (rounded) inputs
    gpu = run("cuda", dtype)
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a, b, **tol)
