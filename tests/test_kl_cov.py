"""Tests for KL-Cov and Clip-Cov: covariance, top-k selection, on-policy zero gradient, Clip-Cov's
zeroed tokens and denominator.

Formulas: docs/algorithms.md § KL-Cov and Clip-Cov."""

import numpy as np
import pytest
import rlkit.algorithms as algos
import torch
from rlkit.algorithms.base import LossInputs
from rlkit.algorithms.kl_cov import (
    ClipCovConfig,
    KLCovConfig,
    clip_cov_loss,
    clip_cov_token_loss,
    kl_cov_loss,
    kl_cov_token_loss,
    token_covariance,
)

F64 = torch.float64


def test_registry_and_defaults():
    kc, cc = algos.get("kl_cov"), algos.get("clip_cov")
    assert kc.config_cls is KLCovConfig and cc.config_cls is ClipCovConfig
    cfg = KLCovConfig()
    assert (cfg.kl_cov_ratio, cfg.ppo_kl_coef) == (0.002, 1.0)
    assert not kc.needs(cfg).ref_logp and kc.needs(cfg).old_logp
    with pytest.raises(ValueError, match="fraction"):
        KLCovConfig(kl_cov_ratio=0.2 * 100)  # a percentage passed by mistake


def test_token_covariance_hand_worked():
    adv = torch.tensor([[1.0, -1.0, 1.0, 9.0]])
    logp = torch.tensor([[-1.0, -2.0, -3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean A = 1/3, mean ℓ = −2 over the valid tokens: Cov = (A − 1/3)(ℓ + 2)
    cov = token_covariance(adv, logp, mask)
    torch.testing.assert_close(cov[0, :3], torch.tensor([2 / 3, 0.0, -2 / 3]))
    assert cov[0, 3] == -torch.inf


def _random(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 4
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, 1, generator=g, dtype=F64).expand(B, T).contiguous()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return logp, old, adv, mask


def test_kl_cov_selects_top_k_and_penalizes_only_those():
    logp, old, adv, mask = _random()
    n_valid = int(mask.sum())  # 18
    ratio = 0.15  # k = max(1, ⌊18·0.15⌋) = 2
    lp = logp.clone().requires_grad_()
    loss, m = kl_cov_token_loss(lp, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    # independent numpy oracle for the covariance and the top-k
    valid = mask.numpy().astype(bool)
    a, l = adv.numpy()[valid], logp.numpy()[valid]
    cov = (a - a.mean()) * (l - l.mean())
    top = np.argsort(-cov)[: max(1, int(n_valid * ratio))]
    expected_sel = np.zeros(n_valid, dtype=bool)
    expected_sel[top] = True
    assert m["selected_B_T"].numpy()[valid].tolist() == expected_sel.tolist()
    assert m["kl_cov_selected"].item() == 2
    s = torch.exp(logp - old)
    lam = (logp - old).abs()
    expected = torch.where(m["selected_B_T"], -adv * s + 0.7 * lam, -adv * s) * mask
    torch.testing.assert_close(loss, expected)
    assert m["ppo_kl"].item() == pytest.approx(((lam * mask).sum() / mask.sum()).item())


def test_kl_cov_ratio_edges_and_no_clipping():
    logp, old, adv, mask = _random(1)
    _, m0 = kl_cov_token_loss(logp, old, adv, mask, kl_cov_ratio=0.0)
    assert m0["kl_cov_selected"].item() == 0
    _, m1 = kl_cov_token_loss(logp, old, adv, mask, kl_cov_ratio=1e-6)  # ⌊N·r⌋ = 0 → k = 1
    assert m1["kl_cov_selected"].item() == 1
    # No ratio clipping: A = +1 and s = 5 give −5 with gradient −5 (PPO would clip at 1.2).
    o = torch.tensor([[-3.0]], dtype=F64)
    lp = (o + np.log(5.0)).requires_grad_()
    loss, _ = kl_cov_token_loss(lp, o, torch.ones(1, 1, dtype=F64), torch.ones(1, 1), kl_cov_ratio=0.0)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-5.0) and lp.grad.item() == pytest.approx(-5.0)


def test_kl_cov_on_policy_penalty_has_no_gradient():
    logp, _, adv, mask = _random(2)
    grads = []
    for coef in (0.0, 1.0):
        lp = logp.clone().requires_grad_()
        loss, m = kl_cov_token_loss(lp, lp.detach(), adv, mask, kl_cov_ratio=0.2, ppo_kl_coef=coef)
        loss.sum().backward()
        grads.append(lp.grad)
    assert m["kl_cov_selected"].item() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # Off-policy, a selected token gets the extra β·sign(λ).
    logp, old, adv, mask = _random(2)
    lp = logp.clone().requires_grad_()
    loss, m = kl_cov_token_loss(lp, old, adv, mask, kl_cov_ratio=0.2, ppo_kl_coef=1.0)
    loss.sum().backward()
    base = -adv * torch.exp(logp - old) * mask
    extra = torch.sign(logp - old) * m["selected_B_T"]
    torch.testing.assert_close(lp.grad, base + extra)


def _clip_cov_case():
    # Built so that the covariances are easy to read: 8 valid tokens, clip range [0, 2].
    adv = torch.tensor([[2.0, 2.0, -2.0, -2.0, 2.0, 0.0, 0.0, 0.0]], dtype=F64)
    logp = torch.tensor([[0.0, -0.2, -2.0, -1.9, 0.1, -1.0, -1.0, -1.0]], dtype=F64)
    ratio = torch.tensor([[1.1, 1.1, 0.9, 0.9, 2.5, 1.0, 1.0, 1.0]], dtype=F64)
    old = logp - ratio.log()
    return logp, old, adv, torch.ones(1, 8)


def test_clip_cov_deterministic_selection_zero_loss_and_denominator():
    logp, old, adv, mask = _clip_cov_case()
    cov = token_covariance(adv, logp, mask)
    # mean A = 0.25, mean ℓ = −0.875; tokens 0, 1, 2, 3, 4 have Cov ≈ 1.53, 1.18, 2.48, 2.27, 1.69
    clipped = torch.tensor([[False, False, False, False, True, False, False, False]])  # A>0, s=2.5>2
    cand = (cov > 1.0) & (cov < 5.0) & ~clipped
    assert cand.sum().item() == 4  # token 4 is in the Cov window but already clipped
    lp = logp.clone().requires_grad_()
    loss, m = clip_cov_token_loss(lp, old, adv, mask, clip_cov_ratio=1.0)  # subset size ≥ #candidates
    assert torch.equal(m["selected_B_T"], cand)
    assert (loss[cand] == 0).all()
    loss.sum().backward()
    assert (lp.grad[cand] == 0).all()
    lp0 = logp.clone().requires_grad_()
    loss0, m0 = clip_cov_token_loss(lp0, old, adv, mask, clip_cov_ratio=0.0)  # nothing detached
    loss0.sum().backward()
    assert m0["selected_B_T"].sum().item() == 0 and (lp0.grad[cand] != 0).all()
    torch.testing.assert_close(lp.grad[~cand], lp0.grad[~cand])
    assert m["pg_clipfrac"].item() == pytest.approx(4 / 8)
    # Through the algorithm: token-mean still divides by all 8 valid tokens.
    inp = LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, num_tokens_global=8.0,
                     num_seqs_global=1.0, old_logp_B_T=old)
    total, _ = clip_cov_loss(inp, ClipCovConfig(clip_cov_ratio=1.0))
    assert total.item() == pytest.approx(loss.sum().item() / 8)


def test_clip_cov_random_subset_is_seeded():
    logp, old, adv, mask = _clip_cov_case()
    picks = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(123)
        _, m = clip_cov_token_loss(logp, old, adv, mask, clip_cov_ratio=0.2, generator=gen)  # ⌊1.6⌋ = 1
        picks.append(m["selected_B_T"])
    assert torch.equal(picks[0], picks[1]) and picks[0].sum().item() == 1
    assert picks[0][0, 4].item() is False  # never the already-clipped token


def test_kl_cov_loss_global_normalization_and_fp32():
    logp, old, adv, mask = _random(3)
    cfg = KLCovConfig(ppo_kl_coef=0.0)  # the selection is per micro-batch by design; the rest is global

    def run(rows, lp, dtype=F64):
        inp = LossInputs(logp_B_T=lp[rows], mask_B_T=mask[rows], advantages_B_T=adv[rows].to(dtype),
                         num_tokens_global=float(mask.sum()), num_seqs_global=4.0,
                         old_logp_B_T=old[rows].to(dtype))
        return kl_cov_loss(inp, cfg)[0]

    lp_full = logp.clone().requires_grad_()
    full = run(slice(None), lp_full)
    full.backward()
    lp = logp.clone().requires_grad_()
    acc = sum(run(r, lp).item() for r in (slice(0, 1), slice(1, 4)))
    run(slice(0, 1), lp).backward()
    run(slice(1, 4), lp).backward()
    assert acc == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, lp_full.grad)
    lp32 = logp.float().requires_grad_()
    v32 = run(slice(None), lp32, torch.float32)
    assert v32.item() == pytest.approx(full.item(), abs=1e-6)
