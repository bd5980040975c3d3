"""Optional reference-oracle test: our GRPO/DAPO/KL-Cov/Clip-Cov math against verl 0.9.1's
``core_algos``. Skipped when verl cannot be imported; nothing is vendored.

Run (verl in a side directory, never in the project venv):
    pip install --no-deps --target /tmp/verl_pkgs verl==0.9.1 tensordict omegaconf \
        antlr4-python3-runtime==4.9.3 codetiming orjson pyvers cloudpickle importlib_metadata zipp
    PYTHONPATH=/tmp/verl_pkgs OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_verl_parity.py -q
"""

import warnings

import numpy as np
import pytest
import torch

try:  # verl pulls ray, transformers, tensordict, omegaconf: any failure means "no oracle here"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import verl.trainer.ppo.core_algos as ca
        from verl.workers.config import ActorConfig, PolicyLossConfig
except Exception as e:  # noqa: BLE001
    pytest.skip(f"verl not importable: {e!r}", allow_module_level=True)

from rlkit.algorithms.common import (
    AGG_MODES,
    agg_loss,
    clipped_surrogate,
    group_advantages,
)
from rlkit.algorithms.kl_cov import clip_cov_token_loss, kl_cov_token_loss

F64 = torch.float64


def _batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, 1, generator=g, dtype=F64).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) < 0.8).to(F64)
    mask[:, 0] = 1
    mask[3] = 0  # an empty row
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss(mode):
    logp, _, _, mask = _batch()
    n_tok, n_seq = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    for kw_ours, kw_verl in (({}, {}), ({"num_tokens": 40, "num_seqs": 9},
                                        {"batch_num_tokens": 40, "global_batch_size": 9})):
        ours = agg_loss(logp, mask, mode, max_response_len=16, **kw_ours)
        ref = ca.agg_loss(logp, mask, mode, loss_scale_factor=16, **kw_verl)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-7), (mode, kw_ours, n_tok, n_seq)


@pytest.mark.parametrize("clip_high,c", [(0.2, 3.0), (0.28, 10.0)])
def test_clipped_surrogate_matches_compute_policy_loss(clip_high, c):
    logp, old, adv, mask = _batch(1)
    logp = logp.clone()
    logp[0, 1] = old[0, 1] + 1.6  # s ≈ 5: the dual clip is active for A < 0
    lp = logp.clone().requires_grad_()
    tok, m = clipped_surrogate(lp, old, adv, mask, clip_low=0.2, clip_high=clip_high, dual_clip_c=c)
    ours = agg_loss(tok, mask, "token-mean")
    ours.backward()
    lp_ref = logp.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, clipfrac, ppo_kl, clipfrac_lower = ca.compute_policy_loss(
            old, lp_ref, adv, mask, cliprange=0.2, cliprange_low=0.2, cliprange_high=clip_high,
            clip_ratio_c=c, loss_agg_mode="token-mean")
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-14)
    assert m["pg_clipfrac"].item() == pytest.approx(float(clipfrac.detach()))
    assert m["ppo_kl"].item() == pytest.approx(float(ppo_kl.detach()))
    assert m["pg_clipfrac_lower"].item() == pytest.approx(float(clipfrac_lower.detach()))


def test_group_advantages_match_compute_grpo_outcome_advantage():
    g = torch.Generator().manual_seed(2)
    B, T = 12, 5
    rewards = torch.randint(0, 3, (B,), generator=g).to(torch.float32) * 0.5
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 2])  # group 2 has 2 members
    ids[6] = 7  # ...and now a singleton (7) and a one-member group 2
    mask = torch.ones(B, T)
    mask[:, 3:] = (torch.rand(B, 2, generator=g) < 0.5).float()
    lengths = mask.sum(-1).long()
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), lengths - 1] = rewards  # outcome on the last valid token
    index = np.array([f"uid{i}" for i in ids.tolist()], dtype=object)
    for norm in (True, False):
        ref, _ = ca.compute_grpo_outcome_advantage(token_rewards, mask, index, epsilon=1e-6,
                                                   norm_adv_by_std_in_grpo=norm)
        ours = group_advantages(rewards, ids, scale="group" if norm else "none", eps=1e-6)
        torch.testing.assert_close(ours[:, None] * mask, ref, rtol=1e-6, atol=1e-6)


def _actor_config(**policy):
    loss_mode = policy.pop("loss_mode")
    clip = policy.pop("clip", 0.2)
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size=2, clip_ratio=clip,
                       clip_ratio_low=clip, clip_ratio_high=clip, clip_ratio_c=3.0,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy))


def test_kl_cov_matches_verl():
    logp, old, adv, mask = _batch(3)
    cfg = _actor_config(loss_mode="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.7)
    ref, ref_m = ca.compute_policy_loss_kl_cov(old, logp, adv, mask, "token-mean", config=cfg)
    tok, m = kl_cov_token_loss(logp, old, adv, mask, kl_cov_ratio=0.1, ppo_kl_coef=0.7)
    assert agg_loss(tok, mask, "token-mean").item() == pytest.approx(ref.item(), rel=1e-10)
    # verl's masked_mean adds 1e-8 to the denominator: agreement to ~1e-9 relative
    assert m["ppo_kl"].item() == pytest.approx(float(ref_m["actor/ppo_kl"]), rel=1e-7)


def test_clip_cov_matches_verl_when_selection_is_deterministic():
    logp, old, adv, mask = _batch(4)
    adv = adv * 6  # make covariances reach the (lb, ub) window
    cfg = _actor_config(loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=0.5, clip_cov_ub=5.0)
    ref, ref_m = ca.compute_policy_loss_clip_cov(old, logp, adv, mask, "token-mean", config=cfg)
    tok, m = clip_cov_token_loss(logp, old, adv, mask, clip_cov_ratio=1.0, clip_cov_lb=0.5,
                                 clip_cov_ub=5.0, clip_low=0.2, clip_high=0.2)
    assert m["selected_B_T"].sum().item() > 0
    assert agg_loss(tok, mask, "token-mean").item() == pytest.approx(ref.item(), rel=1e-10)
    assert m["pg_clipfrac"].item() == pytest.approx(float(ref_m["actor/pg_clipfrac"]), rel=1e-7)
