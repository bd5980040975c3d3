"""f-DPO: hand-worked losses, DPO equivalence, α limits and TRL mapping, overflow.

Formulas: docs/algorithms.md § f-DPO."""

import math

import pytest
import torch
import torch.nn.functional as F
from rlkit.algorithms import PairLossInputs, get
from rlkit.algorithms.fdpo import FDPOConfig, fdpo_loss, fdpo_score

ALGO = get("fdpo")


def pair_inputs(lc, lr, rc, rr, mc, mr, n_global=None):
    return PairLossInputs(logp_c_P_T=lc, logp_r_P_T=lr, mask_c_P_T=mc, mask_r_P_T=mr,
                          ref_logp_c_P_T=rc, ref_logp_r_P_T=rr,
                          num_pairs_global=float(lc.shape[0] if n_global is None else n_global))


def random_pairs(P=4, T=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lc = -torch.rand(P, T, generator=g, dtype=dtype) * 3
    lr = -torch.rand(P, T, generator=g, dtype=dtype) * 3
    rc = -torch.rand(P, T, generator=g, dtype=dtype) * 3
    rr = -torch.rand(P, T, generator=g, dtype=dtype) * 3
    mc = (torch.arange(T) < torch.randint(1, T + 1, (P, 1), generator=g)).to(dtype)
    mr = (torch.arange(T) < torch.randint(1, T + 1, (P, 1), generator=g)).to(dtype)
    return lc, lr, rc, rr, mc, mr


def test_hand_worked_reverse_kl_with_padding_garbage():
    # chosen: ℓ = [−1, −2], ℓ_ref = [−2, −3] → l_w = 2; rejected: ℓ = [−3, NaN(pad)], ℓ_ref = [−2, 7(pad)]
    # → l_l = −1. z = β(l_w − l_l) = 0.1·3 = 0.3; loss = softplus(−0.3) = log(1 + e^−0.3).
    lc = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    lr = torch.tensor([[-3.0, float("nan")]], requires_grad=True)
    inp = pair_inputs(lc, lr, torch.tensor([[-2.0, -3.0]]), torch.tensor([[-2.0, 7.0]]),
                      torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    loss, m = fdpo_loss(inp, FDPOConfig())
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
    loss.backward()
    assert torch.isfinite(lr.grad).all() and lr.grad[0, 1] == 0
    # dL/dℓ_w,t = −β(1 − σ(z)) for each chosen token.
    assert lc.grad[0, 0].item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.3))), rel=1e-6)
    assert m["rewards/margins"] == pytest.approx(0.3, rel=1e-6)
    assert m["rewards/accuracies"] == 1.0


def test_hand_worked_forward_kl_js_alpha_scores():
    l = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64)
    # forward KL: s = −e^{−l} → [−1, −1/2]
    assert torch.allclose(fdpo_score(l, "forward_kl"), torch.tensor([-1.0, -0.5], dtype=torch.float64))
    # JS: s = log σ(l) = log(u/(1+u)) → [log ½, log ⅔]
    assert torch.allclose(fdpo_score(l, "js"), torch.log(torch.tensor([0.5, 2 / 3], dtype=torch.float64)))
    # α = ½: s = −e^{−l/2}/½ → [−2, −2/√2]
    assert torch.allclose(fdpo_score(l, "alpha", alpha=0.5),
                          torch.tensor([-2.0, -math.sqrt(2.0)], dtype=torch.float64))
    # forward-KL loss with l_w = 0, l_l = log 2: z = 0.1(−1 + ½) = −0.05, loss = softplus(0.05).
    z = torch.zeros(1, 1, dtype=torch.float64)
    inp = pair_inputs(z, torch.full((1, 1), math.log(2.0), dtype=torch.float64), z.clone(), z.clone(),
                      torch.ones(1, 1), torch.ones(1, 1))
    loss, _ = fdpo_loss(inp, FDPOConfig(divergence="forward_kl"))
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.05)), rel=1e-12)


def test_reverse_kl_equals_standard_dpo_value_and_gradient():
    lc, lr, rc, rr, mc, mr = random_pairs()
    lc.requires_grad_(True)
    loss, _ = fdpo_loss(pair_inputs(lc, lr, rc, rr, mc, mr), FDPOConfig(beta=0.3))
    (g_ours,) = torch.autograd.grad(loss, lc)
    lc2 = lc.detach().clone().requires_grad_(True)
    pi = (lc2 * mc).sum(-1) - (lr * mr).sum(-1)
    ref = (rc * mc).sum(-1) - (rr * mr).sum(-1)
    dpo = -F.logsigmoid(0.3 * (pi - ref)).mean()  # Rafailov et al. 2023, Eq. 7
    (g_dpo,) = torch.autograd.grad(dpo, lc2)
    assert torch.allclose(loss, dpo, rtol=1e-12)
    assert torch.allclose(g_ours, g_dpo, rtol=1e-10)


def test_alpha_limits_reach_reverse_and_forward():
    lw = torch.tensor([1.3, -0.7, 2.0], dtype=torch.float64)
    ll = torch.tensor([-0.4, 0.9, -1.5], dtype=torch.float64)
    diff = lambda div, **kw: fdpo_score(lw, div, **kw) - fdpo_score(ll, div, **kw)
    # α → 0: −e^{−αl}/α = −1/α + l + O(α) → differences tend to l_w − l_l (reverse KL).
    assert torch.allclose(diff("alpha", alpha=1e-7), diff("reverse_kl"), atol=1e-6)
    # α → 1: −e^{−αl}/α → −e^{−l} (forward KL), error O(1 − α).
    assert torch.allclose(diff("alpha", alpha=1 - 1e-7), diff("forward_kl"), atol=1e-5)


