"""Tests for rlkit.algorithms.common: agg_loss, clipped_surrogate, group_advantages, KL placement,
entropy bonus (docs/algorithms.md § Shared pieces)."""

import math

import pytest
import torch
from rlkit.algorithms.common import (
    AGG_MODES,
    agg_loss,
    broadcast_advantages,
    clipped_surrogate,
    entropy_bonus,
    group_advantages,
    kl_in_reward,
    kl_loss_term,
    mean_baseline_advantages,
)

NAN = float("nan")


# ---------------------------------------------------------------- agg_loss
def _hand_batch():
    # Row 0: tokens 1, 2 valid; row 1: token 3 valid; row 2: empty. Garbage (NaN/inf) when masked.
    loss = torch.tensor([[1.0, 2.0, NAN], [3.0, NAN, math.inf], [NAN, NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    return loss, mask


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 2.0),              # (1+2+3)/3
    ("seq-mean-token-sum", 3.0),      # rows sums 3 and 3, S = 2 non-empty rows → 6/2
    ("seq-mean-token-mean", 2.25),    # row means 1.5 and 3 → 4.5/2
    ("seq-mean-token-sum-norm", 0.75),  # (3/4 + 3/4)/2 with T_norm = 4
    ("token-sum", 6.0),               # 1+2+3, no normalizer
])
def test_agg_loss_hand_worked_and_nan_safe(mode, expected):
    loss, mask = _hand_batch()
    out = agg_loss(loss, mask, mode, max_response_len=4)
    assert out.item() == pytest.approx(expected, abs=1e-7)
    out.backward()
    assert torch.isfinite(loss.grad).all()
    assert (loss.grad[mask == 0] == 0).all()


