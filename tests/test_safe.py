"""SAFE (docs/algorithms.md § SAFE): soft-min critic, both KL controllers with their checkpoint round
trip, penalty modes, critic losses."""

import json
import math

import pytest
import torch
from rlkit.algorithms import AdvantageInputs, LossInputs, get
from rlkit.algorithms.safe import (
    CONTROLLER_KEYS,
    AsymmetricKLController,
    SAFEConfig,
    SafeController,
    last_valid,
    merge_stats,
    safe_advantages,
    safe_critic_loss,
    safe_loss,
    soft_min,
)

ALGO = get("safe")


def step(ctrl, kl=0.0, reward=0.0, entropy=1.0):
    return ctrl.update({"safe/kl": kl, "safe/reward_raw_mean": reward, "safe/reward_raw_var": 0.0,
                        "safe/reward_count": 1.0, "safe/rollout_entropy": entropy})


def test_soft_min_limits():
    v1, v2 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)
    assert torch.allclose(soft_min(v1, v2, 1e-4), torch.minimum(v1, v2), atol=1e-3)  # α → 0: min
    assert torch.allclose(soft_min(v1, v2, 1e6), (v1 + v2) / 2, atol=1e-4)  # α → ∞: mean
    assert torch.allclose(soft_min(v1, v1, 0.3), v1, atol=1e-12)  # soft-min(v, v) = v
    # hand: α = 1, V = (0, 0) shifted: −log(½(e^0 + e^{−log 3})) = −log(⅔)
    assert soft_min(torch.tensor(0.0), torch.tensor(math.log(3.0)), 1.0).item() == pytest.approx(-math.log(2 / 3))


def test_controller_first_two_calls_hand_worked():
    c = SafeController(SAFEConfig())
    out = step(c, kl=0.5, reward=0.0)
    # kl_short = 0.1·0.5, kl_long = 0.01·0.5; WARMUP ×1.5; first PID call returns 0 → τ = 0.3·1.5.
    assert c.kl_short == pytest.approx(0.05) and c.kl_long == pytest.approx(0.005)
    assert out["safe/pid_out"] == 0.0 and c.integral == 0.0 and out["safe/phase_warmup"] == 1.0
    assert c.threshold == pytest.approx(0.45) and c.penalty == 0.0 and c.gate == 1.0
    out = step(c, kl=0.5, reward=1.0)
    # EMA 0 → 0.05; e = 0.05 − 0.001 = 0.049; out = (0.3 + 0.01 + 0.05)·0.049; τ = (0.3 + out)·1.5
    assert out["safe/pid_out"] == pytest.approx(0.36 * 0.049)
    assert c.threshold == pytest.approx((0.3 + 0.36 * 0.049) * 1.5)


def test_controller_gate_and_penalty():
    c = SafeController(SAFEConfig())
    step(c, kl=10.0, reward=0.0, entropy=1.0)
    # kl_short = 1 > τ = 0.45: g = max(0.5, 2/(1 + 0.1)), P = 0.1·(1 − 0.45)²·g
    g = 2.0 / 1.1
    assert c.gate == pytest.approx(g) and c.penalty == pytest.approx(0.1 * 0.55**2 * g)
    step(c, kl=10.0, reward=0.0, entropy=50.0)  # high entropy: the gate floors at 0.5
    assert c.gate == 0.5 and c.values()["gate_open"] == 1.0


def test_controller_phases_integral_and_threshold_bounds():
    c = SafeController(SAFEConfig())
    phases, thresholds = [], []
    for i in range(130):
        out = step(c, kl=0.2, reward=i / 100.0)  # rewards rising by 0.5 per 50 calls
        phases.append(next(k for k in out if k.startswith("safe/phase_") and k != "safe/phase_multiplier"))
        thresholds.append(c.threshold)
        assert -1.0 <= c.integral <= 1.0
    assert set(phases[:49]) == {"safe/phase_warmup"}
    assert "safe/phase_climbing" not in phases[:99]  # CLIMBING needs 100 rewards
    assert phases[99] == "safe/phase_climbing"  # recent 50 vs previous 50: +0.5 > 0.01
    assert all(0.1 <= t <= 0.6 for t in thresholds)


def test_integral_is_clipped():
    c = SafeController(SAFEConfig())
    for i in range(5):
        step(c, reward=100.0 * i)
    assert c.integral == 1.0


