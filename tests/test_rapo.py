"""RAPO (formulas unverified against the paper): forward k3 to a reward-tempered reference.

Formulas: docs/algorithms.md § RAPO."""

import math

import pytest
import torch
from rlkit.algorithms import AdvantageInputs, LossInputs, get
from rlkit.algorithms.rapo import (
    RAPOConfig,
    rapo_advantages,
    rapo_loss,
    rapo_phi,
    tempered_ref_logp,
)

from rlkit import kl

ALGO = get("rapo")


def loss_inputs(logp, old, ref, adv, mask, rewards, tempered=None, entropy=None, n_tok=None, n_seq=None):
    return LossInputs(logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, old_logp_B_T=old, ref_logp_B_T=ref,
                      ref_tempered_logp_B_T=tempered, entropy_B_T=entropy, rewards_B=rewards,
                      num_tokens_global=float(mask.sum() if n_tok is None else n_tok),
                      num_seqs_global=float(mask.shape[0] if n_seq is None else n_seq))


def vocab_batch(B=4, T=5, V=6, dtype=torch.float64, seed=0):
    """Reference logits, sampled tokens, their log-probs, exact log q_0 (uniform), rewards 0/1."""
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    logp = ref_logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).to(dtype)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype)[:B]
    tempered = kl.tempered_logp(ref_logp, 0.0, ref_logits=ref_logits)
    return ref_logits, ref_logp, logp, mask, rewards, tempered


def test_phi_maps():
    r = torch.tensor([-1.0, 0.0, 0.4, 0.6, 1.0, 2.0])
    assert rapo_phi(r, RAPOConfig()).tolist() == [0, 0, 0, 1, 1, 1]
    assert rapo_phi(r, RAPOConfig(phi_low=0.25)).tolist() == [0.25, 0.25, 0.25, 1, 1, 1]
    lin = rapo_phi(r, RAPOConfig(phi_mode="linear", normalization="cheap"))
    assert torch.allclose(lin, torch.tensor([0, 0, 0.4, 0.6, 1, 1], dtype=torch.float64))


def test_exact_tempered_reference_properties():
    ref_logits, ref_logp, _, _mask, rewards, tempered = vocab_batch()
    V = ref_logits.shape[-1]
    # φ = 0 exactly normalized is the uniform distribution: log q_0 = −log V at every token.
    assert torch.allclose(tempered, torch.full_like(tempered, -math.log(V)), atol=1e-12)
    q = tempered_ref_logp(ref_logp, rapo_phi(rewards, RAPOConfig()), RAPOConfig(), tempered)
    assert torch.allclose(q[rewards == 1], ref_logp[rewards == 1])  # φ = 1 → π_ref itself
    assert torch.allclose(q[rewards == 0], tempered[rewards == 0])
    # cheap drops the normalizer: exact − cheap = −logsumexp_v(φ·log π_ref(v)), here φ = ½
    phi = 0.5
    exact = kl.tempered_logp(ref_logp, phi, ref_logits=ref_logits)
    cheap = tempered_ref_logp(ref_logp, torch.full((4,), phi), RAPOConfig(phi_mode="linear", normalization="cheap"))
    lse = torch.logsumexp(phi * torch.log_softmax(ref_logits, -1), -1)
    assert torch.allclose(cheap - exact, lse, atol=1e-12)
    assert torch.allclose(torch.logsumexp(phi * torch.log_softmax(ref_logits, -1) - lse[..., None], -1),
                          torch.zeros_like(lse), atol=1e-12)  # q_φ is normalized


