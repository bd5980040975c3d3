"""Before and after of each speed lever of the GRPO step, each measured A/B in one process.

    .venv/bin/python bench/levers.py             # SmolLM2-135M, 8 prompts × 8 samples × 48 tokens, 2 threads
    .venv/bin/python bench/levers.py --quick     # tiny model, seconds

The shape is the e2e workload's (bench/e2e_bench.py): 8 chat-templated arithmetic prompts, 8
samples each at temperature 1, up to 48 new tokens, fp32; the learner takes one optimizer step
over the 64 rows in four micro-batches of 16 (lr 5e-6, β = 0). Before and after alternate in the
same process, ``--repeats`` times, so both see the same machine state.

* ``engine_gqa``: ``HFEngine.generate`` (decode steps through transformers' forward) with transformers' ``sdpa`` attention (KV heads repeated
  under a mask) and with ``rlkit_sdpa`` (SDPA's own grouped-query heads, rlkit/attention.py); the
  same seed on both sides, so the same tokens.
* ``engine_fused``: ``HFEngine.generate`` with every decode step through transformers' forward
  (``rlkit_sdpa``) and through the fused Llama-family step (rlkit/workers/fused_decode.py: q/k/v and
  gate/up in one matmul each, RoPE on q and k at once, one-op RMSNorm); the same seed, so the same
  tokens.
* ``cache_compaction``: the KV-cache work when rows finish, replayed on a cache of the engine's
  shape with the finishing steps of a real generation: the previous gather of every kept row's
  whole buffer against rows kept in place with holes filled from the tail (``fill_holes``).
* ``sampling_draw``: ``HFEngine.generate`` with the earlier sampling tail (logits divided by a
  temperature of 1, block masses summed over a float64 copy of the [rows, vocabulary]
  probabilities, a fresh vocabulary-sized allocation per step) and with the current one (no
  division at temperature 1, fp32 block sums into a buffer the decode loop keeps).
* ``shared_prefix``: ``HFEngine.generate`` with the prompt's KV cache repeated for each of its 8
  samples and with the samples sharing it (``SharedPrefixKV``, rlkit/workers/fused_decode.py).
* ``bf16_matmul``: ``HFEngine.generate`` with the decoder linears multiplying in fp32 and in bf16
  (``rollout.matmul_dtype: bfloat16``; LM head, attention and sampling in fp32). Not the same
  arithmetic: the tokens differ, so the row's tokens generated are given beside it.
* ``learner_tree``: one optimizer step of the learner (DeepSpeed, 2 threads) on a batch the engine
  generated, its groups packed under a dense mask (``sdpa``) or end to end with tree attention
  (``rlkit_sdpa``).
* ``tree_kernel``: the same step with the tree-attention blocks attended by SDPA's kernel under the
  boolean mask and by two batched matmuls around a softmax (``TreeLayout.kernel``).
* ``logits_buffer``: the same step with each LM-head chunk's logits in a fresh allocation and in
  the buffer kept from chunk to chunk (rlkit/kl_fused.py ``_logits_buffer``).
* ``one_rank_reduce``: the DeepSpeed step of that update (ZeRO-1 at one rank), with DeepSpeed's
  gradient all-reduce (flatten, divide by 1, one-member all-reduce, copy back) and with it skipped
  (rlkit/workers/ds_engine.py ``one_rank_reduce``).
* ``freed_memory_generate``, ``freed_memory_learn``: ``HFEngine.generate`` and one learner update
  in fresh processes with glibc malloc's defaults (blocks above the mmap threshold, at most 32
  MiB, mapped and unmapped per use, the heap trimmed) and with freed memory held in the heap
  (``rollout.hold_freed_memory``, ``learner.hold_freed_memory``: ``rlkit.workers.hold_freed_memory``,
  set before the engine loads); processes alternate, each times three generations and two
  updates after a warm-up one of each, with their minor page faults. Every other row runs in a
  process that holds freed memory, as the workers do.

Writes ``bench/out/levers.json``; ``bench/report.py`` renders it in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from engine_bench import prompt_ids  # noqa: E402


def _alternate(before, after, repeats: int) -> dict[str, Any]:
    """Seconds of ``before(i)`` and ``after(i)``, alternating, after one warm-up call of each."""
    before(-1), after(-1)
    b, a = [], []
    for i in range(repeats):
        b.append(before(i))
        a.append(after(i))
    sb, sa = common.summary(b), common.summary(a)
    return {"before_s": sb, "after_s": sa, "after_over_before": common.ratio_summary(sa, sb)}


def engine_gqa(engine, prompts, sampling, repeats: int) -> dict[str, Any]:
    from rlkit import attention

    def run(impl: str):
        def call(i: int) -> float:
            engine.model.set_attn_implementation(impl)
            t = time.perf_counter()
            engine.generate(prompts, 8, sampling, seed=100 + i)
            return time.perf_counter() - t
        return call

    fused, engine.fused = engine.fused, None  # decode steps through the model's attention
    try:
        return _alternate(run("sdpa"), run(attention.NAME), repeats)
    finally:
        engine.model.set_attn_implementation(attention.NAME)
        engine.fused = fused


def engine_fused(engine, prompts, sampling, repeats: int) -> dict[str, Any]:
    """``generate`` with each decode step through transformers' forward, and through the fused
    Llama-family step (rlkit/workers/fused_decode.py); prefill and sampling are the same."""
    fused = engine.fused
    if fused is None:
        raise RuntimeError("the fused decode step is not available for this model")

    def run(step):
        def call(i: int) -> float:
            engine.fused = step
            t = time.perf_counter()
            engine.generate(prompts, 8, sampling, seed=100 + i)
            return time.perf_counter() - t
        return call

    try:
        return _alternate(run(None), run(fused), repeats)
    finally:
        engine.fused = fused


def _timed_generate(engine, prompts, sampling, setup):
    def call(i: int) -> float:
        setup()
        t = time.perf_counter()
        engine.generate(prompts, 8, sampling, seed=100 + i)
        return time.perf_counter() - t
    return call


def _draw_before(lp_R_V, rng, out=None):
    """The draw before the change: float64 block sums over a fresh [R, V] allocation (``out`` unused)."""
    import torch

    from rlkit.workers.hf_engine import BLOCK, pick_in_blocks

    R, V = lp_R_V.shape
    p = lp_R_V.exp()
    if V % BLOCK:
        p = torch.nn.functional.pad(p, (0, -V % BLOCK))
    p_R_K_B = p.view(R, -1, BLOCK)
    return pick_in_blocks(p_R_K_B, p_R_K_B.sum(-1, dtype=torch.float64).cumsum(-1), rng)


def _support_before(logits_N_V, sampling):
    """support_logprobs before the change at temperature 1 with no truncation: always divided."""
    import torch

    return torch.log_softmax(logits_N_V.float() / sampling.temperature, dim=-1)


def sampling_draw(engine, prompts, sampling, repeats: int) -> dict[str, Any]:
    from rlkit.workers import hf_engine

    now = (hf_engine.draw, hf_engine.support_logprobs)
    if sampling.truncates:
        raise RuntimeError("sampling_draw compares the temperature-only sampler")

    def use(draw, support):
        def setup():
            hf_engine.draw, hf_engine.support_logprobs = draw, support
        return setup

    try:
        return _alternate(_timed_generate(engine, prompts, sampling, use(_draw_before, _support_before)),
                          _timed_generate(engine, prompts, sampling, use(*now)), repeats)
    finally:
        hf_engine.draw, hf_engine.support_logprobs = now


def shared_prefix(engine, prompts, sampling, repeats: int) -> dict[str, Any]:
    if engine.fused is None:
        raise RuntimeError("the fused decode step is not available for this model")

    def share(on: bool):
        return lambda: setattr(engine, "share_prefix", on)

    try:
        return _alternate(_timed_generate(engine, prompts, sampling, share(False)),
                          _timed_generate(engine, prompts, sampling, share(True)), repeats)
    finally:
        engine.share_prefix = True


def bf16_matmul(engine, prompts, sampling, repeats: int) -> dict[str, Any]:
    import torch

    tokens = {}

    def mm(dtype):
        def call(i: int) -> float:
            engine.set_matmul_dtype(dtype)
            t = time.perf_counter()
            gens = engine.generate(prompts, 8, sampling, seed=100 + i)
            seconds = time.perf_counter() - t
            tokens.setdefault(str(dtype).removeprefix("torch."), []).append(sum(len(g.completion_ids) for g in gens))
            return seconds
        return call

    try:
        out = _alternate(mm(torch.float32), mm(torch.bfloat16), repeats)
    finally:
        engine.set_matmul_dtype(torch.float32)
    out["generated_tokens"] = {k: v[1:] for k, v in tokens.items()}  # without the warm-up call
    return out


def _gather_all(layer, keep) -> None:
    """The compaction before: every kept row's whole buffer gathered into a new one."""
    layer._k, layer._v = layer._k[keep], layer._v[keep]
    n = layer.keys.shape[-2]
    layer.keys, layer.values = layer._k[:, :, :n], layer._v[:, :, :n]


