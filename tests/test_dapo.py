"""Tests for DAPO: overlong shaping, dynamic-sampling filter, clip-higher token-mean loss.

Formulas: docs/algorithms.md § DAPO."""

import doctest

import pytest
import rlkit.algorithms as algos
import rlkit.algorithms.dapo as dapo_mod
import torch
from rlkit.algorithms.base import AdvantageInputs, LossInputs
from rlkit.algorithms.dapo import (
    DAPOConfig,
    dapo_advantages,
    dapo_group_filter,
    dapo_loss,
    dapo_needs,
    overlong_penalty,
)


def test_registry_needs_defaults():
    algo = algos.get("dapo")
    assert algo.group_filter is dapo_group_filter
    n = dapo_needs(DAPOConfig())
    assert n.old_logp and not n.ref_logp and not n.entropy
    cfg = DAPOConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.loss_agg_mode) == (0.2, 0.28, "token-mean")


def test_doctests():
    assert doctest.testmod(dapo_mod).failed == 0


def test_overlong_penalty_piecewise():
    # L_max = 20, L_cache = 4, p = 0.5: 0 up to 16, linear to −p at 20, −p beyond.
    lengths = torch.arange(0, 26)
    pen = overlong_penalty(lengths, max_len=20, cache_len=4, penalty_factor=0.5)
    assert (pen <= 0).all()
    assert (pen[:17] == 0).all()
    torch.testing.assert_close(pen[16:21], torch.tensor([0.0, -0.125, -0.25, -0.375, -0.5]))
    assert (pen[20:] == -0.5).all()
    # verl's formula inside the buffer: min(−(|y| − (L_max − L_cache))/L_cache · p, 0)
    for n in range(16, 21):
        assert pen[n].item() == pytest.approx(min(-(n - 16) / 4 * 0.5, 0.0))
    assert overlong_penalty(torch.tensor([18.0], dtype=torch.float64), 20, 4).dtype == torch.float64


def test_overlong_penalty_bad_args():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=0, penalty_factor=1.0)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=11, penalty_factor=1.0)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=2, penalty_factor=-1.0)


def test_group_filter_keeps_spread_and_singletons():
    # group 7: all correct → drop; group 3: mixed → keep; group 5: singleton → keep; group 1: all wrong.
    raw = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, -1.0, -1.0, 1.0])
    ids = torch.tensor([7, 7, 3, 3, 7, 5, 1, 1, 3])
    keep = dapo_group_filter(raw, ids, DAPOConfig())
    assert keep.tolist() == [False, False, True, True, False, True, False, False, True]
    assert dapo_group_filter(raw, ids, DAPOConfig(filter_groups=False)).all()


def test_group_filter_runs_on_raw_outcome_not_shaped_reward():
    # Same outcome for all (all wrong), spread only from the overlong penalty: dropped (verl filters on acc).
    raw = torch.tensor([-1.0, -1.0, -1.0])
    shaped = raw + overlong_penalty(torch.tensor([10, 18, 20]), max_len=20, cache_len=4)
    assert shaped.std() > 0
    assert not dapo_group_filter(raw, torch.zeros(3, dtype=torch.long), DAPOConfig()).any()
    with pytest.raises(ValueError, match="non-finite"):
        dapo_group_filter(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]), DAPOConfig())


def dynamic_sampling_done(kept: int, drawn: int, *, train_prompts: int, max_num_gen_batches: int) -> bool:
    """verl's stopping rule, as the driver applies DAPO's declared filter policy (rlkit.groups)."""
    from rlkit.algorithms.base import AlgorithmSetup
    from rlkit.groups import check_short, more_rounds

    policy = AlgorithmSetup.build("dapo", {"max_num_gen_batches": max_num_gen_batches}).filter_policy
    if more_rounds(kept, train_prompts, drawn, policy.max_rounds):
        return False
    check_short(kept, train_prompts, drawn, policy.on_short, step=0)
    return True


