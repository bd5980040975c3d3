"""G-OPD / ExOPD: the per-token advantage, λ validation, gradient at ratio 1.

Formulas: docs/algorithms.md § G-OPD / ExOPD."""

import math

import pytest
import torch
from rlkit.algorithms import AdvantageInputs, LossInputs, get
from rlkit.algorithms.exopd import (
    ExOPDConfig,
    exopd_advantages,
    exopd_loss,
    gopd_token_advantages,
)

ALGO = get("exopd")


def batch(B=4, T=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -torch.rand(B, T, generator=g, dtype=dtype) * 3
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).to(dtype)
    return lp(), lp(), lp(), mask  # old (student), teacher, reference, mask


def loss_inputs(logp, old, adv, mask, teacher=None, ref=None, n_tokens=None):
    return LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, old_logp_B_T=old,
                      teacher_logp_B_T=teacher, ref_logp_B_T=ref,
                      num_tokens_global=float(mask.sum() if n_tokens is None else n_tokens),
                      num_seqs_global=float(mask.shape[0]))


def test_hand_worked_advantage():
    # one token: log π_old = −2, log π* = −1, log π_ref = −3.
    # λ = 1.25: A = 1.25·(−1) + (1 − 1.25)·(−3) − (−2) = −1.25 + 0.75 + 2 = 1.5
    # λ = 1 (OPD): A = −1 + 2 = 1;  λ = 0: A = log π_ref − log π_old = −3 + 2 = −1.
    o, t, r, m = (torch.tensor([[v]], dtype=torch.float64) for v in (-2.0, -1.0, -3.0, 1.0))
    assert gopd_token_advantages(o, t, r, m, lam=1.25).item() == pytest.approx(1.5)
    assert gopd_token_advantages(o, t, None, m, lam=1.0).item() == pytest.approx(1.0)
    assert gopd_token_advantages(o, t, r, m, lam=0.0).item() == pytest.approx(-1.0)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.25, 2.0])
def test_advantage_formula_and_masking(lam):
    old, teacher, ref, mask = batch()
    old[mask == 0] = float("nan")  # padding garbage must not leak
    inp = AdvantageInputs(rewards_B=torch.zeros(4), group_ids_B=torch.arange(4), mask_B_T=mask,
                          old_logp_B_T=old, teacher_logp_B_T=teacher, ref_logp_B_T=ref)
    adv, metrics = exopd_advantages(inp, ExOPDConfig(lam=lam, reference="student_init"))
    expect = (lam * teacher + (1 - lam) * ref - old) * mask
    assert torch.allclose(adv[mask == 1], expect[mask == 1], rtol=1e-12)
    assert (adv[mask == 0] == 0).all() and all(math.isfinite(v) for v in metrics.values())


def test_lambda_without_reference_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        ALGO.make_config({"lam": 1.25})
    cfg = ALGO.make_config({"lam": 1.25, "reference": "student_init"})
    assert ALGO.needs(cfg).ref_logp and ALGO.needs(cfg).teacher_logp
    # λ = 1 up to float noise: OPD, the reference cancels and is not scheduled (no float equality)
    assert not ALGO.needs(ALGO.make_config({"lam": 1.0 + 1e-12})).ref_logp
    old, teacher, _, mask = batch()
    inp = AdvantageInputs(rewards_B=torch.zeros(4), group_ids_B=torch.arange(4), mask_B_T=mask,
                          old_logp_B_T=old, teacher_logp_B_T=teacher)
    with pytest.raises(ValueError, match="reference log-probs"):
        exopd_advantages(inp, cfg)  # runtime did not provide ref log-probs: not silently ignored
    with pytest.raises(ValueError, match="reference"):
        ALGO.make_config({"lam": 1.25, "reference": "base"})