def cache_compaction(engine, gens, prompt_len: int, max_new: int, repeats: int) -> dict[str, Any]:
    """Replays the generation's finishing steps: at step s the rows whose completion has s + 1
    tokens leave. Only the compaction calls are timed."""
    import torch

    from rlkit.workers.hf_engine import append_cache, fill_holes

    cfg = engine.model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    finish = [len(g.completion_ids) - 1 for g in gens]

    def run(tail: bool):
        def call(i: int) -> float:
            cache = append_cache(cfg, max_new + 1)
            g = torch.Generator().manual_seed(0)
            rows = len(finish)
            for layer in cache.layers:
                layer.update(torch.randn(rows, heads, prompt_len, dim, generator=g),
                             torch.randn(rows, heads, prompt_len, dim, generator=g))
            alive = torch.tensor(finish)
            spent = 0.0
            for step in range(max_new):
                for layer in cache.layers:
                    layer.update(torch.zeros(len(alive), heads, 1, dim), torch.zeros(len(alive), heads, 1, dim))
                done = alive == step
                if not bool(done.any()) or bool(done.all()):
                    if bool(done.all()):
                        break
                    continue
                t = time.perf_counter()
                keep = fill_holes(done) if tail else (~done).nonzero().squeeze(-1)
                for layer in cache.layers:
                    layer.batch_select_indices(keep) if tail else _gather_all(layer, keep)
                spent += time.perf_counter() - t
                alive = alive[keep]
            return spent
        return call

    out = _alternate(run(False), run(True), repeats)
    out["compactions"] = len({f for f in finish if f < max_new - 1})  # steps where some row finished early
    return out