def test_dynamic_sampling_done():
    assert dynamic_sampling_done(3, 1, train_prompts=4, max_num_gen_batches=10) is False
    assert dynamic_sampling_done(5, 2, train_prompts=4, max_num_gen_batches=10) is True
    assert dynamic_sampling_done(1, 99, train_prompts=4, max_num_gen_batches=0) is False  # unlimited
    with pytest.raises(RuntimeError, match="max_num_gen_batches=3"):
        dynamic_sampling_done(1, 3, train_prompts=4, max_num_gen_batches=3)


def _inputs(logp, old, adv, mask, n_tok=None):
    return LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv,
                      num_tokens_global=float(mask.sum()) if n_tok is None else n_tok,
                      num_seqs_global=float(mask.shape[0]), old_logp_B_T=old)


def test_clip_higher_hand_worked():
    # Two tokens, A = +1, s = 1.25 and s = 1.35: with ε_high = 0.28 the first is live
    # (L = −1.25, dL/dℓ = −1.25) and the second clipped at 1.28 (L = −1.28, gradient 0).
    # Token-mean over N = 2: loss = (−1.25 − 1.28)/2.
    old = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[1.25, 1.35]], dtype=torch.float64).log()).requires_grad_()
    adv = torch.ones(1, 2, dtype=torch.float64)
    total, m = dapo_loss(_inputs(logp, old, adv, torch.ones(1, 2)), DAPOConfig())
    assert total.item() == pytest.approx((-1.25 - 1.28) / 2)
    total.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25 / 2, 0.0]], dtype=torch.float64))
    assert m["pg_clipfrac"] == pytest.approx(0.5)
    # With GRPO's symmetric 0.2 the first token would be clipped too.
    logp.grad = None
    total2, _ = dapo_loss(_inputs(logp, old, adv, torch.ones(1, 2)), DAPOConfig(clip_high=0.2))
    total2.backward()
    assert (logp.grad == 0).all()


def test_advantages_and_global_token_mean_invariance():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    mask = (torch.rand(B, T, generator=g) < 0.75).long()
    mask[:, 0] = 1
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, _ = dapo_advantages(AdvantageInputs(rewards, ids, mask), DAPOConfig())
    # group 0: (1, −1, 1, 1): mean 0.5, Bessel std sqrt((0.5²·3 + 1.5²)/3) = 1
    assert adv[0, 0].item() == pytest.approx(0.5 / (1 + 1e-6))
    assert adv[1, 0].item() == pytest.approx(-1.5 / (1 + 1e-6))
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lp_full = logp.clone().requires_grad_()
    full, _ = dapo_loss(_inputs(lp_full, old, adv, mask), DAPOConfig())
    full.backward()
    lp = logp.clone().requires_grad_()
    acc = 0.0
    n_tok = float(mask.sum())
    for rows in (slice(0, 3), slice(3, 5), slice(5, 8)):  # uneven micro-batches over ranks
        part, _ = dapo_loss(_inputs(lp[rows], old[rows], adv[rows], mask[rows], n_tok), DAPOConfig())
        part.backward()
        acc += part.item()
    assert acc == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, lp_full.grad, rtol=1e-10, atol=1e-14)


def test_fp32_matches_fp64():
    g = torch.Generator().manual_seed(4)
    logp64 = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    old64 = logp64 + 0.3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    adv64 = torch.randn(5, 1, generator=g, dtype=torch.float64).expand(5, 7)
    mask = torch.ones(5, 7)
    out = {}
    for dt in (torch.float32, torch.float64):
        lp = logp64.to(dt).requires_grad_()
        total, _ = dapo_loss(_inputs(lp, old64.to(dt), adv64.to(dt), mask), DAPOConfig())
        total.backward()
        out[dt] = (total.item(), lp.grad.double())
    assert out[torch.float32][0] == pytest.approx(out[torch.float64][0], abs=1e-6)
    torch.testing.assert_close(out[torch.float32][1], out[torch.float64][1], rtol=1e-5, atol=1e-6)
