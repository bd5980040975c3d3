"""PMD-mean: hand-worked loss, per-sequence gradient, baselines, Lambert-W population check.

Formulas: docs/algorithms.md § PMD-mean."""

import math

import pytest
import torch
from rlkit.algorithms import AdvantageInputs, LossInputs, get
from rlkit.algorithms.pmd_mean import (
    PMDMeanConfig,
    pmd_advantages,
    pmd_advantages_B,
    pmd_group_filter,
    pmd_loss,
)

ALGO = get("pmd_mean")


def loss_inputs(logp, old, adv, mask, n_seqs=None, max_len=0):
    return LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, old_logp_B_T=old,
                      num_tokens_global=float(mask.sum()),
                      num_seqs_global=float(logp.shape[0] if n_seqs is None else n_seqs),
                      max_response_len=max_len)


def random_batch(B=5, T=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = logp + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).to(dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype) * mask
    return logp, old, adv, mask


def test_hand_worked_loss_and_padding_garbage():
    # τ = 0.5, A = 1 on a 2-token response: Δ = (−1 + 1.5) + (−1 + 1.2) = 0.7, L = 2.
    # loss = ½·τ·(A/τ − Δ)²/L = 0.25·(2 − 0.7)²/2 = 0.21125. The third position is padding (NaN).
    logp = torch.tensor([[-1.0, -1.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -1.2, float("inf")]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = pmd_loss(loss_inputs(logp, old, mask * 1.0, mask), PMDMeanConfig(tau=0.5))
    assert loss.item() == pytest.approx(0.21125, rel=1e-12)
    assert m["ppo_kl"] == pytest.approx(-0.35, rel=1e-12)  # −Δ/L
    loss.backward()
    # dL/dℓ_t = −(A − τΔ)/(S·L) = −(1 − 0.35)/2 = −0.325 on real tokens, 0 on padding.
    assert torch.allclose(logp.grad, torch.tensor([[-0.325, -0.325, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_per_sequence_gradient_weight(mode):
    logp, old, adv, mask = random_batch()
    tau, B, T_max = 0.3, logp.shape[0], 9
    logp.requires_grad_(True)
    loss, _ = pmd_loss(loss_inputs(logp, old, adv, mask, max_len=T_max), PMDMeanConfig(tau=tau, loss_agg_mode=mode))
    (g,) = torch.autograd.grad(loss, logp)
    L = mask.sum(-1)
    A = adv.sum(-1) / L
    delta = ((logp.detach() - old) * mask).sum(-1)
    norm = L if mode == "seq-mean-token-mean" else torch.full_like(L, T_max)
    # every real token of response i carries −(A_i − τΔ_i)/(B·norm_i) ...
    assert torch.allclose(g, (-(A - tau * delta) / (B * norm))[:, None] * mask, rtol=1e-10)
    if mode == "seq-mean-token-mean":  # ... which sums to −(A_i − τΔ_i)/B whatever the length
        assert torch.allclose(g.sum(-1), -(A - tau * delta) / B, rtol=1e-10)


def test_baselines_mean_loo_singleton():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0], dtype=torch.float64)
    gid = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    mean = pmd_advantages_B(r, gid, baseline="mean", tau=0.01)
    loo = pmd_advantages_B(r, gid, baseline="loo", tau=0.01)
    # group 0: r̄ = ½ → mean A = ±½; LOO = G/(G−1)·(r − r̄) = 4/3·(±½) = ±2/3.
    assert torch.allclose(mean[:4], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(loo[:4], torch.tensor([2, -2, -2, 2], dtype=torch.float64) / 3)
    assert mean[4] == 3.0 and loo[4] == 3.0  # singleton: no baseline, A = r
    assert (mean[5:] == 0).all() and (loo[5:] == 0).all()  # all-equal group: exactly 0


def test_partition_baseline_hand_worked_and_clamp():
    # τ = 1, r = [1, 0, 0]: M = 1. i = 0: mean_{j≠0} e^{r_j − 1} = e^{−1} → b = 1 − 1 = 0 → A = 1.
    # i = 1: mean(e^0, e^{−1}) → b = 1 + log((1 + e^{−1})/2) → A = −b.
    r = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    a = pmd_advantages_B(r, torch.zeros(3, dtype=torch.long), baseline="partition", tau=1.0)
    b1 = 1 + math.log((1 + math.exp(-1)) / 2)
    assert torch.allclose(a, torch.tensor([1.0, -b1, -b1], dtype=torch.float64), rtol=1e-12)
    # τ = 0.01, r = [1, −1]: e^{−200} is clamped to 1e−8 → A_0 = −τ·log(1e−8) ≈ 0.1842.
    a = pmd_advantages_B(torch.tensor([1.0, -1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                         baseline="partition", tau=0.01)
    assert a[0].item() == pytest.approx(-0.01 * math.log(1e-8), rel=1e-12)
    single = pmd_advantages_B(torch.tensor([0.7]), torch.tensor([5]), baseline="partition", tau=0.01)
    assert single.item() == pytest.approx(0.7)  # singleton: b = 0


def test_all_equal_group_gives_pure_proximal_term():
    logp, old, _, mask = random_batch(B=3)
    inp = AdvantageInputs(rewards_B=torch.ones(3), group_ids_B=torch.zeros(3, dtype=torch.long), mask_B_T=mask)
    adv, _ = pmd_advantages(inp, PMDMeanConfig())
    assert (adv == 0).all()
    loss, _ = pmd_loss(loss_inputs(logp, old, adv.double(), mask), PMDMeanConfig(tau=0.2))
    delta = ((logp - old) * mask).sum(-1)
    assert loss.item() == pytest.approx(float((0.5 * 0.2 * delta**2 / mask.sum(-1)).mean()), rel=1e-12)


def lambert_w(x, iters=25):
    w = torch.log1p(x)
    for _ in range(iters):
        ew = torch.exp(w)
        w = w - (w * ew - x) / (ew * (w + 1))
    return w


def test_population_solution_is_lambert_w_and_more_conservative_than_ideal_pmd():
    # Tabular policy over V outcomes; exact expectation over y ~ π_t of the per-response loss
    # (single-token responses, Δ = log π_θ(y) − log π_t(y)). Its minimizer over the simplex solves
    # log z + c·z = a (z = π/π_t, a = (r − E r)/τ), i.e. z = W(c·e^a)/c with c set by Σ π_t z = 1.
    torch.manual_seed(0)
    V, tau = 6, 0.5
    pi_t = torch.softmax(torch.randn(V, dtype=torch.float64), -1)
    r = torch.randn(V, dtype=torch.float64)
    A = r - (pi_t * r).sum()
    theta = torch.log(pi_t).clone().requires_grad_(True)
    eye_mask = torch.ones(V, 1, dtype=torch.float64)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=40, history_size=20, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)[:, None]  # response y = outcome y
        per_y = [pmd_loss(loss_inputs(logp[y:y + 1], torch.log(pi_t)[y:y + 1, None], A[y:y + 1, None],
                                      eye_mask[y:y + 1], n_seqs=1), PMDMeanConfig(tau=tau))[0] for y in range(V)]
        loss = (pi_t * torch.stack(per_y)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    fitted = torch.softmax(theta.detach(), -1)
    a = A / tau
    lo, hi = -30.0, 30.0  # bisection on log c: Σ π_t W(c e^a)/c decreases in c
    for _ in range(80):
        mid = (lo + hi) / 2
        c = math.exp(mid)
        lo, hi = (mid, hi) if float((pi_t * lambert_w(c * torch.exp(a)) / c).sum()) > 1 else (lo, mid)
    c = math.exp(lo)
    closed = pi_t * lambert_w(c * torch.exp(a)) / c
    assert torch.allclose(fitted, closed, atol=1e-7)
    # Ideal PMD moves log-odds by exactly a_i − a_j; PMD-mean by strictly less (log z + cz = a).
    shift = torch.log(fitted / pi_t)
    d_fit = (shift[:, None] - shift[None, :]).abs()
    d_ideal = (a[:, None] - a[None, :]).abs()
    off = ~torch.eye(V, dtype=torch.bool)
    assert (d_fit[off] < d_ideal[off]).all()


def test_group_filter_open_interval():
    r = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    gid = torch.tensor([0, 0, 1, 1, 2, 2])
    keep = pmd_group_filter(r, gid, PMDMeanConfig(reward_lb=-1.0, reward_ub=1.0))
    assert keep.tolist() == [False, False, True, True, False, False]  # mean ±1 lies outside (−1, 1)
    assert pmd_group_filter(r, gid, PMDMeanConfig()).all()


def test_config_and_needs():
    with pytest.raises(ValueError, match="baseline"):
        ALGO.make_config({"baseline": "median"})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ALGO.make_config({"loss_agg_mode": "token-mean"})
    n = ALGO.needs(ALGO.make_config())
    assert n.old_logp and not n.ref_logp and not n.teacher_logp and not n.values
    assert ALGO.make_config().baseline == "mean" and ALGO.make_config().tau == 0.01


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_over_ranks_matches_full_batch(mode):
    logp, old, adv, mask = random_batch(B=6, seed=5)
    cfg = PMDMeanConfig(tau=0.1, loss_agg_mode=mode)
    logp.requires_grad_(True)
    full, _ = pmd_loss(loss_inputs(logp, old, adv, mask, max_len=8), cfg)
    (g_full,) = torch.autograd.grad(full, logp)
    total = 0.0
    for s in (slice(0, 2), slice(2, 5), slice(5, 6)):
        # each rank pads to its own width; the global counts and T_max stay the batch's
        width = int(mask[s].sum(-1).max())
        total = total + pmd_loss(loss_inputs(logp[s, :width], old[s, :width], adv[s, :width], mask[s, :width],
                                             n_seqs=6, max_len=8), cfg)[0]
    (g_split,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10)


def test_fp32_matches_fp64():
    b64 = random_batch(seed=7)
    l64, _ = pmd_loss(loss_inputs(*b64), PMDMeanConfig(tau=0.05))
    l32, _ = pmd_loss(loss_inputs(*[x.float() for x in b64]), PMDMeanConfig(tau=0.05))
    assert l32.dtype == torch.float32
    assert abs(l32.item() - l64.item()) <= 1e-5 * max(1.0, abs(l64.item()))


def test_loo_baseline_matches_verl_rloo_oracle():
    """Optional oracle: verl's ``compute_rloo_outcome_advantage`` (the estimator OpenKimi's scripts
    use). Skipped unless verl is importable (e.g. PYTHONPATH=/tmp/verl_pkgs, see test_verl_parity)."""
    import warnings

    import numpy as np

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import verl.trainer.ppo.core_algos as ca
    except Exception as e:  # noqa: BLE001  (verl drags ray/transformers: any failure = no oracle)
        pytest.skip(f"verl not importable: {e!r}")
    g = torch.Generator().manual_seed(11)
    r = torch.randint(0, 3, (9,), generator=g).float()
    gid = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3])  # groups of 4 and 3, two singletons
    mask = (torch.arange(5) < torch.randint(1, 6, (9, 1), generator=g)).float()
    last = mask.sum(-1).long() - 1
    token_rewards = torch.zeros(9, 5)
    token_rewards[torch.arange(9), last] = r
    index = np.array([f"uid{int(i)}" for i in gid], dtype=object)
    verl_adv, _ = ca.compute_rloo_outcome_advantage(token_rewards, mask, index)
    ours = pmd_advantages_B(r, gid, baseline="loo", tau=0.01)[:, None] * mask
    assert torch.allclose(verl_adv, ours, atol=1e-6)