def test_agg_loss_gradient_formulas():
    loss, mask = _hand_batch()
    agg_loss(loss, mask, "seq-mean-token-mean").backward()
    # d/dL_{i,t} = 1/(S·n_i): row 0 has n=2 → 1/4, row 1 has n=1 → 1/2.
    expected = torch.tensor([[0.25, 0.25, 0], [0.5, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(loss.grad, expected)


def test_token_sum_hand_worked_gradient_and_global_counts():
    loss, mask = _hand_batch()
    out = agg_loss(loss, mask, "token-sum")
    out.backward()
    # d/dL_{i,t} = m_{i,t}: every valid token has weight 1, whatever its row's length.
    torch.testing.assert_close(loss.grad, mask.to(loss.dtype))
    # Global counts do not enter: a sum needs no normalizer to be micro-batch invariant.
    assert agg_loss(loss, mask, "token-sum", num_tokens=40, num_seqs=9).item() == 6.0
    # token-sum = N·token-mean on one micro-batch (N = 3 valid tokens).
    assert out.item() == pytest.approx(3 * agg_loss(loss, mask, "token-mean").item())
    # Gradient accumulation: rows {0} and {1, 2} give 3 and 3, the full batch 6.
    parts = [agg_loss(loss[r], mask[r], "token-sum").item() for r in (slice(0, 1), slice(1, 3))]
    assert parts == [3.0, 3.0] and sum(parts) == out.item()


def test_agg_loss_trl_equivalences():
    loss, mask = _hand_batch()
    B, max_len = 3, 4
    # TRL loss_type="grpo": mean over all B rows of Σ m·L / clamp(n, 1) → (1.5 + 3 + 0)/3.
    assert agg_loss(loss, mask, "seq-mean-token-mean", num_seqs=B).item() == pytest.approx(1.5)
    # TRL dr_grpo: Σ m·L / (B · max_completion_length) = 6/12.
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", num_seqs=B,
                    max_response_len=max_len).item() == pytest.approx(0.5)
    # TRL dapo with one process = bnpo = local token-mean.
    assert agg_loss(loss, mask, "token-mean", num_tokens=3).item() == pytest.approx(2.0)


def test_agg_loss_edge_cases():
    loss = torch.tensor([[NAN, 1.0]], requires_grad=True)
    mask = torch.zeros(1, 2)
    for mode in AGG_MODES:
        out = agg_loss(loss, mask, mode, max_response_len=2)
        assert out.item() == 0.0
    with pytest.raises(ValueError, match="max_response_len"):
        agg_loss(loss, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(loss, mask, "token-sum-typo")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_microbatch_and_rank_invariance(mode):
    """Split 8 rows over 2 simulated ranks × 2 micro-batches: Σ results == full, same gradient."""
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    base = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    mask[3] = 0  # an empty row
    w_full = base.clone().requires_grad_()
    full = agg_loss(w_full * 2.0, mask, mode, max_response_len=T)
    full.backward()
    n_tok = float(mask.sum())
    n_seq = float((mask.sum(-1) > 0).sum())
    w_parts = base.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):  # rank0: mb0, mb1; rank1: ...
        part = agg_loss(w_parts[rows] * 2.0, mask[rows], mode, num_tokens=n_tok, num_seqs=n_seq,
                        max_response_len=T)
        part.backward()
        total = total + part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(w_parts.grad, w_full.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- clipped surrogate
def _surrogate_case(dual_clip_c=3.0):
    # s = [1.1, 1.5, 0.5, 1.1, 4.0], A = [+1, +1, −1, −1, −1], ε = 0.2, c = 3.
    s = torch.tensor([[1.1, 1.5, 0.5, 1.1, 4.0]], dtype=torch.float64)
    old = torch.full_like(s, -1.0)
    logp = (old + s.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(s)
    loss, m = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip_c=dual_clip_c)
    return s, logp, loss, m


def test_clipped_surrogate_hand_worked():
    s, logp, loss, m = _surrogate_case()
    # tok0: A=+1, s=1.1 inside → −1.1;  tok1: A=+1, s=1.5 > 1.2 → max(−1.5, −1.2) = −1.2 (clipped)
    # tok2: A=−1, s=0.5 < 0.8 → max(0.5, 0.8) = 0.8 (clipped); tok3: A=−1, s=1.1 → 1.1
    # tok4: A=−1, s=4 → max(4, 1.2) = 4, dual clip min(4, c·1 = 3) = 3.
    torch.testing.assert_close(loss, torch.tensor([[-1.1, -1.2, 0.8, 1.1, 3.0]], dtype=torch.float64))
    loss.sum().backward()
    # dL/dℓ = −A·s where live, 0 where a clip is active (tok1, tok2, tok4).
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1, 0.0, 0.0, 1.1, 0.0]], dtype=torch.float64))
    assert logp.grad[0, [1, 2, 4]].eq(0).all()  # exactly zero
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 5)  # tok1, tok2: L2 > L1
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)  # tok4
    assert m["ppo_kl"].item() == pytest.approx(float(-s.log().mean()))


def test_clipped_surrogate_without_dual_clip_is_trl():
    _, logp, loss, m = _surrogate_case(dual_clip_c=None)
    assert loss[0, 4].item() == pytest.approx(4.0)  # TRL: −min(sA, clip(s)A) = 4, no dual clip
    loss.sum().backward()
    assert logp.grad[0, 4].item() == pytest.approx(4.0)  # −A·s, live
    assert m["pg_clipfrac_lower"].item() == 0.0


def test_clipped_surrogate_rejects_bad_c():
    with pytest.raises(ValueError, match="dual_clip_c"):
        _surrogate_case(dual_clip_c=1.0)


def test_zero_advantage_gives_zero_loss_and_grad():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(3, 4, generator=g).requires_grad_()
    old = torch.randn(3, 4, generator=g)
    loss, _ = clipped_surrogate(logp, old, torch.zeros(3, 4), torch.ones(3, 4))
    assert (loss == 0).all()
    agg_loss(loss, torch.ones(3, 4), "token-mean").backward()
    assert (logp.grad == 0).all()


