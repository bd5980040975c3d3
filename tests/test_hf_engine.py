"""The HF rollout engine's own decoding loop: its samples, log-probs and greedy outputs against
transformers' full forward and ``generate`` on the same model."""

from __future__ import annotations

import pytest
import torch

from rlkit import attention
from rlkit.logprobs import support_logprobs
from rlkit.workers.engine import SamplingConfig
from rlkit.workers.hf_engine import HFEngine, append_cache, fill_holes


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from rlkit.assets import tiny_model_dir

    torch.manual_seed(0)
    eng = HFEngine(str(tiny_model_dir(tmp_path_factory.mktemp("m") / "m")), threads=1, batch_size=12)
    with torch.no_grad():  # sharper than the near-uniform init, so top-k/top-p and EOS matter
        eng.model.get_output_embeddings().weight.mul_(40.0)
    return eng


def test_packed_linears_equal_plain_and_follow_weight_changes(engine):
    """Inference runs linears on oneDNN-packed weight copies: equal to F.linear, and rebuilt after
    every weight change (a sync writes the parameters, never the packed copies)."""
    if not engine.packed.enabled:
        pytest.skip("oneDNN packed linear ops are not available in this torch build")
    ids = torch.tensor([_prompts()[1]])

    def packed_and_plain():
        with torch.no_grad():
            packed = engine.model(input_ids=ids).logits
        return packed, engine.model(input_ids=ids).logits.detach()  # grad enabled: plain F.linear

    packed, plain = packed_and_plain()
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    name = next(n for n, _ in engine.model.named_parameters() if n.endswith("0.self_attn.q_proj.weight"))
    old = dict(engine.model.named_parameters())[name].detach().clone()
    try:
        engine.load_weights([(name, old * 3.0)])
        packed2, plain2 = packed_and_plain()
        assert (packed2 - packed).abs().max() > 1e-2  # the new weight reached the packed copy
        torch.testing.assert_close(packed2, plain2, rtol=1e-4, atol=1e-4)
    finally:
        engine.load_weights([(name, old)])


def test_grouped_query_kernel_equals_repeated_heads(engine):
    """On the CPU a grouped-query model decodes with ``rlkit_sdpa`` (SDPA's own GQA): a left-padded
    batch under its mask gives transformers' ``sdpa`` logits (which repeat the KV heads)."""
    assert engine.model.config.num_key_value_heads < engine.model.config.num_attention_heads
    assert engine.model.config._attn_implementation == attention.NAME
    ids, attn = engine._left_pad(_prompts((5, 9, 3)))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)

    def logits():
        with torch.no_grad():
            return engine.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits

    ours = logits()
    engine.model.set_attn_implementation("sdpa")
    try:
        ref = logits()
    finally:
        engine.model.set_attn_implementation(attention.NAME)
    real = attn.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_finished_rows_leave_the_cache_without_moving_the_others(engine):
    """``fill_holes`` keeps rows in place and fills each hole from the tail; the cache then holds
    exactly the kept rows' keys and values and goes on appending."""
    done = torch.tensor([False, True, False, True, False, False, True])
    order = fill_holes(done)
    assert order.tolist() == [0, 4, 2, 5]
    cache = append_cache(engine.model.config, room=3)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(7, 1, 5, 64, generator=g), torch.randn(7, 1, 5, 64, generator=g)
    layer.update(k, v)
    buffer = layer._k
    layer.batch_select_indices(order)
    assert layer._k.data_ptr() == buffer.data_ptr()  # the same buffer: nothing reallocated
    torch.testing.assert_close(layer.keys, k[order])
    torch.testing.assert_close(layer.values, v[order])
    k2, v2 = torch.randn(4, 1, 1, 64, generator=g), torch.randn(4, 1, 1, 64, generator=g)
    keys, values = layer.update(k2, v2)
    torch.testing.assert_close(keys, torch.cat([k[order], k2], dim=2))
    torch.testing.assert_close(values, torch.cat([v[order], v2], dim=2))
    layer.batch_select_indices(torch.tensor([3, 3, 0, 1, 2]))  # any selection, growing included
    torch.testing.assert_close(layer.keys, torch.cat([k[order], k2], dim=2)[[3, 3, 0, 1, 2]])