def test_state_dict_round_trip_through_json():
    a = SafeController(SAFEConfig())
    g = torch.Generator().manual_seed(0)
    seq = [(float(torch.rand(1, generator=g)) * 2, float(torch.rand(1, generator=g)), 1.5) for _ in range(110)]
    for kl, r, h in seq[:60]:
        step(a, kl, r, h)
    b = SafeController(SAFEConfig())
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.values() == a.values()
    for kl, r, h in seq[60:]:
        assert step(a, kl, r, h) == step(b, kl, r, h)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(KeyError):
        b.load_state_dict({"nope": 1})
    with pytest.raises(KeyError, match="safe/kl"):
        a.update({"safe/reward_raw_mean": 0.0})


def lin(logp, old, ref, adv, mask, ent, controller, n_tok=None, n_seq=None):
    return LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, old_logp_B_T=old, ref_logp_B_T=ref,
                      entropy_B_T=ent, controller=controller,
                      num_tokens_global=float(mask.sum() if n_tok is None else n_tok),
                      num_seqs_global=float(mask.shape[0] if n_seq is None else n_seq))


def batch(B=4, T=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = logp - 0.05 * torch.rand(B, T, generator=g, dtype=dtype)
    ref = logp - 0.5 * torch.rand(B, T, generator=g, dtype=dtype)
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).to(dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype) * mask
    ent = torch.rand(B, T, generator=g, dtype=dtype) * 3
    return logp, old, ref, adv, mask, ent


OPEN = {"kl_short": 0.9, "threshold": 0.4, "gate": 1.5, "gate_open": 1.0, "penalty": 0.1 * 0.25 * 1.5}


@pytest.mark.parametrize("kind", ["k1+", "k1"])
def test_penalty_modes_value_and_gradient(kind):
    logp, old, ref, adv, mask, ent = batch()
    grads, values = {}, {}
    for name, mode, ctrl in (("none", "reference", {}), ("ref", "reference", OPEN), ("diff", "differentiable", OPEN)):
        lp = logp.clone().requires_grad_(True)
        loss, _ = safe_loss(lin(lp, old, ref, adv, mask, ent, ctrl), SAFEConfig(penalty_mode=mode, penalty_kl_kind=kind))
        (grads[name],) = torch.autograd.grad(loss, lp)
        values[name] = loss.item()
    # reference mode: P shifts the value, not the update
    assert values["ref"] - values["none"] == pytest.approx(OPEN["penalty"], rel=1e-12)
    assert torch.equal(grads["ref"], grads["none"])
    # differentiable: same value, extra gradient β·∇KL_batch, β = 2·0.1·g·(kl_short − τ)·0.1;
    # k1+ has the k2 gradient Δ_t per token, k1 the gradient 1 per token; / N (token-mean).
    assert values["diff"] == pytest.approx(values["ref"], rel=1e-12)
    beta = 2 * 0.1 * 1.5 * (0.9 - 0.4) * 0.1
    per_tok = (logp - ref) if kind == "k1+" else torch.ones_like(logp)
    assert torch.allclose(grads["diff"] - grads["none"], beta * per_tok * mask / mask.sum(), atol=1e-14)


def test_advantages_softmin_values_and_normalization():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    heads = torch.randn(3, 3, 2, dtype=torch.float64)
    heads[mask == 0] = float("nan")  # the critic's outputs at padding are never read
    r = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    inp = AdvantageInputs(rewards_B=r, group_ids_B=torch.arange(3), mask_B_T=mask, values_B_T=heads,
                          old_logp_B_T=torch.zeros(3, 3), ref_logp_B_T=torch.zeros(3, 3))
    adv, m = safe_advantages(inp, SAFEConfig(reward_norm="none"))
    v = soft_min(heads[[0, 1, 2], [1, 0, 2], 0], heads[[0, 1, 2], [1, 0, 2], 1], 0.3)
    d = r - v
    expect = (d - d.mean()) / (d.std() + 1e-8)
    assert torch.allclose(adv[:, 0], expect.to(adv.dtype)) and (adv[mask == 0] == 0).all()
    assert set(CONTROLLER_KEYS) - {"safe/rollout_entropy"} <= set(m)
    one = AdvantageInputs(rewards_B=r[:1], group_ids_B=torch.arange(1), mask_B_T=mask[:1], values_B_T=heads[:1])
    assert (safe_advantages(one, SAFEConfig())[0] == 0).all()  # B = 1: no NaN from the unbiased std
    with pytest.raises(ValueError, match="controller"):
        safe_advantages(inp, SAFEConfig(reward_norm="running"))