def test_hand_worked_forward_k3_term():
    # one token, π_θ(y) = ½, π̂_ref(y) = ¼ (φ = 1): ρ = ½, k = ρ log ρ − ρ + 1 = 1 − ½ − ½·log 2 ≈ 0.153426.
    # A = 0 so the PG term is 0; loss = α·k with α = 0.1.
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)
    logp = t(math.log(0.5)).requires_grad_(True)
    inp = loss_inputs(logp, logp.detach(), t(math.log(0.25)), t(0.0), t(1.0), torch.tensor([1.0], dtype=torch.float64))
    loss, m = rapo_loss(inp, RAPOConfig(kl_coef=0.1))
    k = 0.5 - 0.5 * math.log(2.0)
    assert loss.item() == pytest.approx(0.1 * k, rel=1e-12) and m["kl_forward_k3"] == pytest.approx(k, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == pytest.approx(0.1 * -0.5 * math.log(0.5), rel=1e-12)  # α·(−ρ log ρ)


def test_estimator_nonnegative_and_clamped():
    _, ref_logp, logp, mask, rewards, tempered = vocab_batch(seed=1)
    logp = logp.clone()
    logp[0, 0] = -400.0  # log ρ = +huge: clamped to 20 before the exp, value clamped to 10
    logp.requires_grad_(True)
    inp = loss_inputs(logp, logp.detach(), ref_logp, torch.zeros_like(mask), mask, rewards, tempered)
    loss, _ = rapo_loss(inp, RAPOConfig(kl_coef=1.0))
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g[0, 0] == 0.0
    k = kl.kl_estimate(logp.detach(), tempered_ref_logp(ref_logp, rapo_phi(rewards, RAPOConfig()), RAPOConfig(),
                                                        tempered), "forward_k3", mask=mask)
    assert (k >= 0).all() and k.max() <= 10.0


def test_loss_is_pg_plus_kl_minus_entropy():
    _, ref_logp, logp, mask, rewards, tempered = vocab_batch(seed=2)
    gid = torch.tensor([0, 0, 1, 1])
    adv, _ = rapo_advantages(AdvantageInputs(rewards_B=rewards, group_ids_B=gid, mask_B_T=mask), RAPOConfig())
    # groups {1, 0}: mean ½, Bessel std √½ → A = ±½/(√½ + 1e−6)
    assert adv[0, 0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)
    old = logp - 0.05
    ent = torch.rand_like(logp)
    cfg = RAPOConfig(kl_coef=0.2, entropy_coef=0.01)
    loss, m = rapo_loss(loss_inputs(logp, old, ref_logp, adv.double(), mask, rewards, tempered, ent), cfg)
    q = torch.where(rewards[:, None] == 1, ref_logp, tempered)
    k = kl.kl_estimate(logp, q, "forward_k3", mask=mask)
    n = mask.sum()
    expect = m["pg_loss"] + 0.2 * float((k * mask).sum() / n) - 0.01 * float((ent * mask).sum() / n)
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    needs = ALGO.needs(cfg)
    assert needs.entropy and needs.ref_logp and needs.ref_temper_phi == 0.0


def test_sequence_granularity():
    _, ref_logp, logp, mask, rewards, tempered = vocab_batch(seed=3)
    cfg = RAPOConfig(kl_coef=1.0, granularity="sequence")
    inp = loss_inputs(logp, logp, ref_logp, torch.zeros_like(mask), mask, rewards, tempered)
    loss, _ = rapo_loss(inp, cfg)
    q = torch.where(rewards[:, None] == 1, ref_logp, tempered)
    s_lp, s_q = (logp * mask).sum(-1, keepdim=True), (q * mask).sum(-1, keepdim=True)
    assert loss.item() == pytest.approx(float(kl.kl_estimate(s_lp, s_q, "forward_k3").mean()), rel=1e-12)


def test_config_validation_and_missing_inputs():
    with pytest.raises(ValueError, match="exact"):
        ALGO.make_config({"phi_mode": "linear"})  # exact needs per-response φ: not in the contract
    with pytest.raises(ValueError, match="granularity"):
        ALGO.make_config({"granularity": "chunk"})
    assert ALGO.needs(ALGO.make_config({"normalization": "cheap"})).ref_temper_phi is None
    _, ref_logp, logp, mask, rewards, _ = vocab_batch()
    with pytest.raises(ValueError, match="ref_tempered_logp"):
        rapo_loss(loss_inputs(logp, logp, ref_logp, mask, mask, rewards), RAPOConfig())
    with pytest.raises(ValueError, match="rewards_B"):
        rapo_loss(loss_inputs(logp, logp, ref_logp, mask, mask, None), RAPOConfig(normalization="cheap"))


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_split_over_ranks_matches_full_batch(granularity):
    _, ref_logp, logp, mask, rewards, tempered = vocab_batch(B=4, seed=4)
    adv = torch.randn_like(logp) * mask
    old = logp - 0.1
    cfg = RAPOConfig(kl_coef=0.5, granularity=granularity)
    logp = logp.clone().requires_grad_(True)
    full, _ = rapo_loss(loss_inputs(logp, old, ref_logp, adv, mask, rewards, tempered), cfg)
    (g_full,) = torch.autograd.grad(full, logp)
    n_tok, total = float(mask.sum()), 0.0
    for s in (slice(0, 1), slice(1, 4)):
        total = total + rapo_loss(loss_inputs(logp[s], old[s], ref_logp[s], adv[s], mask[s], rewards[s],
                                              tempered[s], n_tok=n_tok, n_seq=4), cfg)[0]
    (g_split,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, full, rtol=1e-12) and torch.allclose(g_split, g_full, rtol=1e-10)


def test_fp32_matches_fp64():
    _, ref_logp, logp, mask, rewards, tempered = vocab_batch(seed=5)
    adv = torch.randn_like(logp) * mask
    vals = []
    for dt in (torch.float64, torch.float32):
        def c(x, dt=dt):
            return x.to(dt)
        vals.append(rapo_loss(loss_inputs(c(logp), c(logp - 0.1), c(ref_logp), c(adv), c(mask), c(rewards),
                                          c(tempered)), RAPOConfig(kl_coef=0.3))[0].item())
    assert abs(vals[0] - vals[1]) < 1e-6 * max(1.0, abs(vals[0]))