def _tiny_causal_lm(family: str, **extra):
    """A random two-layer model of ``family`` with grouped-query heads, built in memory."""
    import transformers

    cls, cfg_cls = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                    "mistral": ("MistralForCausalLM", "MistralConfig")}[family]
    cfg = getattr(transformers, cfg_cls)(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         **extra)
    torch.manual_seed(3)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a term left out shows
        for n, t in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                t.add_(0.3 * torch.randn(t.shape))
    attention.install(model)
    return model


@pytest.mark.parametrize("family,extra", [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}),
                                          ("qwen2", {}), ("mistral", {"sliding_window": None})],
                         ids=["llama", "llama-bias", "qwen2", "mistral"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_fused_decode_step_equals_transformers_forward(family, extra, packed):
    """The fused step gives transformers' logits and appends the same keys and values to the cache,
    step after step, over a left-padded batch; and it follows a weight change."""
    from rlkit.workers.fused_decode import FusedDecoder
    from rlkit.workers.hf_engine import _packed_ops_work

    if packed and not _packed_ops_work(4):
        pytest.skip("oneDNN packed linear ops are not available in this torch build")
    model = _tiny_causal_lm(family, **extra)
    fused = FusedDecoder.build(model, rows=4, packed=packed)
    assert fused is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 14), generator=g)
    attn = torch.ones(4, 14, dtype=torch.long)
    attn[1, :3], attn[3, :6] = 0, 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    caches = [append_cache(model.config, 8) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model.model(input_ids=ids[:, :8], attention_mask=attn[:, :8], position_ids=pos[:, :8],
                        past_key_values=c, use_cache=True)
        for t in range(8, 14):
            if t == 11:  # a sync writes a parameter in place: the fused copies must follow
                model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
                model.model.layers[0].self_attn.k_proj.weight.mul_(-1.0)
            ref = model(input_ids=ids[:, t:t + 1], attention_mask=attn[:, :t + 1], position_ids=pos[:, t:t + 1],
                        past_key_values=caches[0], use_cache=True, logits_to_keep=1).logits[:, -1]
            got = fused.step(ids[:, t:t + 1], pos[:, t:t + 1], attn[:, :t + 1], caches[1])
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            for a, b in zip(caches[0].layers, caches[1].layers):
                torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_step_equals_the_repeated_cache(family):
    """Samples that share their prompt's prefill (SharedPrefixKV: one copy of each prompt's keys and
    values) get the logits of the step over n repeated copies, step after step, over left-padded
    prompts of different lengths and with rows leaving the batch."""
    from rlkit.workers.fused_decode import FusedDecoder, SharedPrefixKV

    model = _tiny_causal_lm(family)
    assert model.config.num_attention_heads != model.config.num_key_value_heads
    fused = FusedDecoder.build(model, rows=9, packed=False)
    assert fused is not None
    n, room = 3, 8
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (3, 9), generator=g)
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[1, :4], attn[2, :7] = 0, 0  # prompt lengths 9, 5 and 2
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    repeated, own = append_cache(model.config, room), append_cache(model.config, room)
    with torch.no_grad():
        for c in (repeated, own):
            model.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                        past_key_values=c, use_cache=True)
    kv = SharedPrefixKV(own, attn[:, :-1], n, room)
    repeated.batch_repeat_interleave(n)
    ids, attn, pos = (t.repeat_interleave(n, dim=0) for t in (ids, attn, pos))
    alive = torch.arange(ids.shape[0])
    step_ids, step_pos = ids[:, -1:], pos[:, -1:]
    for step in range(6):
        want = fused.step(step_ids, step_pos, attn, repeated)
        got = fused.step_shared(step_ids, step_pos, alive, kv)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        nxt = want.argmax(-1)
        attn = torch.cat([attn, torch.ones(attn.shape[0], 1, dtype=attn.dtype)], dim=1)
        step_ids, step_pos = nxt[:, None], step_pos + 1
        if step in (1, 3):  # rows leave: the first, a middle one and the last of those left
            done = torch.zeros(alive.numel(), dtype=torch.bool)
            done[[0, alive.numel() // 2, alive.numel() - 1]] = True
            keep = fill_holes(done)
            repeated.batch_select_indices(keep)
            alive = alive[keep]
            attn, step_ids, step_pos = attn[keep], step_ids[keep], step_pos[keep]
    assert alive.numel() == 3


def test_fused_decode_only_where_its_probe_agrees(engine):
    """Other layer arithmetic (a GELU MLP, a sliding window) keeps transformers' forward; the probe rejects a fused
    step that computes something else; and the engine's samples are the same either way."""
    from rlkit.workers.fused_decode import FusedDecoder

    assert FusedDecoder.build(_tiny_causal_lm("llama", hidden_act="gelu"), rows=4, packed=False) is None
    assert FusedDecoder.build(_tiny_causal_lm("mistral", sliding_window=64), rows=4, packed=False) is None
    fused = FusedDecoder.build(_tiny_causal_lm("llama"), rows=4, packed=False)
    assert fused.agrees()
    fused.layers[0] = fused.layers[0][:-1] + (fused.layers[0][-1] * 1.01,)  # attention scale off by 1 %
    assert not fused.agrees()

    assert engine.fused is not None
    sampling = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=12)
    with_fused = engine.generate(_prompts(), 3, sampling, seed=4)
    kept, engine.fused = engine.fused, None
    try:
        plain = engine.generate(_prompts(), 3, sampling, seed=4)
    finally:
        engine.fused = kept
    assert [g.completion_ids for g in with_fused] == [g.completion_ids for g in plain]
    for a, b in zip(with_fused, plain):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def _prompts(lengths=(5, 9, 3)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 5000, (n,), generator=g).tolist() for n in lengths]


