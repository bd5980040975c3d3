"""Property tests of the per-token KL estimators and the exact full-vocabulary helpers.

The identities are those of docs/algorithms.md § KL estimators.

Expectations are exact: over a small vocabulary, E_{y~π}[f(y)] = Σ_y SG(π(y))·f(y), so autograd of
that sum gives E[∇f] with no sampling noise, and the identities hold to ~1e-10 in float64.
"""

import math

import pytest
import torch

from rlkit.kl import (
    KINDS,
    entropy_from_logits,
    full_kl,
    importance_weight,
    kl_estimate,
    tempered_logp,
)

V = 6
TOL = {"rtol": 1e-8, "atol": 1e-10}


@pytest.fixture
def dists():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(V, generator=g, dtype=torch.float64)
    old = torch.randn(V, generator=g, dtype=torch.float64)
    return theta, torch.log_softmax(ref, -1), torch.log_softmax(old, -1)


def _grad(scalar, theta):
    (g,) = torch.autograd.grad(scalar, theta, retain_graph=True)
    return g


def _kl(logp_a, logp_b):
    """KL(a‖b) = Σ a (log a − log b) over the small vocabulary."""
    return (logp_a.exp() * (logp_a - logp_b)).sum()


def _expect(weights, values):
    """E[values] under the (detached) sampling distribution `weights` (probabilities)."""
    return (weights.detach() * values).sum()


def _on_policy_grad(theta, ref_lp, kind, **kw):
    lp = torch.log_softmax(theta, -1)  # every token of the vocabulary is a "sample"
    return _grad(_expect(lp.exp(), kl_estimate(lp, ref_lp, kind, **kw)), theta)


NOCLAMP = {"log_ratio_clamp": None, "value_clamp": None}


def test_on_policy_gradient_identities(dists):
    theta, ref_lp, _ = dists
    lp = torch.log_softmax(theta, -1)
    g_rev = _grad(_kl(lp, ref_lp), theta)  # ∇KL(π‖ref)
    g_fwd = _grad(_kl(ref_lp, torch.log_softmax(theta, -1)), theta)  # ∇KL(ref‖π)
    assert g_rev.abs().max() > 1e-2 and (g_rev - g_fwd).abs().max() > 1e-2  # the test can fail
    zero = torch.zeros(V, dtype=torch.float64)
    torch.testing.assert_close(_on_policy_grad(theta, ref_lp, "k1", **NOCLAMP), zero, **TOL)
    torch.testing.assert_close(_on_policy_grad(theta, ref_lp, "k2", **NOCLAMP), g_rev, **TOL)
    torch.testing.assert_close(_on_policy_grad(theta, ref_lp, "k3", **NOCLAMP), g_fwd, **TOL)
    for kind in ("k1+", "k2+", "k3+", "abs+"):  # straight-through: the k2 gradient for all
        torch.testing.assert_close(_on_policy_grad(theta, ref_lp, kind, **NOCLAMP), g_rev, **TOL)
    # k3 as a detached reward: E[SG(k3)∇ℓ] = ∇KL(π‖ref) − ∇KL(ref‖π)
    lp = torch.log_softmax(theta, -1)
    k3 = kl_estimate(lp.detach(), ref_lp, "k3", **NOCLAMP)
    torch.testing.assert_close(_grad(_expect(lp.exp(), k3 * lp), theta), g_rev - g_fwd, **TOL)
    # k1 as a detached reward gives the correct reverse-KL gradient
    k1 = kl_estimate(lp.detach(), ref_lp, "k1")
    torch.testing.assert_close(_grad(_expect(lp.exp(), k1 * lp), theta), g_rev, **TOL)


