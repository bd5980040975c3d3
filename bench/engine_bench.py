"""Generation throughput of the two rollout engines behind the same contract: vLLM vs rlkit's HF engine.

    .venv-vllm/bin/python bench/engine_bench.py                    # SmolLM2-135M, 8 prompts × 8 × 48
    .venv-vllm/bin/python bench/engine_bench.py --model tiny       # tiny random Llama, seconds
    .venv-vllm/bin/python bench/engine_bench.py --engines hf       # HF only (works in .venv too)

The demo shape of a GRPO step: 8 chat-templated arithmetic prompts, 8 samples each, up to 48 new
tokens, temperature 1, fp32. Each engine runs in a fresh subprocess with the same thread count
(``--threads``, default 2: the whole machine), one after the other, so neither competes with
the other for cores or memory. Per engine: start-up seconds (construction, model load, vLLM's
KV-cache set-up), one short warm-up call, ``--repeats`` timed ``generate`` calls, then the time
to load the model's full state back into the running engine in buckets (a weight sync). Tokens/s
counts generated tokens only (EOS included, no padding), so the two engines are compared on
the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}."
             for a, op, b in [(12, "+", 7), (45, "-", 18), (3, "+", 99), (61, "-", 70),
                              (8, "+", 8), (27, "+", 35), (90, "-", 9), (5, "-", 14)]]


def model_dir(which: str) -> Path:
    from rlkit import assets

    if which == "smollm2":
        return assets.smollm2_dir()
    if which == "tiny":
        return assets.tiny_model_dir(assets.cache_root() / "models" / "bench-tiny-llama")
    return Path(which)


def prompt_ids(path: Path, n_prompts: int) -> list[list[int]]:
    from rlkit.assets import load_tokenizer

    tok = load_tokenizer(path)
    out = []
    for q in (QUESTIONS * ((n_prompts + len(QUESTIONS) - 1) // len(QUESTIONS)))[:n_prompts]:
        msgs = [{"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def time_sync(engine, path: Path, bucket_mb: int) -> float:
    """Seconds to load the model's own full state into the running engine, in buckets of ``bucket_mb``."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    buckets, current, size = [], [], 0
    for name, tensor in state.items():
        current.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_mb * 2**20:
            buckets.append(current)
            current, size = [], 0
    buckets += [current] if current else []
    t0 = time.perf_counter()
    for bucket in buckets:
        engine.load_weights(bucket)
    if hasattr(engine, "finish_weight_update"):
        engine.finish_weight_update()
    return time.perf_counter() - t0


def run_child(args: argparse.Namespace) -> dict:
    """Time one engine in this process; return one result row."""
    import torch

    from rlkit.workers.engine import SamplingConfig

    torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    prompts = prompt_ids(path, args.prompts)
    t0 = time.perf_counter()
    if args.child == "vllm":
        from rlkit.workers.vllm_engine import VLLMEngine

        engine = VLLMEngine(path, dtype=args.dtype, threads=args.threads, seed=0,
                            max_model_len=max(len(p) for p in prompts) + args.new_tokens + 8,
                            multiprocess=args.multiprocess)
    else:
        from rlkit.workers.hf_engine import HFEngine

        engine = HFEngine(str(path), dtype=args.dtype, threads=args.threads)
    start_s = time.perf_counter() - t0
    engine.generate(prompts[:1], 1, SamplingConfig(max_new_tokens=4), seed=0)  # warm-up
    runs = []
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    for r in range(args.repeats):
        t0 = time.perf_counter()
        gens = engine.generate(prompts, args.samples, sampling, seed=100 + r)
        seconds = time.perf_counter() - t0
        tokens = sum(len(g.completion_ids) for g in gens)
        runs.append({"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)})
    sync_s = time_sync(engine, path, args.bucket_mb)
    engine.close()
    name = args.child + ("-mp" if args.child == "vllm" and args.multiprocess else "")
    return {"engine": name, "model": args.model, "dtype": args.dtype, "threads": args.threads,
            "shape": f"{args.prompts}x{args.samples}x{args.new_tokens}", "start_s": round(start_s, 1),
            "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1), "runs": runs,
            "sync_s": round(sync_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="vllm,hf", help="comma list of vllm, hf (run in this order)")
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a HF model folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bucket-mb", type=int, default=64, help="weight-sync bucket size for the sync timing")
    ap.add_argument("--multiprocess", action="store_true", help="vLLM engine core in its own process")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    model_dir(args.model)  # build or fetch the folder once, before any timing
    rows = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine] + [a for a in sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"engine {engine} failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'engine':8} {'start s':>8} {'sync s':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for row in rows:
        for run in row["runs"]:
            print(f"{row['engine']:8} {row['start_s']:8.1f} {row['sync_s']:7.2f} {run['tokens']:7d}"
                  f" {run['seconds']:8.2f} {run['tokens_per_s']:9.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