def test_bf16_matmuls_keep_fp32_weights_and_head_and_sample_a_close_distribution(engine):
    """``rollout.matmul_dtype: bfloat16``: the decoder's linears (the fused step's concatenations
    included) multiply bf16 copies, the LM head and the parameters stay fp32, a weight load reaches
    the bf16 copies, and sampled log-probs stay within bf16 rounding of the fp32 model's."""
    from rlkit.workers.hf_engine import _packed_ops_work

    if not engine.packed.enabled or not _packed_ops_work(4, torch.bfloat16):
        pytest.skip("oneDNN bf16 packed linear ops are not available on this CPU / torch build")
    bf = HFEngine(str(engine.tokenizer.name_or_path), threads=1, batch_size=12, matmul_dtype="bfloat16")
    bf.load_weights(list(engine.named_weights().items()))  # the fixture's sharpened weights
    assert bf.fused is not None and all(p.dtype == torch.float32 for p in bf.model.parameters())
    sampling = SamplingConfig(temperature=8.0, max_new_tokens=12)  # spread out (the fixture sharpens)
    prompts = _prompts()
    gens = bf.generate(prompts, 3, sampling, seed=7)
    layer = bf.model.model.layers[0]
    assert layer.self_attn.o_proj._rlkit_packed.dtype == torch.bfloat16
    assert bf.fused.layers[0][1].weight.dtype == torch.bfloat16  # q/k/v concatenation
    assert bf.model.lm_head._rlkit_packed.dtype == torch.float32
    gaps = []
    for g in gens:
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        logits = engine.model(input_ids=ids).logits[0, len(g.prompt_ids) - 1: -1].detach()  # plain fp32
        ref = support_logprobs(logits, sampling).gather(-1, ids[0, len(g.prompt_ids):, None]).squeeze(-1)
        gaps.append((torch.tensor(g.logprobs) - ref).abs())
    gap = torch.cat(gaps)
    assert 0 < gap.max() < 0.1, gap.max()  # bf16 products were used, and stay close
    name, ids = "model.layers.0.self_attn.q_proj.weight", torch.tensor([prompts[1]])
    with torch.no_grad():
        before = bf.model(input_ids=ids).logits
        bf.load_weights([(name, engine.named_weights()[name] * 3.0)])
        after = bf.model(input_ids=ids).logits
        assert (after - before).abs().max() > 1e-2  # the new weight reached the bf16 copy


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.7, max_new_tokens=12),
                                      SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=12),
                                      SamplingConfig(temperature=1.3, top_p=0.8, max_new_tokens=12)],
                         ids=["temp", "topk", "topp"])
def test_sampled_logprobs_are_the_processed_distribution(engine, sampling):
    prompts = _prompts()
    gens = engine.generate(prompts, 4, sampling, seed=7)
    assert len(gens) == 12 and [g.prompt_ids for g in gens] == [p for p in prompts for _ in range(4)]
    for g in gens:
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        # With gradients enabled the model runs plain F.linear (not the engine's packed weights).
        logits = engine.model(input_ids=ids).logits[0, len(g.prompt_ids) - 1: -1].detach()
        ref = support_logprobs(logits, sampling).gather(-1, ids[0, len(g.prompt_ids):, None]).squeeze(-1)
        assert torch.isfinite(ref).all(), "a sampled token lies outside the sampler's support"
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=2e-5, rtol=0)
        stopped = g.completion_ids[-1] == engine.eos_id
        assert g.finish_reason == ("stop" if stopped else "length")
        assert engine.eos_id not in g.completion_ids[:-1]
        assert stopped or len(g.completion_ids) == sampling.max_new_tokens