def test_running_normalizer_merge_equals_pooled_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, generator=g, dtype=torch.float64)
    s = merge_stats((4.0, float(x[:4].mean()), float(x[:4].var(unbiased=False))),
                    (6.0, float(x[4:].mean()), float(x[4:].var(unbiased=False))))
    assert s[0] == 10 and s[1] == pytest.approx(float(x.mean())) and s[2] == pytest.approx(float(x.var(unbiased=False)))


def test_critic_loss_hand_worked():
    # V = 1, R = 0, V_old = 0.5 → V_clip = 0.5 + 0.2 = 0.7. Huber_0.5: |1| → 0.5·(1 − 0.25) = 0.375;
    # |0.7| → 0.5·(0.7 − 0.25) = 0.225. Per sequence ½(0.375 + 0.225) = 0.3, × c_V = 0.5 → 0.15.
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 1.0, 7.0]], dtype=torch.float64, requires_grad=True)  # last valid = t1
    inp = LossInputs(logp_B_T=torch.zeros(1, 3), mask_B_T=mask, advantages_B_T=torch.zeros(1, 3),
                     num_tokens_global=2.0, num_seqs_global=1.0, values_B_T=values,
                     returns_B_T=torch.zeros(1, 3, dtype=torch.float64))
    inp.old_values_B_T = torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.float64)
    loss, _ = safe_critic_loss(inp, SAFEConfig())
    assert loss.item() == pytest.approx(0.15, rel=1e-12)
    (g,) = torch.autograd.grad(loss, values)
    assert g[0, 0] == 0 and g[0, 2] == 0  # only the last valid position is read
    del inp.old_values_B_T  # without V_old the clip is off: ½·(0.375 + 0.375)·0.5
    assert safe_critic_loss(inp, SAFEConfig())[0].item() == pytest.approx(0.1875, rel=1e-12)


def test_last_valid_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    x = torch.arange(12.0).view(3, 4)
    assert last_valid(x, mask).tolist() == [1.0, 7.0, 8.0]


def test_pipeline_metrics_feed_the_controller():
    logp, old, ref, _, mask, ent = batch()
    inp = AdvantageInputs(rewards_B=torch.rand(4), group_ids_B=torch.arange(4), mask_B_T=mask,
                          values_B_T=torch.zeros(4, 5), old_logp_B_T=old, ref_logp_B_T=ref)
    a, am = safe_advantages(inp, SAFEConfig())
    _, lm = safe_loss(lin(logp, old, ref, a.double(), mask, ent, {}), SAFEConfig())
    ctrl = ALGO.make_controller(ALGO.make_config())
    # the trainer prefixes each stage's metrics ("adv/", "loss/") before calling update
    out = ctrl.update({**{f"adv/{k}": v for k, v in am.items()}, **{f"loss/{k}": v for k, v in lm.items()}})
    assert out["safe/kl_short"] == pytest.approx(0.1 * float(((old - ref) * mask).sum() / mask.sum()), rel=1e-6)
    n = ALGO.needs(ALGO.make_config())
    assert n.values and n.entropy and n.ref_logp and n.old_logp


def test_split_over_ranks_matches_full_batch():
    logp, old, ref, adv, mask, ent = batch(B=6, seed=3)
    cfg = SAFEConfig()
    lp = logp.clone().requires_grad_(True)
    full, _ = safe_loss(lin(lp, old, ref, adv, mask, ent, OPEN), cfg)
    (g_full,) = torch.autograd.grad(full, lp)
    n = float(mask.sum())
    total = sum(safe_loss(lin(lp[s], old[s], ref[s], adv[s], mask[s], ent[s], OPEN, n_tok=n, n_seq=6), cfg)[0]
                for s in (slice(0, 2), slice(2, 6)))
    (g_split,) = torch.autograd.grad(total, lp)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10)


def test_fp32_matches_fp64():
    b = batch(seed=4)
    l64 = safe_loss(lin(*b, OPEN), SAFEConfig())[0].item()
    l32 = safe_loss(lin(*[x.float() for x in b], OPEN), SAFEConfig())[0].item()
    assert abs(l64 - l32) < 1e-6 * max(1.0, abs(l64))


def test_returns_are_the_normalized_reward():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    inp = AdvantageInputs(rewards_B=r, group_ids_B=torch.arange(4), mask_B_T=mask, values_B_T=torch.zeros(4, 2))
    ret = ALGO.returns(inp, SAFEConfig())
    # batch stats merged with the initial prior (count 1e−4, mean 0, var 1): n = 4 + 1e−4,
    # mean = 2/n, var = (1e−4·1 + 4·0.25 + 0.5² ·1e−4·4/n)/n
    n = 4 + 1e-4
    mean = 0.5 * 4 / n
    var = (1e-4 + 4 * 0.25 + 0.25 * 1e-4 * 4 / n) / n
    assert torch.allclose(ret[:, 0], (r - mean) / (math.sqrt(var) + 1e-8), rtol=1e-12)
    assert ret[1, 1] == 0.0
    ctrl = SafeController(SAFEConfig(reward_norm="running"))
    inp.controller = ctrl.values()  # running mode reads the controller's statistics
    assert torch.allclose(ALGO.returns(inp, SAFEConfig(reward_norm="running")), ret, rtol=1e-12)


