"""TDPO: hand-worked TDPO1/TDPO2, stop-gradient properties, exact seqKL from the kernel.

Formulas: docs/algorithms.md § TDPO."""

import math

import pytest
import torch
from rlkit.algorithms import PairLossInputs, get
from rlkit.algorithms.tdpo import TDPOConfig, tdpo_loss, tdpo_pair_loss

from rlkit import kl

ALGO = get("tdpo")


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_worked_tdpo1_and_tdpo2():
    # margins m_w = 1, m_l = −1 → u = 2; D_w = 0.5, D_l = 2; β = 0.1, α = 0.5.
    # TDPO1: z = 0.1·(2 − (2 − 0.5)) = 0.05;  TDPO2: z = 0.1·(2 − 0.5·(2 − 0.5)) = 0.125.
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    for variant, z in (("tdpo1", 0.05), ("tdpo2", 0.125)):
        loss, zz = tdpo_pair_loss(t(1.0), t(-1.0), t(0.5), t(2.0), TDPOConfig(variant=variant))
        assert zz.item() == pytest.approx(z, rel=1e-12)
        assert loss.item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-12)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_seqkl_gradients(variant):
    cfg = TDPOConfig(variant=variant, beta=0.1, alpha=0.5)
    mw, ml = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)
    dw = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    dl = torch.tensor([1.1], dtype=torch.float64, requires_grad=True)
    loss, z = tdpo_pair_loss(mw, ml, dw, dl, cfg)
    gw, gl = torch.autograd.grad(loss.sum(), (dw, dl), allow_unused=True, materialize_grads=True)
    c = cfg.beta * (1 - sig(z.item()))
    if variant == "tdpo1":  # training raises the chosen KL: dL/dD_w = −β(1 − σ(z)) < 0
        assert gw.item() == pytest.approx(-c, rel=1e-12) and gw.item() < 0
        assert gl.item() == pytest.approx(c, rel=1e-12)
    else:  # TDPO2: zero gradient through the chosen-side KL, rejected side scaled by α
        assert gw.item() == 0.0
        assert gl.item() == pytest.approx(cfg.alpha * c, rel=1e-12)


