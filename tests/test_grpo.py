"""Tests for GRPO: needs, advantages, loss assembly, TRL replay, global normalization.

Formulas: docs/algorithms.md § GRPO."""

import math

import pytest
import rlkit.algorithms as algos
import torch
from rlkit.algorithms.base import AdvantageInputs, LossInputs
from rlkit.algorithms.grpo import GRPOConfig, grpo_advantages, grpo_loss, grpo_needs


def _batch(dtype=torch.float64, seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64  # draw in fp64, then cast: fp32 and fp64 runs see the same numbers
    logp = (torch.randn(B, T, generator=g, dtype=f64) * 0.5 - 1.5)
    old = logp + 0.15 * torch.randn(B, T, generator=g, dtype=f64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=f64)
    ent = torch.rand(B, T, generator=g, dtype=f64) * 2
    logp, old, ref, ent = (x.to(dtype) for x in (logp, old, ref, ent))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5], dtype=dtype)[:B]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])[:B]
    return logp, old, ref, ent, mask, rewards, groups


def _loss_inputs(logp, old, ref, ent, mask, adv, n_tok=None, n_seq=None, T=5):
    return LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv,
                      num_tokens_global=float(mask.sum()) if n_tok is None else n_tok,
                      num_seqs_global=float((mask.sum(-1) > 0).sum()) if n_seq is None else n_seq,
                      old_logp_B_T=old, ref_logp_B_T=ref, entropy_B_T=ent, max_response_len=T)


def test_registry_and_needs():
    algo = algos.get("grpo")
    assert algo.kind == "online" and algo.config_cls is GRPOConfig
    assert grpo_needs(GRPOConfig()).ref_logp is True
    n0 = grpo_needs(GRPOConfig(beta=0.0))
    assert n0.ref_logp is False and n0.old_logp is True and n0.entropy is False
    assert grpo_needs(GRPOConfig(entropy_coef=0.01)).entropy is True
    with pytest.raises(ValueError, match="unknown key"):
        algo.make_config({"betta": 0.1})
    with pytest.raises(ValueError, match="kl_kind"):
        algo.make_config({"kl_kind": "k7"})
    with pytest.raises(KeyError, match="grpo"):
        algos.get("grpoo")


def test_paper_defaults():
    cfg = GRPOConfig()
    assert (cfg.beta, cfg.kl_kind, cfg.clip_low, cfg.clip_high) == (0.04, "k3", 0.2, 0.2)
    assert cfg.loss_agg_mode == "seq-mean-token-mean" and cfg.adv_scale == "group"


def test_advantages_hand_worked():
    *_, mask, rewards, groups = _batch()
    adv, m = grpo_advantages(AdvantageInputs(rewards, groups, mask), GRPOConfig(beta=0.0))
    # group 0: r = (1, 0, 1), mean 2/3, std sqrt(1/3); group 1: r = (1, 0, 0.5), mean 0.5, std 0.5
    sd0, sd1 = math.sqrt(1 / 3) + 1e-6, 0.5 + 1e-6
    per_seq = torch.tensor([1 / 3 / sd0, -2 / 3 / sd0, 1 / 3 / sd0, 0.5 / sd1, -0.5 / sd1, 0.0],
                           dtype=torch.float64)
    torch.testing.assert_close(adv, per_seq[:, None] * mask, rtol=1e-9, atol=1e-12)
    assert m["adv_abs_max"] == pytest.approx(2 / 3 / sd0)


def test_kl_in_reward_enters_before_normalization():
    logp, old, ref, _, mask, rewards, groups = _batch()
    cfg = GRPOConfig(beta=0.5, kl_placement="reward", kl_kind="k1")
    adv, m = grpo_advantages(AdvantageInputs(rewards, groups, mask, old_logp_B_T=old, ref_logp_B_T=ref), cfg)
    shaped = rewards - 0.5 * ((old - ref) * mask).sum(-1)  # verl apply_kl_penalty, then summed
    expected = torch.empty_like(shaped)
    for gid in (0, 1):
        idx = groups == gid
        expected[idx] = (shaped[idx] - shaped[idx].mean()) / (shaped[idx].std() + 1e-6)
    torch.testing.assert_close(adv, expected[:, None] * mask, rtol=1e-9, atol=1e-12)
    assert "kl_reward_mean" in m
    # the loss then carries no KL term
    adv_l = adv.clone()
    lp = logp.clone().requires_grad_()
    _, lm = grpo_loss(_loss_inputs(lp, old, ref, None, mask, adv_l), cfg)
    assert "kl_loss" not in lm