def test_samples_are_reproducible_per_seed_and_cover_the_distribution(engine):
    # A high temperature: the sharpened tiny model is near-deterministic at T = 1.
    sampling = SamplingConfig(temperature=8.0, max_new_tokens=6)
    prompts = _prompts()
    a = engine.generate(prompts, 3, sampling, seed=11)
    assert a == engine.generate(prompts, 3, sampling, seed=11)
    assert [g.completion_ids for g in a] != [g.completion_ids for g in engine.generate(prompts, 3, sampling, seed=12)]
    # First-token frequencies over 2000 draws follow the model's next-token distribution.
    prompt = _prompts((6,))[0]
    first = torch.tensor([g.completion_ids[0] for g in engine.generate(
        [prompt], 2000, SamplingConfig(temperature=8.0, max_new_tokens=1), seed=3)])
    p = torch.softmax(engine.model(input_ids=torch.tensor([prompt])).logits[0, -1].detach() / 8.0, -1)
    top = torch.topk(p, 5).indices
    assert p[top].sum() > 0.2 and p[top[0]] < 0.9  # a spread-out distribution, so the check bites
    freq = torch.stack([(first == t).float().mean() for t in top])
    # 2000 draws: a frequency's standard error is at most sqrt(0.25 / 2000) ~ 0.011; 4 sigma.
    assert (freq - p[top]).abs().max() < 0.045, (freq, p[top])


def test_greedy_equals_transformers_generate(engine):
    from transformers import GenerationConfig

    prompts = _prompts((5, 9, 3, 7))
    ours = engine.greedy(prompts, 10)
    for prompt, g in zip(prompts, ours):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=engine.eos_id,
                               pad_token_id=engine.pad_id)
        with torch.no_grad():
            ref = engine.model.generate(input_ids=torch.tensor([prompt]), generation_config=cfg)[0, len(prompt):].tolist()
        if engine.eos_id in ref:
            ref = ref[: ref.index(engine.eos_id) + 1]
        assert g.completion_ids == ref


def test_two_level_draw_matches_the_distribution_and_never_leaves_its_support():
    from rlkit.workers.hf_engine import draw

    V = 1000  # not a multiple of the block: the last block is padded with zero mass
    support = torch.tensor([3, 255, 256, 700, 999])
    probs = torch.tensor([0.05, 0.3, 0.15, 0.1, 0.4])
    lp = torch.full((20000, V), float("-inf"))
    lp[:, support] = probs.log()
    got = draw(lp, torch.Generator().manual_seed(0))
    assert torch.isin(got, support).all()
    freq = torch.stack([(got == t).float().mean() for t in support])
    # 20,000 draws: standard error at most sqrt(0.25 / 20000) ~ 0.0035; 4 sigma.
    assert (freq - probs).abs().max() < 0.014, freq
    # The decode loop's reused buffer (more rows than this step's, garbage in the padded tail)
    # draws the same tokens as a fresh one.
    buffer = torch.full((20003, 1024), float("nan"))
    assert torch.equal(draw(lp, torch.Generator().manual_seed(0), out=buffer), got)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_make_engine_resolves_auto_dtype_and_device_here(engine):
    from rlkit.workers.rollout import make_engine

    # No GPU visible: "auto" is float32 on the CPU (bf16 only on a GPU), unless overridden.
    eng = make_engine("hf", str(engine.tokenizer.name_or_path), dtype="auto", threads=1, seed=0, max_model_len=64)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert eng.device.type == want
    assert next(eng.model.parameters()).dtype == (torch.bfloat16 if want == "cuda" else torch.float32)
    forced = make_engine("hf", str(engine.tokenizer.name_or_path), dtype="bfloat16", threads=1, seed=0,
                         max_model_len=64)
    assert next(forced.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size: 2 needs rollout.engine: vllm"):
        make_engine("hf", str(engine.tokenizer.name_or_path), dtype="auto", threads=1, seed=0, max_model_len=64,
                    tensor_parallel_size=2)


@pytest.mark.gpu
@cuda_only
def test_cuda_engine_samples_and_scores_like_the_cpu_engine(engine):
    """The same weights on CUDA (fp32): same greedy tokens, log-probs within float tolerance, and
    the sampled log-probs are the processed distribution of its own forward."""
    cuda = HFEngine(str(engine.tokenizer.name_or_path), threads=1, batch_size=12, device="cuda")
    cuda.load_weights((n, t) for n, t in engine.model.state_dict().items())
    assert cuda.device.type == "cuda" and not cuda.packed.enabled
    prompts = _prompts()
    assert [g.completion_ids for g in cuda.greedy(prompts, 10)] == [g.completion_ids for g in engine.greedy(prompts, 10)]
    sampling = SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=10)
    gens = cuda.generate(prompts, 2, sampling, seed=3)
    scored = cuda.score([g.prompt_ids for g in gens], [g.completion_ids for g in gens], sampling)
    cpu_scored = engine.score([g.prompt_ids for g in gens], [g.completion_ids for g in gens], sampling)
    for g, s, c in zip(gens, scored, cpu_scored):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(s), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(s), torch.tensor(c), atol=1e-4, rtol=0)