def trl_scores(l, divergence, alpha_trl):
    """Replay of TRL ≥ 0.29 ``DPOTrainer._compute_loss`` score arithmetic (f′ incl. its constants)."""
    if divergence == "forward_kl":
        return 1 - torch.exp(-l)
    if divergence == "js":
        return math.log(2) + F.logsigmoid(l)
    return (torch.exp((alpha_trl - 1.0) * l) - 1.0) / (alpha_trl - 1.0)


@pytest.mark.parametrize("alpha_paper", [0.1, 0.5, 0.8])
def test_alpha_maps_to_trl_as_one_minus_alpha(alpha_paper):
    lw = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    ll = torch.tensor([-1.0, 1.0, 0.2], dtype=torch.float64)
    ours = fdpo_score(lw, "alpha", alpha=alpha_paper) - fdpo_score(ll, "alpha", alpha=alpha_paper)
    trl = trl_scores(lw, "alpha", 1 - alpha_paper) - trl_scores(ll, "alpha", 1 - alpha_paper)
    assert torch.allclose(ours, trl, rtol=1e-12)
    for div in ("forward_kl", "js"):  # additive constants of TRL's f′ cancel in the difference
        assert torch.allclose(fdpo_score(lw, div) - fdpo_score(ll, div),
                              trl_scores(lw, div, None) - trl_scores(ll, div, None), rtol=1e-12)


@pytest.mark.parametrize("div", ["forward_kl", "alpha", "js", "reverse_kl"])
def test_long_sequences_stay_finite(div):
    # 400 tokens at −12 nats below the reference: l = −4800, e^{−l} overflows anything unclamped.
    T = 400
    lc = torch.full((2, T), -14.0, requires_grad=True)
    lr = torch.full((2, T), -14.0, requires_grad=True)
    rc = torch.full((2, T), -2.0)
    inp = pair_inputs(lc, lr, rc, torch.full((2, T), -2.5), torch.ones(2, T), torch.ones(2, T))
    loss, m = fdpo_loss(inp, FDPOConfig(divergence=div, alpha=0.3))
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in m.values())
    assert torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()


def test_config_validation():
    with pytest.raises(ValueError, match="divergence"):
        ALGO.make_config({"divergence": "kl"})
    with pytest.raises(ValueError, match="pairwise-difference"):
        ALGO.make_config({"divergence": "forward_kl", "loss_type": "nca_pair"})
    with pytest.raises(ValueError, match="alpha"):
        ALGO.make_config({"divergence": "alpha", "alpha": 1.0})
    with pytest.raises(ValueError, match="unknown key"):
        ALGO.make_config({"f_alpha_divergence_coef": 0.5})
    n = ALGO.needs(ALGO.make_config())
    assert n.pairs and n.ref_logp and not n.old_logp and not n.ref_full_kl


def test_label_smoothing_and_hinge_hand_worked():
    one = torch.ones(1, 1, dtype=torch.float64)
    inp = pair_inputs(2 * one, -one, 0 * one, 0 * one, one, one)  # l_w = 2, l_l = −1, z = 0.3
    loss, _ = fdpo_loss(inp, FDPOConfig(label_smoothing=0.1))
    expect = 0.9 * math.log1p(math.exp(-0.3)) + 0.1 * math.log1p(math.exp(0.3))
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    loss, _ = fdpo_loss(inp, FDPOConfig(loss_type="hinge"))
    assert loss.item() == pytest.approx(0.7, rel=1e-12)  # relu(1 − 0.3)


@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_split_over_ranks_matches_full_batch(div):
    lc, lr, rc, rr, mc, mr = random_pairs(P=6)
    cfg = FDPOConfig(divergence=div)
    lc.requires_grad_(True)
    full, _ = fdpo_loss(pair_inputs(lc, lr, rc, rr, mc, mr), cfg)
    (g_full,) = torch.autograd.grad(full, lc)
    parts = [fdpo_loss(pair_inputs(lc[s], lr[s], rc[s], rr[s], mc[s], mr[s], n_global=6), cfg)[0]
             for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    total = sum(parts)
    (g_split,) = torch.autograd.grad(total, lc)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10)


@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_fp32_matches_fp64(div):
    args64 = random_pairs(dtype=torch.float64, seed=3)
    args32 = [a.float() for a in args64]
    l64, _ = fdpo_loss(pair_inputs(*args64), FDPOConfig(divergence=div))
    l32, _ = fdpo_loss(pair_inputs(*args32), FDPOConfig(divergence=div))
    assert l32.dtype == torch.float32
    assert abs(l32.item() - l64.item()) <= 1e-6 * max(1.0, abs(l64.item()))


def test_bf16_inputs_are_summed_in_fp32():
    # 300 tokens of bf16 log-probs: summing in bf16 would round the sequence sums to ~1 nat.
    args = [a.to(torch.bfloat16) for a in random_pairs(P=3, T=300, seed=8)]
    loss_bf16, _ = fdpo_loss(pair_inputs(*args), FDPOConfig(divergence="js"))
    loss_ref, _ = fdpo_loss(pair_inputs(*[a.double() for a in args]), FDPOConfig(divergence="js"))
    assert loss_bf16.dtype == torch.float32
    assert abs(loss_bf16.item() - loss_ref.item()) < 1e-5