def test_loss_assembly_matches_formula():
    """total = agg(pg) + β·agg(k3 clamped) − c_H·agg(H), every term with the same agg mode."""
    logp, old, ref, ent, mask, rewards, groups = _batch()
    cfg = GRPOConfig(beta=0.04, entropy_coef=0.01)
    adv, _ = grpo_advantages(AdvantageInputs(rewards, groups, mask), cfg)
    lp = logp.clone().requires_grad_()
    total, m = grpo_loss(_loss_inputs(lp, old, ref, ent, mask, adv), cfg)
    # independent oracle, seq-mean-token-mean by hand
    s = torch.exp(logp - old)
    pg = torch.maximum(-adv * s, -adv * s.clamp(0.8, 1.2))
    pg = torch.where(adv < 0, torch.minimum(pg, -3.0 * adv), pg)
    d = logp - ref
    k3 = (torch.exp(-d) + d - 1).clamp(-10, 10)

    def seq_mean_tok_mean(x):
        return ((x * mask).sum(-1) / mask.sum(-1)).mean()

    expected = seq_mean_tok_mean(pg) + 0.04 * seq_mean_tok_mean(k3) - 0.01 * seq_mean_tok_mean(ent)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    assert m["loss"] == pytest.approx(expected.item(), rel=1e-12)
    assert m["kl_mean"] == pytest.approx(((k3 * mask).sum() / mask.sum()).item(), rel=1e-12)


def test_trl_parity_replay():
    """TRL ≥ 1.10: per-token −min(sA, clip(s)A) + β·k3·s (s differentiable), loss_type="dapo"."""
    logp, old, ref, _, mask, rewards, groups = _batch()
    cfg = GRPOConfig(beta=0.04, kl_is_weight="differentiable", kl_log_ratio_clamp=None,
                     kl_value_clamp=None, dual_clip_c=None, log_ratio_clamp=None, adv_eps=1e-4,
                     singleton="zero", loss_agg_mode="token-mean", clip_high=0.28)
    adv, _ = grpo_advantages(AdvantageInputs(rewards, groups, mask), cfg)
    lp = logp.clone().requires_grad_()
    total, _ = grpo_loss(_loss_inputs(lp, old, ref, None, mask, adv), cfg)
    total.backward()
    lp2 = logp.clone().requires_grad_()
    coef_1 = torch.exp(lp2 - old)
    per_tok = -torch.min(coef_1 * adv, coef_1.clamp(0.8, 1.28) * adv)
    per_kl = torch.exp(ref - lp2) - (ref - lp2) - 1
    per_tok = per_tok + 0.04 * per_kl * coef_1
    trl = (per_tok * mask).sum() / mask.sum()
    trl.backward()
    assert total.item() == pytest.approx(trl.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-10, atol=1e-14)


def test_zero_advantage_and_no_kl_gives_zero_loss():
    logp, old, ref, _, mask, *_ = _batch()
    lp = logp.clone().requires_grad_()
    total, _ = grpo_loss(_loss_inputs(lp, old, ref, None, mask, torch.zeros_like(logp)), GRPOConfig(beta=0.0))
    total.backward()
    assert total.item() == 0.0 and (lp.grad == 0).all()