def test_expected_values(dists):
    theta, ref_lp, _ = dists
    lp = torch.log_softmax(theta, -1).detach()
    p, q = lp.exp(), ref_lp.exp()
    rev, fwd = _kl(lp, ref_lp), _kl(ref_lp, lp)
    for kind, weights, target in [
        ("k1", p, rev), ("k3", p, rev), ("forward_k1", p, fwd), ("forward_k3", p, fwd),
        ("rpg_fkl", q, fwd), ("rpg_ufkl", q, fwd), ("rpg_rkl", q, rev), ("rpg_urkl", q, rev),
    ]:
        torch.testing.assert_close(_expect(weights, kl_estimate(lp, ref_lp, kind, **NOCLAMP)), target, **TOL)


def test_off_policy_importance_weighting(dists):
    theta, ref_lp, old_lp = dists
    lp = torch.log_softmax(theta, -1)
    g_rev = _grad(_kl(lp, ref_lp), theta)
    old_p = old_lp.exp()
    # s·k3 with s differentiable: unbiased ∇KL(π‖ref) from samples of π_old (§ KL estimators, off-policy)
    lp = torch.log_softmax(theta, -1)
    s = importance_weight(lp, old_lp, "differentiable")
    got = _grad(_expect(old_p, s * kl_estimate(lp, ref_lp, "k3", **NOCLAMP)), theta)
    torch.testing.assert_close(got, g_rev, **TOL)
    # SG(s)·k2: unbiased too
    lp = torch.log_softmax(theta, -1)
    s = importance_weight(lp, old_lp, "detached")
    got = _grad(_expect(old_p, s * kl_estimate(lp, ref_lp, "k2", **NOCLAMP)), theta)
    torch.testing.assert_close(got, g_rev, **TOL)
    # SG(s)·k3 and unweighted k3 are biased: they must differ from ∇KL(π‖ref)
    for mode in ("detached", "none"):
        lp = torch.log_softmax(theta, -1)
        s = importance_weight(lp, old_lp, mode)
        got = _grad(_expect(old_p, s * kl_estimate(lp, ref_lp, "k3", **NOCLAMP)), theta)
        assert (got - g_rev).abs().max() > 1e-3


def test_rpg_family_gradients(dists):
    """Sampling from π_old with π_old as the KL reference (RPG, arXiv 2505.17508 Tables 1/4)."""
    theta, _, old_lp = dists
    lp = torch.log_softmax(theta, -1)
    g_fkl = _grad(_kl(old_lp, lp), theta)  # ∇KL(π_old‖π_θ)
    lp = torch.log_softmax(theta, -1)
    g_rkl = _grad(_kl(lp, old_lp), theta)  # ∇KL(π_θ‖π_old)
    for kind, target in [("rpg_fkl", g_fkl), ("rpg_ufkl", g_fkl), ("rpg_rkl", g_rkl), ("rpg_urkl", g_rkl)]:
        lp = torch.log_softmax(theta, -1)
        got = _grad(_expect(old_lp.exp(), kl_estimate(lp, old_lp, kind, **NOCLAMP)), theta)
        torch.testing.assert_close(got, target, **TOL)


def test_hand_worked_values():
    # Δ = log 2: k1 = log 2, k2 = ½ log²2, k3 = e^{−log 2} + log 2 − 1 = log 2 − ½,
    # forward_k1 = ρ log ρ = ½·log ½, forward_k3 = ½ log ½ − ½ + 1, w = 2: rpg_rkl = 2 log 2,
    # rpg_ufkl = 2 − log 2 − 1, rpg_urkl = 2(log 2 − 1) + 1.
    l2 = math.log(2.0)
    lp, ref = torch.tensor([l2], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    expected = {
        "k1": l2, "abs": l2, "k2": 0.5 * l2 * l2, "k3": l2 - 0.5, "forward_k1": -0.5 * l2,
        "forward_k3": -0.5 * l2 + 0.5, "rpg_fkl": -l2, "rpg_rkl": 2 * l2, "rpg_ufkl": 1 - l2,
        "rpg_urkl": 2 * (l2 - 1) + 1,
    }
    for kind, val in expected.items():
        assert kl_estimate(lp, ref, kind).item() == pytest.approx(val, rel=1e-12), kind
        assert kl_estimate(-lp, ref, "abs").item() == pytest.approx(l2)
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(lp, ref, "low_var_kl")


def test_straight_through_value_and_gradient():
    lp = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.1, 0.4, -0.5], dtype=torch.float64)
    for base in ("k1", "k2", "k3", "abs"):
        out = kl_estimate(lp, ref, base + "+")
        torch.testing.assert_close(out, kl_estimate(lp, ref, base), **TOL)
        (g,) = torch.autograd.grad(out.sum(), lp)
        torch.testing.assert_close(g, (lp - ref).detach(), **TOL)  # ∇½Δ² = Δ