def build_pair_batch(P=3, T=6, V=7, dtype=torch.float64, seed=0, underflow=False):
    """Policy/reference logits with the causal shift and −100 labels, as the reference code sees them."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for side in ("c", "r"):
        logits = torch.randn(P, T + 1, V, generator=g, dtype=dtype)
        ref_logits = torch.randn(P, T + 1, V, generator=g, dtype=dtype)
        if underflow:
            ref_logits[:, :, 0] = -200.0  # reference probability underflows to 0 in fp32
        labels = torch.randint(1, V, (P, T + 1), generator=g)
        lengths = torch.randint(1, T + 1, (P,), generator=g)
        labels[:, 0] = -100  # prompt token
        labels[torch.arange(T + 1) > lengths[:, None]] = -100  # padding
        data[side] = (logits, ref_logits, labels)
    return data


def inputs_from_logits(data, logits_c, logits_r, dtype):
    out = {}
    for side, logits in (("c", logits_c), ("r", logits_r)):
        _, ref_logits, labels = data[side]
        lab = labels[:, 1:]  # causal shift: logits at t−1 score token t
        mask = (lab != -100).to(dtype)
        idx = lab.clamp(min=0).unsqueeze(-1)
        lp_full = torch.log_softmax(logits[:, :-1], -1)
        ref_full = torch.log_softmax(ref_logits[:, :-1].to(dtype), -1)
        out[side] = {"logp": lp_full.gather(-1, idx).squeeze(-1), "ref": ref_full.gather(-1, idx).squeeze(-1),
                     "mask": mask, "kl": kl.full_kl(lp_full, ref_full.detach(), "forward", mask=mask)}
    c, r = out["c"], out["r"]
    return PairLossInputs(logp_c_P_T=c["logp"], logp_r_P_T=r["logp"], mask_c_P_T=c["mask"], mask_r_P_T=r["mask"],
                          ref_logp_c_P_T=c["ref"], ref_logp_r_P_T=r["ref"], num_pairs_global=float(c["mask"].shape[0]),
                          ref_full_kl_c_P_T=c["kl"], ref_full_kl_r_P_T=r["kl"])


def slow_seqkl(logits, ref_logits, labels):
    """Σ over labelled positions of Σ_v p_ref(v)(log p_ref(v) − log p(v)), by explicit loops."""
    out = []
    for b in range(logits.shape[0]):
        s = 0.0
        for t in range(1, logits.shape[1]):
            if labels[b, t] == -100:
                continue
            p = torch.softmax(logits[b, t - 1].double(), -1)
            q = torch.softmax(ref_logits[b, t - 1].double(), -1)
            s += sum(float(q[v] * (torch.log(q[v]) - torch.log(p[v]))) for v in range(p.numel()))
        out.append(s)
    return torch.tensor(out, dtype=torch.float64)


def test_seqkl_matches_slow_loop_and_rewards_are_detached():
    data = build_pair_batch()
    inp = inputs_from_logits(data, data["c"][0], data["r"][0], torch.float64)
    _, m = tdpo_loss(inp, TDPOConfig())
    dw = slow_seqkl(*data["c"])
    dl = slow_seqkl(*data["r"])
    assert m["kl/chosen"] == pytest.approx(float(dw.mean()), rel=1e-10)
    assert m["kl/rejected"] == pytest.approx(float(dl.mean()), rel=1e-10)
    margin_w = ((inp.logp_c_P_T - inp.ref_logp_c_P_T) * inp.mask_c_P_T).sum(-1)
    assert m["rewards/chosen"] == pytest.approx(float((0.1 * (margin_w + dw)).mean()), rel=1e-10)
    assert isinstance(m["rewards/chosen"], float)


def test_tdpo2_end_to_end_no_gradient_through_chosen_kl():
    # With TDPO2, replacing the chosen-side KL tensor by a constant of equal value leaves the
    # gradient on the chosen policy logits unchanged; with TDPO1 it changes it.
    data = build_pair_batch(seed=1)
    for variant, same in (("tdpo2", True), ("tdpo1", False)):
        lc = data["c"][0].clone().requires_grad_(True)
        inp = inputs_from_logits(data, lc, data["r"][0], torch.float64)
        (g1,) = torch.autograd.grad(tdpo_loss(inp, TDPOConfig(variant=variant))[0], lc)
        lc2 = data["c"][0].clone().requires_grad_(True)
        inp2 = inputs_from_logits(data, lc2, data["r"][0], torch.float64)
        inp2.ref_full_kl_c_P_T = inp2.ref_full_kl_c_P_T.detach()
        (g2,) = torch.autograd.grad(tdpo_loss(inp2, TDPOConfig(variant=variant))[0], lc2)
        assert torch.allclose(g1, g2, atol=1e-14) == same


def test_underflowing_reference_stays_finite():
    data = build_pair_batch(dtype=torch.float32, underflow=True)
    logits, ref_logits, _ = data["c"]
    # The reference code's log(softmax(ref)) form: an underflowed probability gives NaN.
    q = torch.softmax(ref_logits[:, :-1], -1)
    naive = (q * (q.log() - torch.log_softmax(logits[:, :-1], -1))).sum(-1)
    assert torch.isnan(naive).any()
    lc = data["c"][0].clone().requires_grad_(True)
    inp = inputs_from_logits(data, lc, data["r"][0], torch.float32)
    loss, m = tdpo_loss(inp, TDPOConfig())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lc.grad).all()
    assert all(math.isfinite(v) for v in m.values())


def test_missing_full_kl_raises_and_needs():
    data = build_pair_batch()
    inp = inputs_from_logits(data, data["c"][0], data["r"][0], torch.float64)
    inp.ref_full_kl_r_P_T = None
    with pytest.raises(ValueError, match="ref_full_kl"):
        tdpo_loss(inp, TDPOConfig())
    n = ALGO.needs(ALGO.make_config())
    assert n.ref_full_kl and n.pairs and n.ref_logp and ALGO.kind == "preference"
    assert ALGO.make_config().variant == "tdpo2"
    with pytest.raises(ValueError, match="variant"):
        ALGO.make_config({"variant": "tdpo3"})


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_split_over_ranks_matches_full_batch(variant):
    data = build_pair_batch(P=4, seed=2)
    lc = data["c"][0].clone().requires_grad_(True)
    inp = inputs_from_logits(data, lc, data["r"][0], torch.float64)
    cfg = TDPOConfig(variant=variant)
    full, _ = tdpo_loss(inp, cfg)
    (g_full,) = torch.autograd.grad(full, lc, retain_graph=True)
    total = 0.0
    for s in (slice(0, 1), slice(1, 4)):
        part = PairLossInputs(*(getattr(inp, f)[s] for f in ("logp_c_P_T", "logp_r_P_T", "mask_c_P_T",
                                                            "mask_r_P_T", "ref_logp_c_P_T", "ref_logp_r_P_T")),
                              num_pairs_global=4.0, ref_full_kl_c_P_T=inp.ref_full_kl_c_P_T[s],
                              ref_full_kl_r_P_T=inp.ref_full_kl_r_P_T[s])
        total = total + tdpo_loss(part, cfg)[0]
    (g_split,) = torch.autograd.grad(total, lc)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10, atol=1e-14)


def test_fp32_matches_fp64():
    data = build_pair_batch(seed=4)
    l64, _ = tdpo_loss(inputs_from_logits(data, data["c"][0], data["r"][0], torch.float64), TDPOConfig())
    data32 = {k: (a.float(), b.float(), c) for k, (a, b, c) in data.items()}
    l32, _ = tdpo_loss(inputs_from_logits(data32, data32["c"][0], data32["r"][0], torch.float32), TDPOConfig())
    assert l32.dtype == torch.float32 and abs(l32.item() - l64.item()) < 1e-6