def _learner(model_path: Path, gens, threads: int, hold_freed_memory: bool = True):
    """A one-rank learner (DeepSpeed) of the e2e configuration, the batch of ``gens`` and advantages."""
    import torch

    from rlkit.config import load_config
    from rlkit.types import Rollout, collate
    from rlkit.workers.learner import LearnerRank, LearnerSpec

    rolls = [Rollout(g.prompt_ids, g.completion_ids, g.logprobs, g.finish_reason, 0, i // 8, i // 8)
             for i, g in enumerate(gens)]
    rewards = torch.randint(0, 2, (len(rolls),), generator=torch.Generator().manual_seed(0)).float()
    cfg = load_config(common.ROOT / "configs" / "grpo_demo.yaml", [
        f"model.path={model_path}", f"learner.threads={threads}", "learner.num_ranks=1",
        f"learner.micro_batch_size={max(1, len(rolls) // 4)}", "learner.lr=5.0e-6", "learner.lr_schedule=constant",
        "rollout.temperature=1.0", f"learner.hold_freed_memory={str(hold_freed_memory).lower()}"])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rank = LearnerRank(0, 1, "127.0.0.1", port, LearnerSpec.from_config(cfg, str(model_path)))
    batch = collate(rolls, rewards.tolist(), 0, 0)
    r = rewards.view(-1, 8)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1) * batch.response_mask_B_T
    return rank, batch, adv, cfg.learner.micro_batch_size


