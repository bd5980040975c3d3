"""Throughput of the reward worker on math samples: ``python bench/reward_bench.py``.

Builds GRPO-shaped batches (``--group`` samples per prompt) of synthetic completions, a few
hundred characters of reasoning ending in a GSM8K ``#### N`` or a MATH-style ``\\boxed{…}``, half
of them correct, and scores them with :class:`rlkit.workers.reward.RewardWorker` running the
``math`` reward in ``--procs`` child processes. Every prompt's reference is new (no verdict cache
hits across prompts), so the figure is the cold, per-step cost. Prints samples/s per workload.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

FILLER = (
    "Let us work through the problem step by step. First we write down what is given and what is "
    "asked. Then we combine the quantities, checking each intermediate result against the "
    "constraints of the problem. "
)


def _gsm8k_item(rng: random.Random) -> tuple[str, list[str]]:
    """An integer reference and G answers: the reference (maybe with a thousands separator) or a near miss."""
    n = rng.randint(2, 250_000)
    right = [str(n), f"{n:,}", f"${n}"]
    wrong = [str(n + 1), str(n - 1), str(n * 10), str(-n)]
    return str(n), right + wrong


def _math_item(rng: random.Random) -> tuple[str, list[str]]:
    """A LaTeX reference (fraction, surd, interval, set, polynomial) and right/wrong answers."""
    a, b, k = rng.randint(1, 40), rng.randint(41, 97), rng.randint(2, 9)
    kind = rng.randrange(5)
    if kind == 0:
        ref = rf"\frac{{{a}}}{{{b}}}"
        return ref, [ref, rf"\dfrac{{{a * k}}}{{{b * k}}}", rf"\frac{{{b}}}{{{a}}}"]
    if kind == 1:
        return rf"{k}\sqrt{{{b}}}", [rf"{k}\sqrt{{{b}}}", rf"\sqrt{{{k * k * b}}}", rf"{k + 1}\sqrt{{{b}}}"]
    if kind == 2:
        return rf"[{a}, {b})", [rf"[{a},{b})", rf"[{a}, {b})", rf"({a}, {b})"]
    if kind == 3:
        return rf"\{{{a}, {b}\}}", [rf"\{{{b}, {a}\}}", rf"\{{{a},{b}\}}", rf"\{{{a}, {b + 1}\}}"]
    return rf"x^2 + {a}x", [rf"x^2 + {a}x", rf"x(x + {a})", rf"x^2 - {a}x"]


def make_batch(n_prompts: int, group: int, workload: str, seed: int):
    rng = random.Random(seed)
    completions, prompts, fields = [], [], []
    for p in range(n_prompts):
        use_math = workload == "math" or (workload == "mixed" and p % 2 == 1)
        ref, answers = (_math_item if use_math else _gsm8k_item)(rng)
        for _ in range(group):
            ans = rng.choice(answers)
            body = FILLER * rng.randint(1, 4)
            end = rf"So the answer is $\boxed{{{ans}}}$." if use_math else f"\n#### {ans}"
            completions.append(body + end)
            prompts.append(f"Problem {seed}-{p}: compute the quantity.")
            fields.append({"answer": ref})
    return completions, prompts, fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workloads", default="gsm8k,math,mixed")
    args = ap.parse_args()

    from rlkit.workers.reward import RewardConfig, RewardWorker

    cfg = RewardConfig(rewards=[{"name": "math"}], num_procs=args.procs, batch_size=args.batch_size, timeout_s=30)
    t0 = time.perf_counter()
    worker = RewardWorker(cfg)
    print(f"worker start: {time.perf_counter() - t0:.2f} s ({args.procs} child processes)")
    try:
        worker.score(*make_batch(8, args.group, "mixed", seed=0))  # warm the forkserver children
        for i, workload in enumerate(args.workloads.split(",")):
            batch = make_batch(args.prompts, args.group, workload, seed=100 + i)
            t = time.perf_counter()
            res = worker.score(*batch)
            dt = time.perf_counter() - t
            n = len(batch[0])
            bad = sum(s != "ok" for s in res.status)
            acc = sum(res.scores) / n
            print(f"{workload:6s}: {n} samples in {dt:.2f} s = {n / dt:7.0f} samples/s "
                  f"(mean reward {acc:.3f}, not ok {bad})")
    finally:
        worker.close()


if __name__ == "__main__":
    main()