# ---------------------------------------------------------------- asymmetric-KL controller
ASYM = SAFEConfig(controller="asymmetric")


def test_config_selects_the_controller():
    assert type(ALGO.make_controller(ALGO.make_config())) is SafeController  # default: entropy-aware
    asym = ALGO.make_config({"controller": "asymmetric"})
    assert type(ALGO.make_controller(asym)) is AsymmetricKLController
    with pytest.raises(ValueError, match="controller"):
        ALGO.make_config({"controller": "pid"})
    with pytest.raises(ValueError, match="momentum_window"):
        SAFEConfig(controller="asymmetric", momentum_window=1)


def test_asymmetric_term_hand_worked():
    c = AsymmetricKLController(ASYM)
    out = step(c, kl=0.5)
    # KL = 0.5 > τ = 0.3: P = 0.1·(0.5 − 0.3)² = 0.004; one value, so no momentum yet.
    assert c.asym_penalty == pytest.approx(0.004) and c.momentum == 0.0 and c.penalty == pytest.approx(0.004)
    assert out["safe/asym_active"] == 1.0 and out["safe/penalty_reference"] == pytest.approx(0.004)
    for kl in (0.3, 0.1, -2.0):  # at or below τ, and negative KL (exploration): no penalty
        step(c, kl=kl)
        assert c.asym_penalty == 0.0 and c.penalty == 0.0
    # The entropy-aware controller would have gated on an EMA: here the raw KL acts at once.
    assert AsymmetricKLController(ASYM).update(
        {"safe/kl": 0.4, "safe/reward_raw_mean": 0.0, "safe/reward_raw_var": 0.0, "safe/reward_count": 1.0}
    )["safe/asym_penalty"] == pytest.approx(0.1 * 0.1**2)  # no rollout entropy needed


def test_asymmetric_no_momentum_before_window_calls():
    """KL_t = 0.002·t rises every call but stays below τ: the momentum term appears at call 50."""
    c = AsymmetricKLController(ASYM)
    for t in range(1, 50):
        step(c, kl=0.002 * t)
        assert c.momentum == 0.0 and c.momentum_penalty == 0.0 and c.penalty == 0.0
    step(c, kl=0.002 * 50)
    # m = (KL_50 − KL_1)/50 = 0.002·49/50 = 0.00196; P = 5·m² = 1.9208e−5 (the asymmetric term is 0)
    assert c.momentum == pytest.approx(0.00196) and c.penalty == pytest.approx(5 * 0.00196**2)
    for t in range(51, 131):
        step(c, kl=0.002 * t)
    assert c.momentum == pytest.approx(0.00196)  # always 49 steps of 0.002 over the window of 50
    assert len(c.kl_history) == 100  # the last 2·W values
    for _ in range(3):  # KL falling: negative momentum, never penalized
        step(c, kl=0.0)
    assert c.momentum < 0 and c.momentum_penalty == 0.0


def test_asymmetric_state_dict_round_trip_through_json():
    a = AsymmetricKLController(ASYM)
    g = torch.Generator().manual_seed(1)
    seq = [(float(torch.rand(1, generator=g)) * 0.8, float(torch.rand(1, generator=g))) for _ in range(140)]
    for kl, r in seq[:70]:
        step(a, kl, r)
    b = AsymmetricKLController(ASYM)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.values() == a.values()
    for kl, r in seq[70:]:
        assert step(a, kl, r) == step(b, kl, r)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(KeyError):
        b.load_state_dict({"kl_short": 0.0})  # an entropy-aware key
    with pytest.raises(KeyError, match="safe/kl"):
        a.update({"safe/reward_raw_mean": 0.0})


