"""The learner's fused loss pass gives the loss and the gradients of the recompute path.

The learner computes an algorithm's loss and its gradient in one fused pass (rlkit.kl_fused
``fused_stats_loss``: per-token coefficients probed chunk by chunk, checked, corrected). Here, on a
tiny random Llama with SmolLM2's vocabulary and a batch whose old log-probs make the PPO clip act
on both sides, ``LearnerRank._micro_loss`` is checked against the loss of ``token_stats`` (whose
backward recomputes the logits) for algorithms with a KL-to-reference term, an entropy term, a
non-per-token selection (KL-Cov) and preference pairs (f-DPO, TDPO's exact full KL), with one
chunk and with several.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlkit.algorithms.base import AlgorithmSetup
from rlkit.config import LearnerConfig, ModelConfig
from rlkit.logprobs import token_stats
from rlkit.types import Rollout, SamplingConfig, collate
from rlkit.workers.learner import LearnerRank, LearnerSpec, Scorer

T = 0.9
CASES = [
    ("grpo", {"beta": 0.04, "kl_kind": "k3", "loss_agg_mode": "seq-mean-token-mean"}),  # KL to π_ref
    ("grpo", {"beta": 0.1, "kl_kind": "k3+", "kl_is_weight": "differentiable", "entropy_coef": 0.01,
              "loss_agg_mode": "token-mean", "dual_clip_c": None}),
    ("dapo", {"entropy_coef": 0.05}),  # entropy term, token-mean
    ("rpg", {}),
    ("kl_cov", {"kl_cov_ratio": 0.2}),  # top-k covariance selection: not a sum of per-token terms
    ("fdpo", {}),
    ("tdpo", {}),  # pairs, differentiable exact full-vocabulary KL against the reference model
]
PER_TOKEN = {"grpo", "dapo", "rpg"}


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad():  # a sharper policy than the near-uniform init, and a reference apart from it
        policy.get_output_embeddings().weight.mul_(30.0)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ref.get_output_embeddings().weight.mul_(30.0)
    return policy.train(), ref.eval().requires_grad_(False)


def _batch():
    """Two groups of four (shared prompts: the packed forward), responses of 1 to 9 tokens."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for gid, (p, lengths) in enumerate([(6, (5, 2, 9, 1)), (4, (3, 8, 7, 4))]):
        prompt = torch.randint(10, 5000, (p,), generator=g).tolist()
        for n in lengths:
            rows.append(Rollout(prompt, torch.randint(10, 5000, (n,), generator=g).tolist(), [-3.0] * n, "stop", 0,
                                gid, gid))
    batch = collate(rows, torch.rand(len(rows), generator=g).tolist(), pad_id=0, version=0)
    batch.advantages_B_T = torch.randn(batch.size, 1, generator=g) * batch.response_mask_B_T
    return batch


def _learner(policy, ref, name: str, args: dict, chunk: int) -> LearnerRank:
    """A LearnerRank's loss machinery on a plain module (no DeepSpeed, no process group)."""
    setup = AlgorithmSetup.build(name, args)
    lr = LearnerRank.__new__(LearnerRank)
    lr.spec = LearnerSpec(model_dir="", model=ModelConfig(), learner=LearnerConfig(chunk_size=chunk),
                          sampling=SamplingConfig(temperature=T, max_new_tokens=16), algorithm=setup)
    lr.algo, lr.algo_cfg, lr.needs = setup.algo, setup.cfg, setup.needs
    lr.engine, lr.ref, lr.critic, lr.truncation, lr._per_token_loss = Scorer(policy), ref, None, None, True
    return lr


def _side_inputs(policy, ref, batch):
    """old log-probs off the current ones by ±0.4 (the clip binds on both sides), reference log-probs."""
    with torch.no_grad():
        cur = token_stats(policy, batch, temperature=T, chunk_size=64)["logp"]
        g = torch.Generator().manual_seed(5)
        batch.extras["old_logp"] = (cur + 0.4 * (2 * torch.rand(cur.shape, generator=g) - 1)) * batch.response_mask_B_T
        batch.extras["ref_logp"] = token_stats(ref, batch, temperature=T, chunk_size=64)["logp"]


def _reference(lr: LearnerRank, policy, micro, tokens: float, seqs: float):
    """The recompute path: token_stats (backward recomputes the logits), then the loss on its stats."""
    ref = lr.ref if lr.needs.ref_full_kl else None
    stats = token_stats(policy, micro, temperature=T, chunk_size=lr.spec.learner.chunk_size,
                        with_entropy=not lr.needs.pairs, ref_model=ref)
    if lr.needs.pairs:
        return lr._pair_loss(micro, seqs / 2, stats)[0]
    return lr._policy_loss(micro, tokens, seqs, {}, stats)[0]


def _grads(policy, loss) -> dict[str, torch.Tensor]:
    policy.zero_grad()
    loss.backward()
    out = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    return out


