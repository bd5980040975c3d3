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


@pytest.fixture
def attn_impl(tiny, request):
    """``tiny`` under the attention implementation ``request.param`` for one test."""
    from rlkit import attention

    attention.register()
    tiny.set_attn_implementation(request.param)
    try:
        yield request.param
    finally:
        tiny.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attn_impl", ["sdpa", "rlkit_sdpa"], indirect=True)
def test_shared_prompt_forward_equals_full_forward_with_gradients(tiny, attn_impl):
    """Groups packed under a dense mask (``sdpa``) or end to end with tree attention
    (``rlkit_sdpa``): log-probs and every parameter's gradient equal one full forward per row."""
    from rlkit.logprobs import _packed_plan

    batch = _group_batch()
    plan = _packed_plan(batch, tiny.config)
    assert plan is not None and (plan.tree is not None) == (attn_impl == "rlkit_sdpa")
    if plan.tree is not None:  # no padding: every packed position is a prompt or response token
        assert plan.ids.shape == (1, 6 + 11 + 1 + sum(n - 1 for n in (5, 2, 9, 1, 3, 8, 8, 4, 4, 6)))
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
        assert not getattr(model.model, "_rlkit_no_tree", False)  # the layers did use the layout
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


@pytest.mark.parametrize("attn_impl", ["rlkit_sdpa"], indirect=True)
def test_tree_layout_falls_back_when_the_model_drops_it(tiny, attn_impl):
    """A backbone whose forward does not hand the layout to its attention gets the padded forward
    (same hidden states as the per-row reference) and no tree afterwards."""
    from rlkit.logprobs import response_hidden, response_positions

    class Dropping(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    batch = _group_batch()
    sel, _ = response_positions(batch)
    backbone = tiny.model
    with torch.no_grad():
        want = response_hidden(backbone, batch, sel)
        dropping = Dropping(backbone)
        got = response_hidden(dropping, batch, sel)
    assert getattr(dropping, "_rlkit_no_tree", False) and not getattr(backbone, "_rlkit_no_tree", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tree_layout_blocks_attend_prompt_and_own_tokens_only():
    """Two groups end to end: each response's queries see its prompt and its own earlier tokens;
    prompt chunks see the prompt up to themselves; nothing else."""
    from rlkit.attention import TreeLayout
    from rlkit.logprobs import _tree_layout

    g = torch.Generator().manual_seed(0)
    rows = []
    for gid, (p, lengths) in enumerate([(7, (3, 1, 4)), (2, (5, 2))]):
        prompt = torch.randint(10, 5000, (p,), generator=g).tolist()
        rows += [Rollout(prompt, list(range(100, 100 + n)), [0.0] * n, "length", 0, gid, gid) for n in lengths]
    batch = collate(rows, [0.0] * len(rows), pad_id=0, version=0)
    layout, ids, pos, take = _tree_layout(batch, [tuple(rows[0].prompt_ids), tuple(rows[3].prompt_ids)],
                                          [[0, 1, 2], [3, 4]], [3, 1, 4, 5, 2])
    # Flat order: prompt A (0-6), A's responses (7-8, -, 9-11), prompt B (12-13), B's (14-17, 18).
    assert ids.shape == (19,) and pos[7:9].tolist() == [7, 8] and pos[14:18].tolist() == [2, 3, 4, 5]
    owner = [0] * 7 + [1] * 2 + [3] * 3 + [10] * 2 + [11] * 4 + [12]  # segment of each position
    prompt_of = {1: 0, 3: 0, 11: 10, 12: 10}
    allowed = torch.zeros(19, 19, dtype=torch.bool)
    for q in range(19):
        for k in range(q + 1):
            allowed[q, k] = owner[k] == owner[q] or prompt_of.get(owner[q]) == owner[k]
    seen = torch.zeros(19, 19, dtype=torch.bool)
    q_idx, k_idx = layout.q_index.view(-1, layout.lq), layout.k_index.view(-1, layout.lk)
    for b in range(q_idx.shape[0]):
        for i, q in enumerate(q_idx[b].tolist()):
            for j, k in enumerate(k_idx[b].tolist()):
                if q < 19 and layout.mask[b, 0, i, j]:
                    assert not seen[q, k]
                    seen[q, k] = True
    assert torch.equal(seen, allowed)
    # Response token 0 is scored at its prompt's last position, the others at the row's own.
    assert take.tolist() == [6, 7, 8, 6, 6, 9, 10, 11, 13, 14, 15, 16, 17, 13, 18]
    with pytest.raises(ValueError, match="exactly one block"):
        TreeLayout.build(3, [(torch.tensor([0, 1]), torch.tensor([0, 1]))])


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_tree_attention_kernels_agree_with_gradients(heads):
    """The layout's matmul kernel and SDPA's with the boolean mask give the same outputs and the
    same query/key/value gradients, grouped-query heads included."""
    from rlkit.attention import TreeLayout
    from rlkit.logprobs import _tree_layout

    g = torch.Generator().manual_seed(1)
    rows = []
    for gid, (p, lengths) in enumerate([(9, (4, 1, 6)), (3, (2, 5))]):
        prompt = torch.randint(10, 5000, (p,), generator=g).tolist()
        rows += [Rollout(prompt, list(range(100, 100 + n)), [0.0] * n, "length", 0, gid, gid) for n in lengths]
    batch = collate(rows, [0.0] * len(rows), pad_id=0, version=0)
    layout = _tree_layout(batch, [tuple(rows[0].prompt_ids), tuple(rows[3].prompt_ids)], [[0, 1, 2], [3, 4]],
                          [4, 1, 6, 2, 5])[0]
    h, hk = heads
    n, d = layout.tokens, 16
    q0, k0, v0 = (torch.randn(1, c, n, d, generator=g, dtype=torch.float64) for c in (h, hk, hk))
    grad_out = torch.randn(1, n, h, d, generator=g, dtype=torch.float64)
    results, default = {}, TreeLayout.kernel
    try:
        for kernel in ("sdpa", "matmul"):
            TreeLayout.kernel = kernel
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            out = layout.attend(q, k, v, scaling=0.3)
            out.backward(grad_out)
            results[kernel] = (out.detach(), q.grad, k.grad, v.grad)
    finally:
        TreeLayout.kernel = default
    for want, got in zip(results["sdpa"], results["matmul"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert results["matmul"][0].abs().sum() > 0 and layout.calls == 2
