"""Tests for RPG: the eight forms, expected-gradient identities by exact enumeration over a small
vocabulary (the loss of each form has expected gradient −∇J; the RPG KL family), the RPG dual clip,
advantages, global normalization.

Formulas: docs/algorithms.md § RPG."""

import itertools
import math

import pytest
import rlkit.algorithms as algos
import torch
from rlkit.algorithms.base import AdvantageInputs, LossInputs
from rlkit.algorithms.rpg import (
    RPGConfig,
    rpg_advantages,
    rpg_kl_component,
    rpg_loss,
    rpg_needs,
    rpg_reinforce_token_loss,
)

F64 = torch.float64
FORMS = list(itertools.product(("forward", "reverse"), (True, False), ("differentiable", "reinforce")))


def test_eight_forms_and_needs():
    kinds = {(d, n): RPGConfig(kl_direction=d, normalized=n).kl_kind for d, n, _ in FORMS}
    assert kinds == {("forward", True): "fkl", ("reverse", True): "rkl",
                     ("forward", False): "ufkl", ("reverse", False): "urkl"}
    assert algos.get("rpg").make_config({"style": "reinforce"}).style == "reinforce"
    n = rpg_needs(RPGConfig())
    assert n.old_logp and not n.ref_logp  # iterative reference: π_old is the KL reference
    assert rpg_needs(RPGConfig(kl_reference="ref")).ref_logp
    with pytest.raises(ValueError, match="iterative"):
        RPGConfig(style="reinforce", kl_reference="ref")
    with pytest.raises(ValueError, match="kl_direction"):
        RPGConfig(kl_direction="sideways")


def _divergence(kind, logp, logp_old):
    """The D in J = E_θ[R] − β·D, written out over the full vocabulary (paper Table 1/4)."""
    p, q = logp.exp(), logp_old.exp()
    if kind == "fkl":
        return (q * (logp_old - logp)).sum()
    if kind == "rkl":
        return (p * (logp - logp_old)).sum()
    if kind == "ufkl":
        return (q * (logp_old - logp)).sum() + p.sum() - q.sum()
    return (p * (logp - logp_old)).sum() - p.sum() + q.sum()


# The 8 forms; the REINFORCE ones with both the hard clip and the RPG dual clip.
IDENTITY_CASES = [(d, n, s, c) for d, n, s in FORMS for c in (("dual", "hard") if s == "reinforce" else ("dual",))]


@pytest.mark.parametrize("direction,normalized,style,clip", IDENTITY_CASES)
def test_expected_gradient_equals_minus_grad_J(direction, normalized, style, clip):
    """E_{y~π_old}[∇ loss(y)] = −∇J exactly, with clipping out of reach (paper Tables 1, 2, 4).

    Rows are the V vocabulary items (T = 1); ∂loss/∂ℓ_y is taken from ``rpg_loss`` and reweighted
    by π_old(y), which turns the batch into the exact expectation over π_old.
    """
    V, beta = 6, 0.3
    gen = torch.Generator().manual_seed(11)
    old_logits = torch.randn(V, generator=gen, dtype=F64)
    theta = (old_logits + 0.4 * torch.randn(V, generator=gen, dtype=F64)).requires_grad_()
    reward = torch.randn(V, generator=gen, dtype=F64)
    logp_old = torch.log_softmax(old_logits, -1)
    logp = torch.log_softmax(theta, -1)
    cfg = RPGConfig(kl_direction=direction, normalized=normalized, style=style, beta=beta,
                    clip_low=0.99, clip_high=1e6, dual_clip_c=1e7, reinforce_clip=clip,
                    log_ratio_clamp=None, kl_value_clamp=None, loss_agg_mode="seq-mean-token-sum")
    lp = logp.unsqueeze(-1)
    inp = LossInputs(logp_B_T=lp, mask_B_T=torch.ones(V, 1), advantages_B_T=reward.unsqueeze(-1),
                     num_tokens_global=float(V), num_seqs_global=1.0, old_logp_B_T=logp_old.unsqueeze(-1))
    total, _ = rpg_loss(inp, cfg)
    d_row = torch.autograd.grad(total, lp, retain_graph=True)[0].squeeze(-1)
    expected_grad = torch.autograd.grad(logp, theta, grad_outputs=logp_old.exp() * d_row, retain_graph=True)[0]
    J = (logp.exp() * reward).sum() - beta * _divergence(cfg.kl_kind, logp, logp_old)
    minus_grad_J = -torch.autograd.grad(J, theta)[0]
    torch.testing.assert_close(expected_grad, minus_grad_J, rtol=1e-10, atol=1e-12)


