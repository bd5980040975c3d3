"""The learner's per-token log-probs equal a plain full-logits computation on the same tokens."""

from __future__ import annotations

import pytest
import torch

from rlkit.logprobs import support_logprobs, token_stats
from rlkit.types import Rollout, collate
from rlkit.workers.engine import SamplingConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from rlkit.assets import tiny_model_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path_factory.mktemp("m") / "m"))
    with torch.no_grad():  # sharper than the near-uniform init, so top-k/top-p cut somewhere real
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


def _batch(model):
    """Random prompts; each completion token drawn among the model's 3 most likely, so the tokens
    sit inside every support tested here, as sampled tokens do."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i, (p, c) in enumerate([(5, 7), (9, 3), (4, 10)]):
        ids = torch.randint(10, 5000, (p,), generator=g).tolist()
        for _ in range(c):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 3).indices
            ids.append(int(top[torch.randint(0, 3, (1,), generator=g)]))
        rows.append(Rollout(ids[:p], ids[p:], [0.0] * c, "length", 0, i, i))
    return collate(rows, [0.0] * 3, pad_id=0, version=0)


def _reference(model, batch, sampling):
    """Slow and obvious: one full forward per row, log-probs over the sampler's support."""
    out = torch.zeros(batch.response_mask_B_T.shape)
    for b in range(batch.size):
        p, n = int(batch.prompt_len_B[b]), int(batch.response_mask_B_T[b].sum())
        ids = batch.input_ids_B_L[b, : p + n][None]
        logits = model(input_ids=ids).logits[0, p - 1: p + n - 1]
        out[b, :n] = support_logprobs(logits, sampling).gather(-1, ids[0, p:, None]).squeeze(-1)
    return out


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0, top_k=50),
                                      SamplingConfig(temperature=1.3, top_p=0.8)], ids=["temp", "topk", "topp"])
def test_token_stats_match_full_logits(tiny, sampling):
    batch = _batch(tiny)
    trunc = sampling if (sampling.top_k or sampling.top_p < 1) else None
    with torch.no_grad():
        got = token_stats(tiny, batch, temperature=sampling.temperature, chunk_size=2, with_entropy=True,
                          truncation=trunc)
    want = _reference(tiny, batch, sampling)
    mask = batch.response_mask_B_T.bool()
    finite = torch.isfinite(want) & mask
    assert finite.any()
    torch.testing.assert_close(got["logp"][finite], want[finite], rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.isfinite(got["logp"]) | ~mask, torch.isfinite(want) | ~mask)
    assert (got["logp"][~mask] == 0).all() and (got["entropy"][mask] >= 0).all()


def _group_batch():
    """Two GRPO groups (prompts of 6 and 11 tokens, one of a single token) with responses of
    different lengths, so rows share prompts and the shared-prompt forward is taken."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for gid, (p, lengths) in enumerate([(6, (5, 2, 9, 1)), (11, (3, 8, 8, 4)), (1, (4, 6))]):
        prompt = torch.randint(10, 5000, (p,), generator=g).tolist()
        for n in lengths:
            rows.append(Rollout(prompt, torch.randint(10, 5000, (n,), generator=g).tolist(), [0.0] * n, "length",
                                0, gid, gid))
    return collate(rows, [0.0] * len(rows), pad_id=0, version=0)


def test_shared_prompt_forward_equals_full_forward_with_gradients(tiny):
    from rlkit.logprobs import _packed_plan

    batch = _group_batch()
    assert _packed_plan(batch, tiny.config) is not None
    sampling = SamplingConfig(temperature=0.9)
    model = tiny.train()
    try:
        got = token_stats(model, batch, temperature=0.9, chunk_size=4)["logp"]
        mask = batch.response_mask_B_T
        (got * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        # The reference: one full forward per row, no sharing.
        want = torch.zeros_like(got)
        for b in range(batch.size):
            p, n = int(batch.prompt_len_B[b]), int(mask[b].sum())
            ids = batch.input_ids_B_L[b, : p + n][None]
            logits = model(input_ids=ids).logits[0, p - 1: p + n - 1]
            want[b, :n] = support_logprobs(logits, sampling).gather(-1, ids[0, p:, None]).squeeze(-1)
        (want * mask).sum().backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    finally:
        model.zero_grad()
        model.eval()


def test_long_responses_are_not_packed(tiny):
    """A pack's dense mask makes its attention quadratic in the pack's length: with long responses
    the padded per-row forward is cheaper, and the plan says so (short groups still pack)."""
    from rlkit.logprobs import _packed_plan

    def group(n_tokens):
        rows = [Rollout(list(range(10, 30)), list(range(100, 100 + n_tokens)), [0.0] * n_tokens, "length", 0, 0, 0)
                for _ in range(4)]
        return collate(rows, [0.0] * 4, pad_id=0, version=0)

    assert _packed_plan(group(20), tiny.config) is not None
    assert _packed_plan(group(2000), tiny.config) is None