def _train_seconds(rank, batch, adv, setup) -> float:
    setup()
    rank.set_batch(batch)
    t = time.perf_counter()
    rank.train(adv, {})
    return time.perf_counter() - t


def learner_tree(learner, repeats: int) -> dict[str, Any]:
    from rlkit import attention

    rank, batch, adv, mb = learner
    model = rank.policy

    def run(impl: str):
        return lambda i: _train_seconds(rank, batch, adv, lambda: model.set_attn_implementation(impl))

    out = _alternate(run("sdpa"), run(attention.NAME), repeats)
    out["rows"], out["micro_batch"] = batch.size, mb
    return out


def tree_kernel(learner, repeats: int) -> dict[str, Any]:
    from rlkit import attention

    rank, batch, adv, mb = learner
    rank.policy.set_attn_implementation(attention.NAME)
    default = attention.TreeLayout.kernel

    def run(kernel: str):
        def setup():
            attention.TreeLayout.kernel = kernel
        return lambda i: _train_seconds(rank, batch, adv, setup)

    try:
        out = _alternate(run("sdpa"), run("matmul"), repeats)
    finally:
        attention.TreeLayout.kernel = default
    out["rows"], out["micro_batch"] = batch.size, mb
    return out


def logits_buffer(learner, repeats: int) -> dict[str, Any]:
    from rlkit import kl_fused

    rank, batch, adv, mb = learner
    kept = kl_fused._logits_buffer

    def run(buffer):
        def setup():
            kl_fused._logits_buffer = buffer
            kl_fused._SCRATCH.clear()
        return lambda i: _train_seconds(rank, batch, adv, setup)

    try:
        return _alternate(run(lambda *a: None), run(kept), repeats)
    finally:
        kl_fused._logits_buffer = kept


def one_rank_reduce(learner, repeats: int) -> dict[str, Any]:
    """Seconds of the DeepSpeed step of an update (where ZeRO-1 reduces the gradients)."""
    rank, batch, adv, mb = learner
    opt, engine = rank.engine.optimizer, rank.engine
    skip = opt.__dict__.get("allreduce_and_copy")
    if skip is None:
        raise RuntimeError("the learner's ZeRO optimizer has no one-rank reduce (rlkit.workers.ds_engine.one_rank_reduce)")
    seconds: list[float] = []
    deepspeed_step = engine.step

    def timed_step(*args, **kwargs):
        t = time.perf_counter()
        out = deepspeed_step(*args, **kwargs)
        seconds.append(time.perf_counter() - t)
        return out

    def run(own: bool):
        def setup():
            if own:
                opt.allreduce_and_copy = skip
            else:
                opt.__dict__.pop("allreduce_and_copy", None)

        def call(i: int) -> float:
            _train_seconds(rank, batch, adv, setup)
            return seconds[-1]
        return call

    engine.step = timed_step
    try:
        out = _alternate(run(False), run(True), repeats)
    finally:
        engine.step = deepspeed_step
        opt.allreduce_and_copy = skip
    out["rows"], out["micro_batch"] = batch.size, mb
    return out