@pytest.mark.parametrize("kind", ["k1+", "k1"])
def test_asymmetric_penalty_modes_value_and_gradient(kind):
    logp, old, ref, adv, mask, ent = batch(seed=5)
    ctrl = {"kl": 0.5, "threshold": 0.3, "momentum": 0.004, "penalty": 0.1 * 0.04 + 5 * 0.004**2}
    grads, values = {}, {}
    cases = (("none", "reference", {}), ("ref", "reference", ctrl), ("diff", "differentiable", ctrl))
    for name, mode, c in cases:
        lp = logp.clone().requires_grad_(True)
        cfg = SAFEConfig(controller="asymmetric", penalty_mode=mode, penalty_kl_kind=kind)
        loss, _ = safe_loss(lin(lp, old, ref, adv, mask, ent, c), cfg)
        (grads[name],) = torch.autograd.grad(loss, lp)
        values[name] = loss.item()
    assert values["ref"] - values["none"] == pytest.approx(ctrl["penalty"], rel=1e-12)
    assert torch.equal(grads["ref"], grads["none"])
    assert values["diff"] == pytest.approx(values["ref"], rel=1e-12)
    # dP/dKL = 2·0.1·(0.5 − 0.3) + 2·5·0.004/50 = 0.04 + 0.0008
    beta = 2 * 0.1 * 0.2 + 2 * 5 * 0.004 / 50
    per_tok = (logp - ref) if kind == "k1+" else torch.ones_like(logp)
    assert torch.allclose(grads["diff"] - grads["none"], beta * per_tok * mask / mask.sum(), atol=1e-14)
    # Below τ with falling KL the penalty is off: no extra gradient.
    lp = logp.clone().requires_grad_(True)
    off = {"kl": 0.1, "threshold": 0.3, "momentum": -0.01, "penalty": 0.0}
    loss, _ = safe_loss(lin(lp, old, ref, adv, mask, ent, off), SAFEConfig(controller="asymmetric"))
    assert torch.equal(torch.autograd.grad(loss, lp)[0], grads["none"])


def test_asymmetric_pipeline_and_split_over_ranks():
    logp, old, ref, adv, mask, ent = batch(B=6, seed=6)
    inp = AdvantageInputs(rewards_B=torch.rand(6), group_ids_B=torch.arange(6), mask_B_T=mask,
                          values_B_T=torch.zeros(6, 5), old_logp_B_T=old, ref_logp_B_T=ref)
    _, am = safe_advantages(inp, ASYM)
    ctrl = ALGO.make_controller(ASYM)
    out = ctrl.update({f"adv/{k}": v for k, v in am.items()})
    kl = float(((old - ref) * mask).sum() / mask.sum())
    assert ctrl.values()["kl"] == pytest.approx(kl, rel=1e-6) and "safe/kl_momentum" in out
    c = {"kl": 0.7, "threshold": 0.3, "momentum": 0.01, "penalty": 0.1 * 0.16 + 5e-4}
    lp = logp.clone().requires_grad_(True)
    full, _ = safe_loss(lin(lp, old, ref, adv, mask, ent, c), ASYM)
    (g_full,) = torch.autograd.grad(full, lp)
    n = float(mask.sum())
    total = sum(safe_loss(lin(lp[s], old[s], ref[s], adv[s], mask[s], ent[s], c, n_tok=n, n_seq=6), ASYM)[0]
                for s in (slice(0, 2), slice(2, 6)))
    (g_split,) = torch.autograd.grad(total, lp)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10)


def test_squared_max_critic_loss_hand_worked():
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    cfg = SAFEConfig(value_loss="squared_max")

    def loss_and_grad(v, v_old):
        values = torch.tensor([[0.0, v, 0.0]], dtype=torch.float64, requires_grad=True)
        inp = LossInputs(logp_B_T=torch.zeros(1, 3), mask_B_T=mask, advantages_B_T=torch.zeros(1, 3),
                         num_tokens_global=2.0, num_seqs_global=1.0, values_B_T=values,
                         returns_B_T=torch.zeros(1, 3, dtype=torch.float64))
        inp.old_values_B_T = torch.tensor([[0.0, v_old, 0.0]], dtype=torch.float64)
        loss, _ = safe_critic_loss(inp, cfg)
        return loss.item(), torch.autograd.grad(loss, values)[0][0, 1].item()

    # V = 1, V_old = 0.5 → V_clip = 0.7; max(1², 0.7²) = 1; ½·1·c_V = 0.25; ∂/∂V = 0.5·(V − R) = 0.5.
    assert loss_and_grad(1.0, 0.5) == pytest.approx((0.25, 0.5))
    # V = 0.2, V_old = 1 → V_clip = 0.8 is the larger error: ½·0.64·0.5 = 0.16, and the clip is
    # active, so no gradient reaches V (the pessimistic max picks the clipped branch).
    assert loss_and_grad(0.2, 1.0) == pytest.approx((0.16, 0.0))