def test_verl_k3_parity_with_clamps():
    """verl kl_penalty 'low_var_kl': kl = clamp(ref − logp, ±20); clamp(e^kl − kl − 1, ±10)."""
    g = torch.Generator().manual_seed(1)
    lp = 15 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    ref = 15 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    kl = (ref - lp).clamp(-20, 20)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), (kl.exp() - kl - 1).clamp(-10, 10), **TOL)
    # TRL parity: no clamps at all
    trl_k3 = (ref - lp).exp() - (ref - lp) - 1
    torch.testing.assert_close(kl_estimate(lp, ref, "k3", **NOCLAMP), trl_k3, rtol=1e-12, atol=0)


def test_clamps_zero_gradient_and_switch_off():
    lp = torch.tensor([-30.0, -25.0, 0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(3, dtype=torch.float64)
    out = kl_estimate(lp, ref, "k3")
    assert out[0].item() == 10.0 and out[1].item() == 10.0  # value clamp active
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert g[0].item() == 0.0 and g[1].item() == 0.0 and g[2].item() != 0.0
    # log-ratio clamp alone: Δ = −30 behaves like Δ = −20, gradient 0
    out = kl_estimate(lp, ref, "k3", value_clamp=None)
    assert out[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-12)
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert g[0].item() == 0.0
    # no clamps: exact value and gradient 1 − e^{−Δ}
    out = kl_estimate(lp, ref, "k3", **NOCLAMP)
    assert out[0].item() == pytest.approx(math.exp(30) - 31, rel=1e-12)
    # RPG without a log clamp overflows to inf before the value clamp, as the RPG code does
    big = torch.tensor([800.0], dtype=torch.float64)
    assert torch.isinf(kl_estimate(big, torch.zeros(1, dtype=torch.float64), "rpg_rkl", **NOCLAMP)).all()
    assert kl_estimate(big, torch.zeros(1, dtype=torch.float64), "rpg_rkl").item() == 10.0
    # k1/k2/abs are never clamped
    assert kl_estimate(big, torch.zeros(1, dtype=torch.float64), "k1").item() == 800.0


@pytest.mark.parametrize("kind", KINDS)
def test_mask_gives_exact_zeros_and_no_nan(kind):
    lp = torch.tensor([[-1.0, float("nan"), -2.0], [float("-inf"), -0.5, float("inf")]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, float("nan")], [-0.1, -0.7, -3.0]])
    mask = torch.tensor([[1, 0, 0], [0, 1, 0]])
    out = kl_estimate(lp, ref, kind, mask=mask)
    assert out.shape == (2, 3)
    assert (out[mask == 0] == 0).all() and torch.isfinite(out).all()
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()
    assert (g[mask == 1] != 0).all() or kind in ("k1+", "k2+", "k3+", "abs+")  # ST: ∇ = Δ, nonzero here too


def test_importance_weight_modes():
    lp = torch.tensor([0.0, -1.0, 30.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.0, 0.0])
    assert torch.equal(importance_weight(lp, old, "none"), torch.ones(3))
    s = importance_weight(lp, old, "differentiable")
    torch.testing.assert_close(s, torch.tensor([math.e, 1.0, math.exp(20)]))
    assert s.requires_grad and not importance_weight(lp, old, "detached").requires_grad
    with pytest.raises(ValueError, match="differentiable"):
        importance_weight(lp, old, "sg")


def test_tempered_logp_exact_and_cheap():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    ref_lp = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
    phi = 0.4
    want = torch.log_softmax(phi * torch.log_softmax(z, -1), -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(tempered_logp(ref_lp, phi, ref_logits=z, chunk_size=3), want, **TOL)
    torch.testing.assert_close(tempered_logp(ref_lp, phi, normalized=False), phi * ref_lp, **TOL)
    assert (tempered_logp(ref_lp, phi, normalized=False) > want).all()  # cheap overstates q_φ for φ < 1
    with pytest.raises(ValueError, match="ref_logits"):
        tempered_logp(ref_lp, phi)


def test_full_kl_matches_definition_and_chunks():
    g = torch.Generator().manual_seed(3)
    a = torch.log_softmax(torch.randn(3, 5, 11, generator=g, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(3, 5, 11, generator=g, dtype=torch.float64), -1)
    rev = (a.exp() * (a - b)).sum(-1)
    fwd = (b.exp() * (b - a)).sum(-1)
    torch.testing.assert_close(full_kl(a, b, "reverse", chunk_size=4), rev, **TOL)
    torch.testing.assert_close(full_kl(a, b, "forward", chunk_size=4), fwd, **TOL)
    mask = torch.tensor([[1, 1, 0, 0, 1]] * 3)
    out = full_kl(a, b, "forward", mask=mask)
    assert (out[mask == 0] == 0).all() and (out[mask == 1] > 0).all()
    with pytest.raises(ValueError, match="reverse"):
        full_kl(a, b, "backward")


def test_full_kl_zero_probabilities_no_nan():
    # q has exact zeros (−inf log-probs): forward KL(q‖π) skips them (0·log 0 = 0)
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    q_logits = torch.tensor([[0.3, float("-inf"), 1.0, float("-inf")]], dtype=torch.float64)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(q_logits, -1)
    fwd = full_kl(lp, lq, "forward")
    q = lq.exp()
    want = sum(q[0, v] * (lq[0, v] - lp[0, v]) for v in (0, 2))
    torch.testing.assert_close(fwd[0], want, **TOL)
    (g,) = torch.autograd.grad(fwd.sum(), logits)
    torch.testing.assert_close(g, lp.exp().detach() - q, **TOL)  # ∂KL(q‖softmax z)/∂z = p − q
    # reverse KL(π‖q) with q = 0 where π > 0 is +inf, not NaN
    assert torch.isposinf(full_kl(lp.detach(), lq, "reverse")).all()
    # reverse KL where π itself has zeros: finite, gradient finite
    lp2 = torch.log_softmax(q_logits.clone().requires_grad_(), -1)
    r = full_kl(lp2, torch.log_softmax(torch.zeros(1, 4, dtype=torch.float64), -1), "reverse")
    assert torch.isfinite(r).all()


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(4)
    z = (5 * torch.randn(4, 3, 13, generator=g, dtype=torch.float64)).requires_grad_()
    h = entropy_from_logits(z, chunk_size=5)
    want = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(h, want, **TOL)
    (g1,) = torch.autograd.grad(h.sum(), z)
    (g2,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(g1, g2, **TOL)
    # masked vocabulary and extreme logits: no NaN, uniform over the live entries
    zm = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")], [1e4, -1e4, 0.0, 3e4]], requires_grad=True)
    hm = entropy_from_logits(zm)
    assert hm[0].item() == pytest.approx(math.log(2), rel=1e-6) and hm[1].abs().item() < 1e-6
    (gm,) = torch.autograd.grad(hm.sum(), zm)
    assert torch.isfinite(gm).all()
    # bf16 input is computed in fp32
    hb = entropy_from_logits(z.detach().to(torch.bfloat16))
    assert hb.dtype == torch.float32
    torch.testing.assert_close(hb.double(), want.detach(), rtol=0, atol=0.1)


def test_import_needs_only_torch():
    import subprocess
    import sys

    code = ("import sys, rlkit.kl; bad = {'triton', 'transformers', 'ray', 'deepspeed', 'vllm'} & set(sys.modules);"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