def _tok(w, adv, kind="ufkl", beta=0.1, **kw):
    old = torch.full((1, len(w)), -2.0, dtype=F64)
    logp = (old + torch.tensor([w], dtype=F64).log()).requires_grad_()
    a = torch.tensor([adv], dtype=F64)
    loss, m = rpg_reinforce_token_loss(logp, old, a, torch.ones_like(old), kind=kind, beta=beta,
                                       clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, **kw)
    loss.sum().backward()
    return logp, loss, m


def test_rpg_dual_clip_hand_worked():
    # UFKL, β = 0.1, C = β(1 − w̄), w̄ = clip(w, 0.8, 1.28); live gradient −(A·w + C).
    #   tok0 A=+1 w=1.1 : live, C = −0.01,  grad −(1.1 − 0.01)  = −1.09
    #   tok1 A=+1 w=1.5 : w ≥ 1.28, constant, grad 0
    #   tok2 A=−1 w=0.5 : w < 0.8, constant, grad 0
    #   tok3 A=−1 w=1.1 : live, grad −(−1.1 − 0.01)  = 1.11
    #   tok4 A=−1 w=2.0 : 1.28 ≤ w < c, live with w̄ = 1.28: C = −0.028, grad −(−2 − 0.028) = 2.028
    #   tok5 A=−1 w=4.0 : w ≥ c = 3, constant, grad 0
    logp, loss, m = _tok([1.1, 1.5, 0.5, 1.1, 2.0, 4.0], [1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.09, 0.0, 0.0, 1.11, 2.028, 0.0]], dtype=F64))
    assert logp.grad[0, [1, 2, 5]].eq(0).all()
    # reported constant (code value): tok1 −(A(1+ε_high) − C)·ℓ = −(1.28 + 0.028)·ℓ
    lp1 = logp[0, 1].item()
    assert loss[0, 1].item() == pytest.approx(-(1.28 + 0.028) * lp1)
    assert m["pg_clipfrac"].item() == pytest.approx(3 / 6)
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)


def test_rpg_hard_clip_hand_worked():
    # Hard clip: grad −(A·w̄ + C(w̄)) everywhere. A=+1, w=1.5: w̄ = 1.28, C = −0.028 → −1.252.
    # RKL at w = 0.5 with A = −1: w̄ = 0.8, C = −β·0.8(log 0.8 + 1) → grad −(−0.8 + C).
    logp, _, _ = _tok([1.5], [1.0], clip="hard")
    assert logp.grad.item() == pytest.approx(-1.252)
    logp, _, _ = _tok([0.5], [-1.0], kind="rkl", clip="hard")
    c = -0.1 * 0.8 * (math.log(0.8) + 1)
    assert logp.grad.item() == pytest.approx(-(-0.8 + c))


def test_branch_rule_code_vs_paper():
    # A = 0.01 > 0 but A' = A + C/w = 0.01 + β(1 − 1.28)/1.5 < 0 (β = 1, UFKL, w = 1.5).
    # Code rule (sign of A): w ≥ 1+ε_high → constant, gradient 0.
    # Paper rule (sign of A'): negative branch, 0.8 ≤ w < c → live, gradient −(A·w + C) = 0.265.
    logp, _, _ = _tok([1.5], [0.01], beta=1.0, branch_on="advantage")
    assert logp.grad.item() == 0.0
    logp, _, _ = _tok([1.5], [0.01], beta=1.0, branch_on="paper")
    assert logp.grad.item() == pytest.approx(-(0.01 * 1.5 - 0.28))


def test_kl_components():
    wb = torch.tensor([0.8, 1.0, 1.2], dtype=F64)
    torch.testing.assert_close(rpg_kl_component(wb, "fkl", 0.5), torch.full_like(wb, 0.5))
    torch.testing.assert_close(rpg_kl_component(wb, "ufkl", 0.5), 0.5 * (1 - wb))
    torch.testing.assert_close(rpg_kl_component(wb, "rkl", 0.5), -0.5 * wb * (wb.log() + 1))
    torch.testing.assert_close(rpg_kl_component(wb, "urkl", 0.5), -0.5 * wb * wb.log())