def freed_memory(args, repeats: int) -> dict[str, dict[str, Any]]:
    """Generation and learner-update seconds in fresh processes without and with freed memory held,
    alternating processes: ``{"freed_memory_generate": row, "freed_memory_learn": row}``."""
    secs = {k: {False: [], True: []} for k in ("generate", "learn")}
    faults = {k: {False: [], True: []} for k in ("generate", "learn")}
    for _ in range(repeats):
        for hold in (False, True):
            cmd = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                   "--new-tokens", str(args.new_tokens), "--child-hold", str(int(hold))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"freed_memory child (hold={hold}) failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            for k in secs:
                secs[k][hold] += rec[k]["seconds"]
                faults[k][hold] += rec[k]["faults"]
    rows = {}
    for k in secs:
        sb, sa = common.summary(secs[k][False]), common.summary(secs[k][True])
        rows[f"freed_memory_{k}"] = {"before_s": sb, "after_s": sa, "after_over_before": common.ratio_summary(sa, sb),
                                     "faults_before": common.summary(faults[k][False]),
                                     "faults_after": common.summary(faults[k][True])}
    return rows


def _timed_faults(fn) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _freed_memory_child(args, prompts, engine, sampling) -> int:
    """One process of ``freed_memory`` (its heap policy set before the engine loaded): three
    generations and two learner updates, each after a warm-up one, with their minor faults."""
    rec = {"generate": {"seconds": [], "faults": []}, "learn": {"seconds": [], "faults": []}}
    for seed in range(4):
        s, f = _timed_faults(lambda: engine.generate(prompts, 8, sampling, seed=seed))
        if seed:
            rec["generate"]["seconds"].append(s)
            rec["generate"]["faults"].append(f)
    gens = engine.generate(prompts, 8, sampling, seed=0)
    del engine
    rank, batch, adv, _ = _learner(common.model_dir(args.model), gens, args.threads, bool(args.child_hold))
    for i in range(3):
        s, f = _timed_faults(lambda: _train_seconds(rank, batch, adv, lambda: None))
        if i:
            rec["learn"]["seconds"].append(s)
            rec["learn"]["faults"].append(f)
    print(json.dumps(rec))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a HF model folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, 8 tokens")
    ap.add_argument("--out", default=str(common.OUT_DIR))
    ap.add_argument("--child-hold", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.repeats, args.new_tokens = "tiny", 1, 8
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from rlkit.workers import hold_freed_memory
    from rlkit.workers.engine import SamplingConfig
    from rlkit.workers.hf_engine import HFEngine

    if args.child_hold != 0:  # the workers' heap policy, but on the freed_memory rows' before side
        hold_freed_memory()
    torch.set_num_threads(args.threads)
    path = common.model_dir(args.model)
    prompts = prompt_ids(path, 8)
    engine = HFEngine(str(path), threads=args.threads, batch_size=64)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    if args.child_hold is not None:
        return _freed_memory_child(args, prompts, engine, sampling)
    gens = engine.generate(prompts, 8, sampling, seed=0)
    levers = {"engine_gqa": engine_gqa(engine, prompts, sampling, args.repeats),
              "engine_fused": engine_fused(engine, prompts, sampling, args.repeats),
              "cache_compaction": cache_compaction(engine, gens, max(len(p) for p in prompts), args.new_tokens,
                                                   args.repeats),
              "sampling_draw": sampling_draw(engine, prompts, sampling, args.repeats),
              "shared_prefix": shared_prefix(engine, prompts, sampling, args.repeats),
              "bf16_matmul": bf16_matmul(engine, prompts, sampling, args.repeats)}
    del engine
    learner = _learner(path, gens, args.threads)
    levers["learner_tree"] = learner_tree(learner, args.repeats)
    levers["tree_kernel"] = tree_kernel(learner, args.repeats)
    levers["logits_buffer"] = logits_buffer(learner, args.repeats)
    levers["one_rank_reduce"] = one_rank_reduce(learner, args.repeats)
    del learner
    levers.update(freed_memory(args, args.repeats))
    for name, r in levers.items():
        print(f"{name}: before {common.fmt(r['before_s'])} s, after {common.fmt(r['after_s'])} s, "
              f"after/before {common.fmt(r['after_over_before'], '.3f')}")
    workload = {"model": args.model, "prompts": 8, "samples": 8, "new_tokens": args.new_tokens,
                "generated_tokens": sum(len(g.completion_ids) for g in gens)}
    common.write_result("levers", {"workload": workload, "levers": levers}, args, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