@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_gradient_at_ratio_one_is_minus_advantage(lam):
    old, teacher, ref, mask = batch(seed=1)
    adv = gopd_token_advantages(old, teacher, ref, mask, lam=lam)
    logp = old.clone().requires_grad_(True)  # ℓ^old = SG[ℓ]: ratio 1, no clip active
    loss, _ = exopd_loss(loss_inputs(logp, logp.detach(), adv, mask), ExOPDConfig(lam=lam, reference="student_init"))
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -adv * mask / mask.sum(), rtol=1e-12)  # −A_t·∇ℓ_t / N (token-mean)


def test_clipped_region_has_zero_gradient():
    # A = 1 > 0 and ratio e^{0.5} ≈ 1.65 > 1.2: the clipped branch, gradient exactly 0.
    m = torch.ones(1, 1, dtype=torch.float64)
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    loss, metrics = exopd_loss(loss_inputs(logp, torch.full((1, 1), -0.5, dtype=torch.float64), m, m), ExOPDConfig())
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == 0.0 and loss.item() == pytest.approx(-1.2) and metrics["pg_clipfrac"] == 1.0


def test_current_policy_advantage_uses_detached_current_logp():
    old, teacher, ref, mask = batch(seed=2)
    logp = (old + 0.05).requires_grad_(True)
    cfg = ExOPDConfig(lam=1.25, reference="student_init", advantage_policy="current")
    stale = gopd_token_advantages(old, teacher, ref, mask, lam=1.25)
    loss, _ = exopd_loss(loss_inputs(logp, old, stale, mask, teacher=teacher, ref=ref), cfg)
    fresh = gopd_token_advantages(logp.detach(), teacher, ref, mask, lam=1.25)
    ref_loss, _ = exopd_loss(loss_inputs(logp, old, fresh, mask), ExOPDConfig(lam=1.25, reference="student_init"))
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert not torch.allclose(fresh, stale)


def test_split_over_ranks_matches_full_batch():
    old, teacher, ref, mask = batch(B=6, seed=3)
    adv = gopd_token_advantages(old, teacher, ref, mask, lam=1.25)
    logp = (old + 0.1 * torch.randn_like(old)).requires_grad_(True)
    cfg = ExOPDConfig(lam=1.25, reference="student_init")
    full, _ = exopd_loss(loss_inputs(logp, old, adv, mask), cfg)
    (g_full,) = torch.autograd.grad(full, logp)
    n = float(mask.sum())
    total = sum(exopd_loss(loss_inputs(logp[s], old[s], adv[s], mask[s], n_tokens=n), cfg)[0]
                for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    (g_split,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10)


def test_fp32_matches_fp64():
    old, teacher, ref, mask = batch(seed=4)
    logp = old + 0.05
    out = []
    for dt in (torch.float64, torch.float32):
        def c(x, dt=dt):
            return x.to(dt)
        adv = gopd_token_advantages(c(old), c(teacher), c(ref), c(mask), lam=1.25)
        out.append(exopd_loss(loss_inputs(c(logp), c(old), adv, c(mask)),
                              ExOPDConfig(lam=1.25, reference="student_init"))[0].item())
    assert abs(out[0] - out[1]) < 1e-6 * max(1.0, abs(out[0]))


def test_loss_matches_verl_policy_loss_oracle():
    """Optional oracle: the G-OPD reference feeds A_t to verl's PPO loss; compare with verl's
    ``compute_policy_loss`` (token-mean, ε = 0.2, c = 3). Skipped unless verl is importable."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import verl.trainer.ppo.core_algos as ca
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"verl not importable: {e!r}")
    old, teacher, ref, mask = batch(B=5, seed=9)
    adv = gopd_token_advantages(old, teacher, ref, mask, lam=1.25)
    logp = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype)
    ours, _ = exopd_loss(loss_inputs(logp, old, adv, mask), ExOPDConfig(lam=1.25, reference="student_init"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ca.compute_policy_loss(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                        cliprange=0.2, cliprange_low=0.2, cliprange_high=0.2, clip_ratio_c=3.0,
                                        loss_agg_mode="token-mean")[0]
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