@pytest.mark.parametrize("chunk", [1024, 5], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("name,args", CASES, ids=[f"{n}{i}" for i, (n, _) in enumerate(CASES)])
def test_fused_loss_pass_equals_recompute_path(models, name, args, chunk):
    policy, ref = models
    batch = _batch()
    _side_inputs(policy, ref, batch)
    lr = _learner(policy, ref, name, args, chunk)
    micro = batch.select(list(range(6)))  # a micro-batch of the step: counts are the whole step's
    tokens = float(batch.response_mask_B_T.sum())
    seqs = float(batch.size)
    loss, metrics = lr._micro_loss(micro, tokens, seqs, {})
    got = _grads(policy, 3.0 * loss)  # the engine scales the loss (world size): grads scale with it
    want_loss = _reference(lr, policy, micro, tokens, seqs)
    want = _grads(policy, 3.0 * want_loss)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-7)
    assert metrics["loss/total"] == pytest.approx(float(want_loss.detach()), rel=1e-5, abs=1e-7)
    assert set(got) == set(want) and len(got) > 0
    for n in want:
        scale = float(want[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    if name in PER_TOKEN:
        assert lr._per_token_loss  # the probe held: no correction, the fused pass stays


def test_loss_found_not_per_token_switches_to_recompute_path(models):
    """f-DPO over several chunks: the probe misses most rows (sequence sums), the pass corrects them,
    and later multi-chunk micro-batches take the recompute path; single-chunk ones keep the fused
    pass (its probe sees every row, so it is exact for any loss)."""
    policy, ref = models
    batch = _batch()
    _side_inputs(policy, ref, batch)
    lr = _learner(policy, ref, "fdpo", {}, chunk=5)
    tokens, seqs = float(batch.response_mask_B_T.sum()), float(batch.size)
    lr._micro_loss(batch, tokens, seqs, {})
    assert not lr._per_token_loss
    calls = []
    forward = lr.engine.forward
    lr.engine.forward = lambda micro, loss_fn=None, **kw: calls.append(loss_fn is not None) or forward(
        micro, loss_fn=loss_fn, **kw)
    loss, _ = lr._micro_loss(batch, tokens, seqs, {})
    small = batch.select([1, 3])  # one pair of 2 + 1 tokens: one chunk
    small_loss, _ = lr._micro_loss(small, tokens, seqs, {})
    assert calls == [False, True]
    for micro, got in ((batch, loss), (small, small_loss)):
        want = _reference(lr, policy, micro, tokens, seqs)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- one rank


def _one_rank_update(model_dir: str, zero_stage: int) -> dict:
    """One update of a real one-rank DeepSpeed learner (three uneven micro-batches) and the same
    update done plainly: full-batch loss, backward, gradient clipped to the global norm, AdamW."""
    import socket

    from transformers import AutoModelForCausalLM

    from rlkit.algorithms.base import LossInputs

    setup = AlgorithmSetup.build("grpo", {"beta": 0.0, "loss_agg_mode": "seq-mean-token-mean"})
    lc = LearnerConfig(micro_batch_size=3, lr=1e-3, threads=1, zero_stage=zero_stage, max_grad_norm=0.5)
    spec = LearnerSpec(model_dir=model_dir, model=ModelConfig(path=model_dir), learner=lc,
                       sampling=SamplingConfig(temperature=T, max_new_tokens=16), algorithm=setup)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner = LearnerRank(0, 1, "127.0.0.1", port, spec)
    batch = _batch()
    learner.set_batch(batch)
    learner.side_passes()
    metrics = learner.train(batch.advantages_B_T, {})
    got = learner.param_vector()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mask = batch.response_mask_B_T
    stats = token_stats(model, batch, temperature=T, chunk_size=lc.chunk_size, with_entropy=True)
    inputs = LossInputs(logp_B_T=stats["logp"], mask_B_T=mask, advantages_B_T=batch.advantages_B_T,
                        num_tokens_global=float(mask.sum()), num_seqs_global=float(batch.size),
                        old_logp_B_T=stats["logp"].detach(), entropy_B_T=stats["entropy"].detach(),
                        rewards_B=batch.rewards_B, max_response_len=16)
    loss, _ = setup.algo.loss(inputs, setup.cfg)
    loss.backward()
    params = list(model.parameters())
    grad = torch.cat([p.grad.flatten().double() for p in params])
    torch.nn.utils.clip_grad_norm_(params, lc.max_grad_norm)
    torch.optim.AdamW(params, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay).step()
    want = torch.cat([p.detach().flatten() for p in params])
    # Adam's first step is lr·g/(|g| + 1e-8): where 0 < |g| ≲ 1e-5, float noise in g (micro-batch vs
    # full-batch summation) moves it by a visible part of lr; elsewhere it is 0 or ±lr to within 1e-3.
    clear = (grad.abs() > 1e-5) | (grad == 0)
    return {"diff_clear": float((got - want).abs()[clear].max()), "diff_all": float((got - want).abs().max()),
            "clear_frac": float(clear.double().mean()), "norm": metrics.get("learn/grad_norm"),
            "want_norm": float(grad.norm()), "loss": metrics["loss/total"], "numel": [got.numel(), want.numel()],
            "one_rank_reduces": getattr(learner.engine.optimizer, "one_rank_reduces", 0)}


@pytest.mark.parametrize("zero_stage", [2, 0])
def test_one_rank_update_equals_full_batch_adamw_step(tiny_llama_dir, zero_stage):
    """Exact global normalization through micro-batches, the fused loss pass and DeepSpeed's step at
    one rank (ZeRO-2 runs as stage 1 there, rlkit.workers.ds_engine.zero_section, with the identity
    all-reduce skipped, ``one_rank_reduce``): the gradient norm and the weights after an update
    equal a plain full-batch step (clip to the global norm, AdamW)."""
    import json
    import os
    import subprocess
    import sys

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_learner_fused as t; "
            f"print('RESULT', json.dumps(t._one_rank_update({str(tiny_llama_dir)!r}, {zero_stage})))")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["numel"][0] == res["numel"][1] and res["clear_frac"] > 0.02, res
    lr = 1e-3
    assert res["diff_clear"] < 1e-3 * lr and res["diff_all"] < 0.1 * lr, res
    if zero_stage:  # DeepSpeed reports the gradient norm with a ZeRO optimizer only
        assert res["norm"] == pytest.approx(res["want_norm"], rel=1e-5), res
        assert res["one_rank_reduces"] >= 1, res  # the step went through the one-rank reduce