@pytest.mark.parametrize("on_swap", ["recompute", "keep"])
def test_weights_swapped_mid_generation_record_per_token_versions(engine, on_swap):
    """Partial rollouts: a load from another thread lands between two decode steps (here exactly
    before step 4, by the engine's test rendezvous). Tokens 0-3 record version v and carry the old
    weights' log-probs; tokens from step 4 on record v + 1. With ``recompute`` the prefix's KV cache
    is rebuilt, so every later token's log-prob is the new weights' teacher-forced one; with
    ``keep`` the old cache stays (its later log-probs match neither model's full forward)."""
    import threading

    sampling = SamplingConfig(temperature=8.0, max_new_tokens=10)  # spread out (the fixture sharpens)
    prompts = _prompts()
    params = dict(engine.model.named_parameters())
    old = {n: t.detach().clone() for n, t in params.items()}
    g = torch.Generator().manual_seed(5)
    new = {n: t * (1 + 0.2 * torch.randn(t.shape, generator=g)) for n, t in old.items()}
    v = engine.policy_version
    engine.on_swap = on_swap  # the same decode path for both (recompute: one cache per row)
    plain = engine.generate(prompts, 2, sampling, seed=9)
    assert all(x.versions == [v] * len(x.completion_ids) for x in plain)
    engine.hold_after(4)
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(gens=engine.generate(prompts, 2, sampling, seed=9)))
    th.start()
    try:
        with engine.swapping(v + 1):
            engine.load_weights(new.items())
        th.join()
        gens = out["gens"]
        assert engine.policy_version == v + 1
        swapped = [x for x in gens if len(x.completion_ids) > 4]
        assert len(swapped) >= 4, "too few rows lived past the swap for the test to bite"
        for x, p in zip(gens, plain):
            k = len(x.completion_ids)
            assert x.versions == [v] * min(k, 4) + [v + 1] * max(k - 4, 0)
            # The same seed and the same weights up to the swap: the same first four tokens.
            assert x.completion_ids[:4] == p.completion_ids[:4] and x.logprobs[:4] == p.logprobs[:4]
        after = engine.score([x.prompt_ids for x in swapped], [x.completion_ids for x in swapped], sampling)
        with engine.swapping(v):
            engine.load_weights(old.items())
        before = engine.score([x.prompt_ids for x in swapped], [x.completion_ids for x in swapped], sampling)
        gap = max(abs(a - b) for s, t in zip(after, before) for a, b in zip(s[4:], t[4:]))
        assert gap > 0.05, "the two weight versions must give different log-probs"
        for x, a, b in zip(swapped, after, before):
            torch.testing.assert_close(torch.tensor(x.logprobs[:4]), torch.tensor(b[:4]), atol=2e-5, rtol=0)
            if on_swap == "recompute":
                torch.testing.assert_close(torch.tensor(x.logprobs[4:]), torch.tensor(a[4:]), atol=2e-5, rtol=0)
        if on_swap == "keep":
            err = max(abs(lp - a) for x, s in zip(swapped, after) for lp, a in zip(x.logprobs[5:], s[5:]))
            assert err > 1e-3, "with the old KV cache kept, later tokens are not the new model's full forward"
    finally:
        th.join()
        engine.on_swap = "keep"
        with engine.swapping(v):
            engine.load_weights(old.items())