def test_differentiable_assembly_and_clamps():
    """loss = agg(dual-clip PPO) + β·agg(w(log w − 1) + 1) for URKL; values clamped to ±10."""
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(3, 4, generator=gen, dtype=F64) * 2
    logp = old + 0.3 * torch.randn(3, 4, generator=gen, dtype=F64)
    logp[2, 3] = old[2, 3] + 4.0  # w = e⁴: urkl = e⁴·3 + 1 ≈ 164.8 → clamped to 10
    adv = torch.randn(3, 1, generator=gen, dtype=F64).expand(3, 4)
    mask = torch.ones(3, 4)
    cfg = RPGConfig(kl_direction="reverse", normalized=False, beta=0.5)
    inp = LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, num_tokens_global=12.0,
                     num_seqs_global=3.0, old_logp_B_T=old)
    total, m = rpg_loss(inp, cfg)
    s = torch.exp(logp - old)
    pg = torch.maximum(-adv * s, -adv * s.clamp(0.8, 1.28))
    pg = torch.where(adv < 0, torch.minimum(pg, -10.0 * adv), pg)
    lw = logp - old
    urkl = (torch.exp(lw) * (lw - 1) + 1).clamp(-10, 10)
    assert total.item() == pytest.approx((pg.mean() + 0.5 * urkl.mean()).item(), rel=1e-12)
    assert m["kl_mean"] == pytest.approx(urkl.mean().item(), rel=1e-12)


def test_no_overflow_with_huge_log_ratio():
    old = torch.tensor([[-100.0]], dtype=F64)
    lp = torch.tensor([[0.0]], dtype=F64, requires_grad=True)
    for style in ("differentiable", "reinforce"):
        inp = LossInputs(logp_B_T=lp, mask_B_T=torch.ones(1, 1), advantages_B_T=torch.ones(1, 1, dtype=F64),
                         num_tokens_global=1.0, num_seqs_global=1.0, old_logp_B_T=old)
        total, _ = rpg_loss(inp, RPGConfig(style=style, kl_direction="reverse"))
        total.backward()
        assert math.isfinite(total.item()) and torch.isfinite(lp.grad).all()


def test_advantages_group_and_batch_mean():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    r = torch.tensor([1.0, 0.0, 1.0, 0.25])
    ids = torch.tensor([0, 0, 0, 5])
    adv, _ = rpg_advantages(AdvantageInputs(r, ids, mask), RPGConfig())
    # group 0 mean 2/3, no std division; singleton group 5 keeps its raw score
    torch.testing.assert_close(adv, torch.tensor([[1 / 3, 1 / 3], [-2 / 3, 0], [1 / 3, 1 / 3], [0.25, 0.25]]))
    adv_b, _ = rpg_advantages(AdvantageInputs(r, ids, mask), RPGConfig(baseline="batch"))
    torch.testing.assert_close(adv_b[:, 0], r - r.mean())


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_microbatch_invariance_and_fp32(style):
    gen = torch.Generator().manual_seed(8)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 3
    logp = old + 0.25 * torch.randn(B, T, generator=gen, dtype=F64)
    adv = torch.randn(B, 1, generator=gen, dtype=F64).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=gen) < 0.8).long()
    mask[:, 0] = 1
    cfg = RPGConfig(style=style, beta=0.05)
    n_tok = float(mask.sum())

    def run(rows, lp, n=n_tok, dtype=F64):
        inp = LossInputs(logp_B_T=lp[rows], mask_B_T=mask[rows], advantages_B_T=adv[rows].to(dtype),
                         num_tokens_global=n, num_seqs_global=float(B), old_logp_B_T=old[rows].to(dtype))
        return rpg_loss(inp, cfg)[0]

    lp_full = logp.clone().requires_grad_()
    full = run(slice(None), lp_full)
    full.backward()
    lp = logp.clone().requires_grad_()
    acc = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = run(rows, lp)
        part.backward()
        acc += part.item()
    assert acc == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, lp_full.grad, rtol=1e-10, atol=1e-14)
    lp32 = logp.float().requires_grad_()
    v32 = run(slice(None), lp32, dtype=torch.float32)
    v32.backward()
    assert v32.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(lp32.grad.double(), lp_full.grad, rtol=1e-5, atol=1e-6)
