"""rlkit step time as the work per step grows (1×, 2×, 4× tokens) and with 1 vs 2 rollout workers.

    .venv/bin/python bench/scaling_bench.py           # SmolLM2-135M: 4/8/16 prompts × 8, 48 tokens; 1 vs 2 workers
    .venv/bin/python bench/scaling_bench.py --quick   # tiny random Llama: 2/4/8 prompts × 4, 8 tokens, 2 steps

Every point is a fresh ``bench/e2e_bench.py --child rlkit`` process (the demo config, synchronous,
HF-engine rollouts, one DeepSpeed learner), run one after the other. Tokens per step grow
through ``train.prompts_per_step`` (``--base-prompts`` × each of ``--multipliers``) at a fixed
micro-batch (``--micro-batch``), so 2× tokens means 2× micro-batches, not bigger ones. The worker
points split the same thread budget (``--threads``): 1 worker × 2 threads vs 2 workers × 1
thread, at the ``--workers-at`` multiplier.

Linearity: efficiency = (t_k / t_1) ÷ (n_k / n_1), with t the median step seconds (steps 2..K)
and n the measured trained tokens per step (prompt + completion; completions vary in length, so
the nominal multiplier is not used). efficiency ≤ 1 is "no worse than linear". Writes
``bench/out/scaling.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def point_args(args: argparse.Namespace, prompts: int, workers: int) -> list[str]:
    return ["--child", "rlkit", "--model", args.model, "--steps", str(args.steps), "--prompts", str(prompts),
            "--samples", str(args.samples), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
            "--num-train", str(args.num_train), "--num-eval", str(args.num_eval),
            "--rollout-workers", str(workers), "--micro-batch", str(args.micro_batch)]


def run_point(args: argparse.Namespace, kind: str, mult: int, workers: int) -> dict[str, Any]:
    """One configuration in its own process; a failure is recorded, not raised."""
    prompts = args.base_prompts * mult
    print(f"[scaling] {kind}: {prompts} prompts × {args.samples}, {workers} rollout worker(s) ...", flush=True)
    res = common.run_child("e2e_bench.py", point_args(args, prompts, workers), args.threads, timeout=args.timeout,
                           log=Path(args.out) / "logs" / f"scaling-{kind}-x{mult}-w{workers}.log")
    point = {"kind": kind, "multiplier": mult, "prompts": prompts, "samples": args.samples,
             "sequences": prompts * args.samples, "rollout_workers": workers,
             "rollout_threads": max(1, args.threads // workers), "ok": bool(res.get("ok"))}
    if not res.get("ok"):
        print(f"[scaling] failed: {res.get('error')}\n{res.get('tail', '')}", file=sys.stderr)
        return {**point, "error": res.get("error"), "tail": res.get("tail")}
    steady = res["steps"][1:] or res["steps"][:1]
    point.update({
        "step_s": res["step_s"], "generate_s": res["generate_s"],
        "learn_s": common.summary(s["stages"].get("learn", 0.0) for s in steady),
        "trained_tokens": common.summary(s["trained_tokens"] for s in steady),
        "generated_tokens": common.summary(s["generated_tokens"] for s in steady),
        "gen_tokens_per_s": res["gen_tokens_per_s"], "roofline_frac": res["roofline_frac"],
        "warmup_s": res["warmup"]["seconds"], "steps": res["steps"],
    })
    return point


def efficiencies(points: list[dict]) -> None:
    """Add ``efficiency`` (step-time growth ÷ token growth vs the 1× point) to each token point."""
    ok = [p for p in points if p["ok"] and p["kind"] == "tokens"]
    base = next((p for p in ok if p["multiplier"] == min(q["multiplier"] for q in ok)), None)
    for p in ok:
        if base is None:
            continue
        growth_t = p["step_s"]["median"] / base["step_s"]["median"]
        growth_n = p["trained_tokens"]["median"] / base["trained_tokens"]["median"]
        p["time_growth"], p["token_growth"], p["efficiency"] = growth_t, growth_n, growth_t / growth_n
        p["seconds_per_1k_tokens"] = 1000 * p["step_s"]["median"] / p["trained_tokens"]["median"]


def print_table(points: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.model}: {args.samples} samples/prompt, {args.new_tokens} new tokens, micro-batch "
          f"{args.micro_batch}, {args.threads} threads; median (min–max) over steps 2..{args.steps}")
    print(f"{'kind':8} {'prompts':>7} {'workers':>7} {'tokens':>8} {'step s':>22} {'gen s':>20} "
          f"{'learn s':>20} {'efficiency':>10}")
    for p in points:
        if not p["ok"]:
            print(f"{p['kind']:8} {p['prompts']:7d} {p['rollout_workers']:7d} FAILED: {p.get('error')}")
            continue
        eff = f"{p['efficiency']:.3f}" if "efficiency" in p else "—"
        print(f"{p['kind']:8} {p['prompts']:7d} {p['rollout_workers']:7d} {p['trained_tokens']['median']:8.0f} "
              f"{common.fmt(p['step_s']):>22} {common.fmt(p['generate_s']):>20} {common.fmt(p['learn_s']):>20} "
              f"{eff:>10}")
    print("efficiency = step-time growth ÷ token growth vs the smallest point (≤ 1: no worse than linear)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a HF model folder")
    ap.add_argument("--base-prompts", type=int, default=4, help="prompts per step at 1×")
    ap.add_argument("--multipliers", default="1,2,4")
    ap.add_argument("--workers", default="1,2", help="rollout worker counts compared at --workers-at")
    ap.add_argument("--workers-at", type=int, default=2, help="multiplier of the worker comparison")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--num-eval", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2/4/8 prompts × 4, 8 tokens, 2 steps")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    ap.add_argument("--out", default=str(common.OUT_DIR), help="folder of scaling.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.base_prompts, args.samples, args.new_tokens = "tiny", 2, 4, 8
        args.micro_batch, args.steps, args.num_train, args.num_eval, args.workers_at = 4, 2, 64, 8, 1
    mults = [int(x) for x in args.multipliers.split(",") if x]
    workers = [int(x) for x in args.workers.split(",") if x]
    common.model_dir(args.model)  # build or fetch the folder once, before any timing
    points = [run_point(args, "tokens", m, 1) for m in mults]
    # The 1-worker point at --workers-at is already measured when that multiplier is in the sweep.
    for w in workers:
        if w == 1 and args.workers_at in mults:
            continue
        points.append(run_point(args, "workers", args.workers_at, w))
    efficiencies(points)
    print_table(points, args)
    path = common.write_result("scaling", {"points": points}, args, Path(args.out))
    print(f"wrote {path}")
    return 0 if all(p["ok"] for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