def test_garbage_at_masked_positions_does_not_leak():
    logp = torch.tensor([[-1.0, NAN, math.inf], [-0.5, -0.7, NAN]], requires_grad=True)
    old = torch.tensor([[-1.1, NAN, -math.inf], [-0.4, NAN, 3.0]])
    adv = torch.tensor([[1.0, NAN, math.inf], [-1.0, 2.0, NAN]])
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]])
    loss, m = clipped_surrogate(logp, old, adv, mask)
    assert torch.isfinite(loss).all() and (loss[mask == 0] == 0).all()
    for v in m.values():
        assert math.isfinite(v.item())
    agg_loss(loss, mask, "token-mean").backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[mask == 0] == 0).all()


def test_log_ratio_clamp_prevents_overflow_and_zeroes_gradient():
    logp = torch.tensor([[100.0]], requires_grad=True)
    old = torch.tensor([[0.0]])
    loss, _ = clipped_surrogate(logp, old, torch.tensor([[-1.0]]), torch.ones(1, 1), dual_clip_c=None)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)  # λ clamped to 20
    loss.sum().backward()
    assert logp.grad.item() == 0.0


def test_clipped_surrogate_fp32_matches_fp64():
    g = torch.Generator().manual_seed(2)
    lp64 = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.3 - 1.0)
    old64 = lp64 + 0.2 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    adv64 = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=g) < 0.8).long()
    out = {}
    for dt in (torch.float32, torch.float64):
        lp = lp64.to(dt).requires_grad_()
        loss, _ = clipped_surrogate(lp, old64.to(dt), adv64.to(dt), mask)
        val = agg_loss(loss, mask, "seq-mean-token-mean")
        val.backward()
        out[dt] = (val.item(), lp.grad.double())
    assert out[torch.float32][0] == pytest.approx(out[torch.float64][0], abs=1e-6)
    torch.testing.assert_close(out[torch.float32][1], out[torch.float64][1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- group advantages
def test_group_advantages_hand_worked():
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    # group 0: mean 2/3, Bessel std sqrt(((1/3)²·2 + (2/3)²)/2) = sqrt(1/3)
    sd = math.sqrt(1 / 3) + 1e-6
    expected = [(1 / 3) / sd, (-2 / 3) / sd, (1 / 3) / sd, 0.0, 0.0, 2.0 / (1 + 1e-6)]
    torch.testing.assert_close(group_advantages(r, g), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    zero = group_advantages(r, g, singleton="zero")
    assert zero[5].item() == 0.0  # TRL: one-sample group → 0
    none = group_advantages(r, g, scale="none")
    torch.testing.assert_close(none, torch.tensor([1 / 3, -2 / 3, 1 / 3, 0, 0, 2.0]))
    # batch scale: group mean, batch Bessel std
    sb = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0], dtype=torch.float64).std().item() + 1e-6
    batch = group_advantages(r, g, scale="batch")
    torch.testing.assert_close(batch, torch.tensor([1 / 3 / sb, -2 / 3 / sb, 1 / 3 / sb, 0, 0, 2 / sb]),
                               rtol=1e-6, atol=1e-7)


def test_all_equal_group_is_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7])  # 0.1·3/3 is not exactly 0.1 in floating point
    adv = group_advantages(r, torch.tensor([4, 4, 4, 9, 9]))
    assert (adv == 0).all()


def _slow_grpo_advantage(r, g, eps):
    """verl's loop form of compute_grpo_outcome_advantage."""
    out = torch.empty_like(r)
    for gid in g.unique():
        idx = (g == gid).nonzero().squeeze(-1)
        vals = r[idx]
        mean, std = (vals.mean(), vals.std()) if len(idx) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[idx] = (vals - mean) / (std + eps)
    return out