def test_missing_inputs_raise():
    logp, old, ref, _, mask, *_ = _batch()
    adv = torch.zeros_like(logp)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(_loss_inputs(logp, old, None, None, mask, adv), GRPOConfig())
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(_loss_inputs(logp, old, ref, None, mask, adv), GRPOConfig(entropy_coef=0.1))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_microbatch_and_dp_rank_invariance(mode):
    """2 simulated DP ranks × 2 micro-batches with global counts == the full batch (value and grad)."""
    logp, old, ref, ent, mask, rewards, groups = _batch(B=6)
    cfg = GRPOConfig(loss_agg_mode=mode, entropy_coef=0.01)
    adv, _ = grpo_advantages(AdvantageInputs(rewards, groups, mask), cfg)
    lp_full = logp.clone().requires_grad_()
    full, _ = grpo_loss(_loss_inputs(lp_full, old, ref, ent, mask, adv), cfg)
    full.backward()
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    lp = logp.clone().requires_grad_()
    acc = 0.0
    for rows in ([0, 1], [2], [3, 4], [5]):  # rank 0: mb {0,1},{2}; rank 1: mb {3,4},{5}
        part, _ = grpo_loss(_loss_inputs(lp[rows], old[rows], ref[rows], ent[rows], mask[rows],
                                         adv[rows], n_tok, n_seq), cfg)
        part.backward()
        acc += part.item()
    assert acc == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, lp_full.grad, rtol=1e-10, atol=1e-14)


def test_fp32_matches_fp64():
    vals = {}
    for dt in (torch.float32, torch.float64):
        logp, old, ref, ent, mask, rewards, groups = _batch(dtype=dt)
        cfg = GRPOConfig(entropy_coef=0.01)
        adv, _ = grpo_advantages(AdvantageInputs(rewards, groups, mask), cfg)
        lp = logp.clone().requires_grad_()
        total, _ = grpo_loss(_loss_inputs(lp, old, ref, ent, mask, adv), cfg)
        total.backward()
        vals[dt] = (total.item(), lp.grad.double())
    assert vals[torch.float32][0] == pytest.approx(vals[torch.float64][0], abs=1e-6)
    torch.testing.assert_close(vals[torch.float32][1], vals[torch.float64][1], rtol=1e-5, atol=1e-6)


def test_exact_expected_kl_gradient_directions():
    """On-policy, the k3 loss term pushes towards KL(π_ref‖π) and k3+ towards KL(π‖π_ref).

    docs/algorithms.md § KL estimators. One-token vocab of 5: the expected gradient of β·agg(kl)
    under π_θ equals the named KL's gradient.
    """
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(5, dtype=torch.float64)
    logp_all = torch.log_softmax(theta, -1)
    ref_all = torch.log_softmax(ref_logits, -1)
    p = logp_all.exp().detach()
    mask = torch.ones(5, 1)
    adv = torch.zeros(5, 1, dtype=torch.float64)
    grads = {}
    for kind in ("k3", "k3+"):
        # Clamps off: the identity is for the unclamped estimator (one ρ here is ~30, k3 > 10).
        cfg = GRPOConfig(beta=1.0, kl_kind=kind, loss_agg_mode="seq-mean-token-sum",
                         kl_log_ratio_clamp=None, kl_value_clamp=None)
        # Rows = vocab items, summed (n_seq = 1); ∂total/∂ℓ_y is then reweighted by π(y) below.
        lp = logp_all.unsqueeze(-1)
        total, _ = grpo_loss(_loss_inputs(lp, lp.detach(), ref_all.unsqueeze(-1), None, mask, adv,
                                          n_seq=1.0), cfg)
        row = torch.autograd.grad(total, lp, retain_graph=True)[0].squeeze(-1)  # ∂total/∂ℓ_y
        grads[kind] = torch.autograd.grad(logp_all, theta, grad_outputs=p * row, retain_graph=True)[0]
    q = ref_all.exp()
    fwd = torch.autograd.grad((q * (ref_all - logp_all)).sum(), theta, retain_graph=True)[0]
    rev = torch.autograd.grad((logp_all.exp() * (logp_all - ref_all)).sum(), theta)[0]
    torch.testing.assert_close(grads["k3"], fwd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["k3+"], rev, rtol=1e-10, atol=1e-12)
