"""Trained tokens per second under bounded asynchrony: ``rollout.max_staleness`` N = 0, 1, 2, 4,
without and with partial rollouts (docs/async.md § Throughput).

    .venv/bin/python bench/async_bench.py            # SmolLM2-135M, 8 prompts × 8, 48 tokens, 2 + 5 steps
    .venv/bin/python bench/async_bench.py --quick    # tiny random Llama, 4 × 4, 16 tokens, 1 + 2 steps

One thread per role (``rollout.threads = learner.threads = 1``, one rollout worker, one learner
rank), GRPO with token-level truncated IS (cap 2), the arithmetic prompts of ``configs/grpo_demo.yaml``.
The settings run one after the other in one Ray instance, on two actor graphs (plain rollout
actors, then threaded ones for partial rollouts), each setting a fresh trainer (prompt sampler
from the start, an empty buffer) on the graph's current weights, after the previous setting's
in-flight generations have drained. N = 0 is the synchronous loop (partial rollouts change
nothing there, so it runs once). The first ``--warmup`` steps of a setting (the buffer filling
for N > 0) are not timed; the figure is the response tokens trained in the timed steps ÷ their
wall time, with the per-step times as a summary (median, min, max). Also per setting: the mean
staleness, the fraction of tokens produced by an older version than the learner's, the fraction
of samples a sync interrupted (``rollout/partial_frac``) and the samples dropped as too stale.
Writes ``bench/out/async.json``.

``--quick`` checks the harness: its figures are dominated by per-step overheads, and most of its
time (about two minutes on 2 cores, more on a loaded machine) is starting the two actor graphs.
On a machine with fewer free cores than roles, generation and learning time-share and the
asynchronous settings cannot beat N = 0 by much; the numbers are for the machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SETTINGS = ((0, False), (1, False), (2, False), (4, False), (1, True), (2, True), (4, True))
"""(max_staleness, partial_rollouts) pairs, in run order."""


def config(args: argparse.Namespace, run_dir: str, n: int, partial: bool):
    from rlkit.config import load_config

    mdir = "smollm2" if args.model == "smollm2" else str(common.model_dir(args.model))
    return load_config(common.ROOT / "configs" / "grpo_demo.yaml", [
        f"run_dir={run_dir}", f"model.path={mdir}", "rollout.num_workers=1", "learner.num_ranks=1",
        "rollout.threads=1", "learner.threads=1", "eval.num_problems=0", "progress=false", "report_to=[]",
        f"data.num_train={max(64, args.prompts * (args.warmup + args.steps + 8))}", "data.num_eval=0",
        f"train.prompts_per_step={args.prompts}", f"train.samples_per_prompt={args.samples}",
        f"rollout.max_new_tokens={args.new_tokens}", f"learner.micro_batch_size={args.prompts * args.samples}",
        f"rollout.max_staleness={n}", f"rollout.partial_rollouts={'true' if partial else 'false'}",
        f"rollout.partial_kv={args.partial_kv}", "learner.tis_cap=2.0", "checkpoint.every_steps=0",
        f"train.steps={args.warmup + args.steps}",
    ])


def stop(rt) -> None:
    """Release one setting's actors and placement group (Ray itself stays up for the next)."""
    import ray

    try:
        ray.get([a.close_shm.remote() for a in rt.learners[:1]], timeout=30)
    except Exception:  # the segments go with the learner process anyway
        pass
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a)
    rt.placement.remove()


def run_setting(args: argparse.Namespace, rt, run_dir: str, n: int, partial: bool) -> dict[str, Any]:
    """``--warmup`` + ``--steps`` steps of a fresh trainer with N = ``n`` on the actor graph ``rt``."""
    from rlkit.metrics import StageTimer
    from rlkit.trainer import Trainer

    trainer = Trainer(config(args, run_dir, n, partial), runtime=rt)
    timer = StageTimer()
    steps, seconds = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        m = trainer.step(timer)
        trainer.state.step += 1
        timer.pop()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
            steps.append(m)
    if trainer._async is not None:  # let the buffer's generations finish before the next setting
        while (b := trainer._async.buffer.take()) is not None:
            rt.collect(b.tasks)
    tokens = sum(m["rollout/tokens"] for m in steps)
    mean = lambda key: sum(m.get(key, 0.0) for m in steps) / len(steps)  # noqa: E731
    return {"max_staleness": n, "partial_rollouts": partial, "timed_steps": len(steps),
            "trained_tokens": tokens, "seconds": sum(seconds), "tokens_per_s": tokens / sum(seconds),
            "step_s": common.summary(seconds), "staleness_mean": mean("rollout/staleness_mean"),
            "old_token_frac": mean("rollout/old_token_frac"), "partial_frac": mean("rollout/partial_frac"),
            "dropped_stale": sum(m.get("async/dropped_stale", 0.0) for m in steps),
            "reward_mean": mean("reward/mean")}


def print_table(rows: list[dict[str, Any]]) -> None:
    base = next((r["tokens_per_s"] for r in rows if r["max_staleness"] == 0), None)
    print(f"{'N':>2} {'partial':>7} {'tok/s':>8} {'× N=0':>6} {'step s':>22} {'stale':>6} {'old tok':>7} "
          f"{'partial':>7} {'dropped':>7}")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:6.2f}" if base else "     —"
        print(f"{r['max_staleness']:>2} {str(r['partial_rollouts']):>7} {r['tokens_per_s']:8.1f} {ratio} "
              f"{common.fmt(r['step_s']):>22} {r['staleness_mean']:6.2f} {r['old_token_frac']:7.2f} "
              f"{r['partial_frac']:7.2f} {r['dropped_stale']:7.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a HF model folder")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    ap.add_argument("--partial-kv", default="keep", choices=["keep", "recompute"], help="rollout.partial_kv")
    ap.add_argument("--settings", default=",".join(f"{n}{'p' if p else ''}" for n, p in SETTINGS),
                    help="comma list of N, with a 'p' suffix for partial rollouts (e.g. 0,2,2p)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 × 4 prompts, 16 tokens, 1 + 2 steps")
    ap.add_argument("--out", default=str(common.OUT_DIR), help="folder of async.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.prompts, args.samples, args.new_tokens, args.warmup, args.steps = "tiny", 4, 4, 16, 1, 2
    settings = [(int(s.rstrip("p")), s.endswith("p")) for s in str(args.settings).split(",") if s]
    # Before torch and Ray start: the actors inherit this environment (one thread each, offline).
    os.environ.update({k: v for k, v in common.bench_env(1).items() if k != "PYTHONPATH"})
    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray instance of its own, not another one on the machine
    import torch

    torch.set_num_threads(1)
    from rlkit.runtime import Runtime
    from rlkit.trainer import model_dir

    rows = []
    with tempfile.TemporaryDirectory(prefix="rlkit-async-bench-") as tmp:
        for partial in (False, True):
            todo = [n for n, p in settings if p == partial]
            if not todo:
                continue
            cfg = config(args, tmp, max(todo), partial)
            rt = Runtime(cfg, model_dir(cfg))
            try:
                rt.sync()
                for n in todo:
                    t0 = time.perf_counter()
                    rows.append(run_setting(args, rt, tmp, n, partial))
                    print(f"N = {n}{' partial' if partial else ''}: {rows[-1]['tokens_per_s']:.1f} trained "
                          f"tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)
            finally:
                stop(rt)
    print_table(rows)
    path = common.write_result("async", {"rows": rows}, args, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