def test_group_advantages_fast_equals_slow_loop_and_is_order_free():
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(40, generator=gen, dtype=torch.float64)
    g = torch.randint(0, 9, (40,), generator=gen)
    fast = group_advantages(r, g)
    torch.testing.assert_close(fast, _slow_grpo_advantage(r, g, 1e-6), rtol=1e-12, atol=1e-12)
    perm = torch.randperm(40, generator=gen)
    torch.testing.assert_close(group_advantages(r[perm], g[perm]), fast[perm])


def test_group_advantages_dtypes_and_errors():
    assert group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).dtype == torch.float32
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, NAN]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.tensor([1.0]), torch.tensor([0]), scale="grp")


def test_mean_baseline_and_broadcast():
    r = torch.tensor([1.0, 0.0, 3.0, 5.0])
    g = torch.tensor([0, 0, 1, 2])
    torch.testing.assert_close(mean_baseline_advantages(r, g), torch.tensor([0.5, -0.5, 3.0, 5.0]))
    torch.testing.assert_close(mean_baseline_advantages(r, g, baseline="batch"), r - 2.25)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    a = broadcast_advantages(torch.tensor([2.0, -1.0, 0.5, 7.0]), mask)
    torch.testing.assert_close(a, torch.tensor([[2.0, 2, 0], [-1, 0, 0], [0.5, 0.5, 0.5], [0, 0, 0]]))


# ---------------------------------------------------------------- KL placement, entropy
def test_kl_in_reward_hand_worked():
    old = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -0.25]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # k1 = ℓ^old − ℓ^ref: row 0: 0.5 + (−1.0) = −0.5; row 1: 0 + 0.5 − 0.25 = 0.25
    out, m = kl_in_reward(torch.tensor([1.0, 0.0]), old, ref, mask, beta=0.1, kind="k1")
    torch.testing.assert_close(out, torch.tensor([1.05, -0.025]))
    assert m["kl_reward_mean"].item() == pytest.approx((-0.5 + 0.25) / 5)


def test_kl_loss_term_k3_value_and_trl_is_weight():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.3, -1.5]], dtype=torch.float64)
    old = torch.tensor([[-1.1, -2.2]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    d = logp.detach() - ref
    k3 = torch.exp(-d) + d - 1  # independent oracle for the value
    val, mean = kl_loss_term(logp, ref, mask, kind="k3", agg_mode="token-mean")
    assert val.item() == pytest.approx(k3.mean().item(), rel=1e-12)
    assert mean.item() == pytest.approx(k3.mean().item(), rel=1e-12)
    val.backward()
    # ∂k3/∂ℓ = 1 − e^{−Δ}
    torch.testing.assert_close(logp.grad, (1 - torch.exp(-d)) / 2)
    logp.grad = None
    val, _ = kl_loss_term(logp, ref, mask, kind="k3", agg_mode="token-mean", old_logp_B_T=old,
                          is_weight="differentiable")
    s = torch.exp(logp.detach() - old)
    assert val.item() == pytest.approx((s * k3).mean().item(), rel=1e-12)
    val.backward()
    # ∂(s·k3)/∂ℓ = s·k3 + s·(1 − e^{−Δ}) = s·Δ  (docs/algorithms.md § KL estimators)
    torch.testing.assert_close(logp.grad, s * d / 2)
    with pytest.raises(ValueError, match="old log-probs"):
        kl_loss_term(logp, ref, mask, kind="k3", agg_mode="token-mean", is_weight="detached")


def test_entropy_bonus_is_masked_and_differentiable():
    h = torch.tensor([[0.5, 1.5, NAN], [2.0, NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = entropy_bonus(h, mask, coef=0.01, agg_mode="token-mean")
    assert out.item() == pytest.approx(-0.01 * 4.0 / 3)
    out.backward()
    torch.testing.assert_close(h.grad, torch.tensor([[-0.01 / 3, -0.01 / 3, 0], [-0.01 / 3, 0, 0]]))
