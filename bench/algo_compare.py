"""Every shipped algorithm on one workload, one seed, one training-time budget: the learning table.

    .venv/bin/python bench/algo_compare.py                      # the table (about 80 minutes here)
    .venv/bin/python bench/algo_compare.py --budget-min 4 --only grpo,dapo
    .venv/bin/python bench/algo_compare.py --quick              # harness check: tiny budget, 20 problems
    .venv/bin/python bench/algo_compare.py --report             # re-render docs from bench/out/algo_compare.json

Workload (the demo's, ``configs/grpo_demo.yaml``): SmolLM2-135M-Instruct, 1–2-digit +/− problems with
the math reward (last-number fallback), 8 prompts × 8 samples, 48 new tokens, sampling temperature
0.7, lr 1e-5 constant, one DeepSpeed ZeRO-2 learner rank, HF rollout engine, 2 threads. Each row
takes its algorithm section from the shipped config (``configs/<name>.yaml``) and nothing else:
the shipped configs sample at temperature 1 and run a fixed number of steps, here every run samples
at 0.7 and stops after the first step ending past ``--budget-min`` minutes of training time (the
sum of step times; evaluations and checkpoints excluded), so each algorithm gets the same time.

* Before/after: greedy accuracy on the same 200 held-out problems (``eval.num_problems``); the start
  model is evaluated once (every run starts from it), every run at half its budget and at the end.
* Noise band: GRPO twice (``train.seed`` 0 and 1). An algorithm "learns" when its gain exceeds the
  larger of the two GRPO runs' gap and the 95 % half-width of a 200-problem accuracy difference.
* KL to the start policy, measured the same way for every row after its run: 64 held-out prompts,
  one response each sampled from the trained policy at temperature 1, mean over response tokens of
  log π_θ − log π_start (the k1 estimator of KL(π_θ ‖ π_start) per token, with its standard error).
* ExOPD needs a teacher: the final checkpoint of this script's GRPO seed-0 run (not shipped).
* f-DPO and TDPO train on on-policy pairs: each step's sampled groups ranked into (best, worst) pairs
  (TDPO's shipped config reads a preference file; here its data section is the demo's).

Writes ``bench/out/algo_compare.json`` and, from it, ``docs/algorithm-results.md`` with
``docs/img/algo_accuracy_vs_time.png``. Run directories go to ``bench/out/compare/<row>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "algorithm-results.md"
PNG = ROOT / "docs" / "img" / "algo_accuracy_vs_time.png"

ROWS: list[tuple[str, str, int]] = [
    # (row name, shipped config, train.seed); grpo first: its checkpoint is ExOPD's teacher.
    ("grpo", "grpo", 0),
    ("grpo_seed1", "grpo", 1),
    ("dapo", "dapo", 0),
    ("rpg", "rpg", 0),
    ("rpg_reinforce_rkl", "rpg_reinforce_rkl", 0),
    ("kl_cov", "kl_cov", 0),
    ("clip_cov", "clip_cov", 0),
    ("pmd_mean", "pmd_mean", 0),
    ("rapo", "rapo", 0),
    ("safe", "safe", 0),
    ("exopd", "exopd", 0),
    ("fdpo", "fdpo", 0),
    ("tdpo", "tdpo", 0),
]

WORKLOAD = [
    "model.path=smollm2", "data={kind: arithmetic}",  # the whole section: TDPO's config reads a pair file
    "rollout.engine=hf", "rollout.temperature=0.7", "rollout.max_new_tokens=48", "rollout.threads=2",
    "rollout.num_workers=1",
    "learner.num_ranks=1", "learner.zero_stage=2", "learner.threads=2", "learner.micro_batch_size=16",
    "learner.lr=1.0e-5", "learner.lr_schedule=constant",
    "train.prompts_per_step=8", "train.samples_per_prompt=8", "train.steps=100000",
    "eval.every_steps=0", "eval.max_new_tokens=48", "checkpoint.every_steps=0", "checkpoint.keep=1",
]
KL_PROMPTS = 64
SAMPLES_PER_ROW = 5
COMMENTARY = ROOT / "docs" / "commentary" / "algorithm-results.md"
Z95 = 1.959964


def run_row(name: str, config: str, seed: int, args: argparse.Namespace, teacher: Path | None,
            at_start: bool) -> dict[str, Any]:
    run_dir = OUT / "compare" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = WORKLOAD + [
        f"run_dir={run_dir}", f"train.seed={seed}", f"train.max_minutes={args.budget_min}",
        f"eval.num_problems={args.problems}", f"eval.at_start={'true' if at_start else 'false'}",
        f"eval.at_minutes=[{args.budget_min / 2:g}]",
    ]
    if teacher is not None:
        overrides.append(f"model.teacher_path={teacher}")
    env = dict(os.environ, OMP_NUM_THREADS="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "rlkit", "train", str(ROOT / "configs" / f"{config}.yaml"), *overrides]
    print(f"[{name}] {' '.join(cmd[3:5])} seed={seed}", flush=True)
    t0 = time.perf_counter()
    with open(OUT / "compare" / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"name": name, "config": f"configs/{config}.yaml", "seed": seed, "rc": proc.returncode,
                           "git": common.git_state(),
                           "wall_s": round(wall, 1), "log": str((OUT / "compare" / f"{name}.log").relative_to(ROOT))}
    if proc.returncode != 0:
        tail = (OUT / "compare" / f"{name}.log").read_text().splitlines()[-15:]
        row["error"] = "\n".join(tail)
        print(f"[{name}] FAILED rc={proc.returncode}\n" + row["error"], flush=True)
        return row
    row.update(read_run(run_dir))
    row.update(kl_to_start(row["final_hf"], args))
    print(f"[{name}] {row['steps']} steps, {row['train_min']:.2f} min: accuracy "
          f"{row['acc_curve'][-1][1]:.3f}, KL to start {row['kl_start']:.4f} ({wall:.0f} s)", flush=True)
    return row


def read_run(run_dir: Path) -> dict[str, Any]:
    train, curve = common.run_curves(run_dir)
    elapsed = sum(float(r["time/step"]) for r in train)

    def series(key: str) -> list[float | None]:
        return [None if r.get(key) is None else float(r[key]) for r in train]

    ckpts = sorted((run_dir / "checkpoints").glob("step_*/hf"))
    from rlkit.metrics import read_metrics
    from rlkit.rewards.hacks import MONITORS, run_summary

    rows = [r for r in read_metrics(run_dir) if r.get("eval/strict_accuracy") is not None]
    last_eval = json.loads((run_dir / "eval" / f"step_{curve[-1][2]:07d}.json").read_text()) if curve else {}

    return {
        "steps": len(train), "train_min": round(elapsed / 60, 3),
        "strict_curve": [(int(r["step"]), float(r["eval/strict_accuracy"])) for r in rows],
        "monitor_max": {k: max((float(r.get(f"hack/{k}") or 0.0) for r in train), default=None) for k in MONITORS},
        "monitor_alert_steps": sum(1 for r in train if (r.get("hack/alerts") or 0) > 0),
        "monitor_summary": run_summary(train),
        "rewarded_samples": common.rewarded_samples(last_eval, SAMPLES_PER_ROW, seed=0),
        "s_per_step": round(elapsed / max(len(train), 1), 2),
        "acc_curve": curve,
        "reward": series("reward/mean"), "entropy": series("entropy/mean"),
        "length": series("response/length_mean"), "kl_ref": series("kl/mean"),
        "final_hf": str(ckpts[-1]) if ckpts else "",
    }


def kl_to_start(final_hf: str, args: argparse.Namespace) -> dict[str, Any]:
    """k1 estimate of KL(π_θ ‖ π_start) per response token, on responses sampled from π_θ."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlkit.assets import load_tokenizer, smollm2_dir
    from rlkit.data import DataSpec, load_prompts

    torch.set_num_threads(2)
    torch.manual_seed(0)
    start_dir = smollm2_dir()
    tok = load_tokenizer(start_dir, padding_side="left")
    _, eval_rows = load_prompts(DataSpec(kind="arithmetic"), tok)
    prompts = [r.prompt_text for r in eval_rows[:args.kl_prompts]]
    policy = AutoModelForCausalLM.from_pretrained(final_hf, dtype=torch.float32).eval()
    start = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = policy.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48,
                              pad_token_id=tok.pad_token_id)
        attn = (out != tok.pad_token_id).long()
        attn[:, : enc["input_ids"].shape[1]] = enc["attention_mask"]
        P = enc["input_ids"].shape[1]
        resp = out[:, P:]
        # Response mask: tokens up to and including the first EOS.
        eos = tok.eos_token_id
        is_eos = resp == eos
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        mask = ~after
        attn[:, P:] = mask.long()

        def token_logp(model: Any) -> torch.Tensor:
            logits = model(input_ids=out, attention_mask=attn).logits[:, P - 1:-1].float()
            return torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)

        diff = (token_logp(policy) - token_logp(start))[mask]
    n = int(diff.numel())
    mean = float(diff.mean())
    se = float(diff.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"kl_start": round(mean, 5), "kl_start_se": round(se, 5), "kl_tokens": n}


def seed_gap(rows: dict[str, dict[str, Any]]) -> float:
    """Training noise: the final accuracies of GRPO with seeds 0 and 1 apart (0 if either is missing)."""
    a, b = rows.get("grpo"), rows.get("grpo_seed1")
    return abs(final_acc(a) - final_acc(b)) if a and b and a.get("acc_curve") and b.get("acc_curve") else 0.0


def correct_vector(run_dir: Path, step: int) -> list[float]:
    """Per-problem greedy correctness (0/1) of a run's evaluation at ``step``."""
    report = json.loads((run_dir / "eval" / f"step_{step:07d}.json").read_text())
    return [float(p["greedy_correct"]) for p in report["problems"]]


def paired_gain(before: list[float], after: list[float]) -> dict[str, float]:
    """Accuracy gain on the same problems with its paired 95 % interval: b problems turned right,
    c turned wrong, gain (b − c)/n, standard error √(b + c − (b − c)²/n)/n."""
    n = len(before)
    b = sum(1 for x, y in zip(before, after) if y > x)
    c = sum(1 for x, y in zip(before, after) if y < x)
    gain = (b - c) / n
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return {"gain": gain, "lo": gain - Z95 * se, "hi": gain + Z95 * se, "turned_right": b, "turned_wrong": c}


def final_acc(row: dict[str, Any] | None) -> float:
    return float(row["acc_curve"][-1][1]) if row and row.get("acc_curve") else float("nan")


def mean(xs: list[float | None], last: int | None = None) -> float | None:
    vals = [x for x in xs if x is not None]
    if last:
        vals = vals[-last:]
    return round(sum(vals) / len(vals), 4) if vals else None


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render(result: dict[str, Any]) -> None:
    rows = {r["name"]: r for r in result["rows"]}
    start = result["start_accuracy"]
    gap = seed_gap(rows)
    start_correct = correct_vector(OUT / "compare" / "grpo", 0)
    lines = [
        "# Algorithm results: one workload, one seed, one training-time budget",
        "",
        f"Generated by `make compare` (`bench/algo_compare.py --budget-min {result['budget_min']:g}`) on "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores), torch {result['machine'].get('torch')}, "
        f"{result['date']}. Every row trains SmolLM2-135M-Instruct from the same start on the demo workload "
        "(1–2-digit +/− problems, math reward with last-number fallback, 8 prompts × 8 samples, 48 new tokens, "
        "temperature 0.7, lr 1e-5 constant, one ZeRO-2 learner rank, 2 threads) with the algorithm section of "
        f"its shipped config, seed 0, for **{result['budget_min']:g} minutes of training time** (evaluations "
        "excluded). Accuracy is greedy, on the same "
        f"{result['problems']} held-out problems; the start model scores **{start:.1%}**. Commits measured: "
        + ", ".join(sorted({f"`{(r.get('git') or result['machine'].get('git') or {}).get('commit', 'unknown')[:10]}`"
                            for r in result["rows"]})) + ".",
        "",
        f"Noise: GRPO with seeds 0 and 1 ends {gap:.1%} apart (training noise), and each gain has a paired 95 % "
        "interval over the same problems (evaluation noise: problems turned right b, turned wrong c). A row "
        f"**learns** when its gain exceeds the seed gap ({gap:.1%}) and its interval excludes 0.",
        "",
        "Accuracy is the verifier's (math-verify behind the answer-form rule, docs/rewards.md); the strict "
        "column scores the same final greedy answers as literal numbers, without math-verify. The monitors column "
        "counts the steps at which a hack monitor crossed its threshold and gives the largest monitored fraction.",
        "",
        "| algorithm (config) | steps | s/step | accuracy before → mid → after | strict after | gain [95 % paired] | "
        "learns | reward first 3 → last 3 | KL to start (nats/token ± se) | entropy last 3 | length last 3 | "
        "monitors: alert steps (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("rc") != 0:
            lines.append(f"| {r['name']} (`{r['config']}`) | failed (rc {r['rc']}), see `{r['log']}` | | | | | | | | | | |")
            continue
        curve = r["acc_curve"]
        accs = " → ".join(f"{a:.1%}" for _, a, _ in ([(0, start, 0)] + curve))
        pg = paired_gain(start_correct, correct_vector(OUT / "compare" / r["name"], curve[-1][2]))
        r["gain"] = pg
        learns = "yes" if pg["gain"] > gap and pg["lo"] > 0 else "no"
        gain = f"{pg['gain']:+.1%} [{pg['lo']:+.1%}, {pg['hi']:+.1%}]"
        rew = f"{fmt(mean(r['reward'][:3]), '.3f')} → {fmt(mean(r['reward'], 3), '.3f')}"
        strict = f"{r['strict_curve'][-1][1]:.1%}" if r.get("strict_curve") else "—"
        peak = max((v for v in (r.get("monitor_max") or {}).values() if v is not None), default=None)
        monitors = f"{r.get('monitor_alert_steps', '—')} ({fmt(peak, '.0%')})"
        lines.append(
            f"| {r['name']} (`{r['config']}`{', seed ' + str(r['seed']) if r['seed'] else ''}) | {r['steps']} | "
            f"{r['s_per_step']:.1f} | {accs} | {strict} | {gain} | {learns} | {rew} | "
            f"{r['kl_start']:.4f} ± {r['kl_start_se']:.4f} | {fmt(mean(r['entropy'], 3), '.3f')} | "
            f"{fmt(mean(r['length'], 3), '.1f')} | {monitors} |")
    missing = [n for n, _, _ in ROWS if n not in rows]
    if missing:
        lines += ["", f"Not re-run under the answer-form verifier, so not shown: {', '.join(missing)} "
                  f"(`bench/algo_compare.py --only {','.join(missing)}` adds them)."]
    lines += ["", f"![accuracy vs training time]({PNG.relative_to(DOC.parent)})", ""]
    lines += rewarded_section(result["rows"])
    if COMMENTARY.is_file():
        lines += ["## Commentary (hand-written, not generated)", "", COMMENTARY.read_text().strip(), ""]
    DOC.write_text("\n".join(lines).rstrip() + "\n")
    plot(result, start)
    print(f"wrote {DOC.relative_to(ROOT)} and {PNG.relative_to(ROOT)}")


def rewarded_section(rows: list[dict[str, Any]]) -> list[str]:
    """Five greedy completions per row that the verifier scored 1 at the row's last evaluation."""
    lines = ["## Rewarded completions", "",
             f"{SAMPLES_PER_ROW} greedy completions per row that the verifier scored 1 at the final evaluation "
             "(seeded draw), with the extracted final answer, its form and the strict score.", ""]
    for r in rows:
        if not r.get("rewarded_samples"):
            continue
        lines += [f"<details><summary>{r['name']}</summary>", "", *common.rewarded_table(r["rewarded_samples"]),
                  "", "</details>", ""]
    return lines


def plot(result: dict[str, Any], start: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(result["rows"]):
        if r.get("rc") != 0:
            continue
        xs = [0.0] + [m for m, _, _ in r["acc_curve"]]
        ys = [start] + [a for _, a, _ in r["acc_curve"]]
        ax.plot(xs, ys, marker="o", label=r["name"], color=matplotlib.colormaps["tab20"](i % 20),
                linestyle="--" if r["name"].startswith("grpo") else "-")
    ax.set_xlabel("training time (minutes; evaluations excluded)")
    ax.set_ylabel(f"greedy accuracy, {result['problems']} held-out problems")
    ax.set_title("SmolLM2-135M, demo workload, same seed and budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=4.0, help="training minutes per run")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per evaluation")
    ap.add_argument("--kl-prompts", type=int, default=KL_PROMPTS)
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--quick", action="store_true", help="harness check: 0.5-minute budget, 20 problems, 3 rows")
    ap.add_argument("--report", action="store_true", help="only re-render the docs from the JSON")
    ap.add_argument("--out", default=str(OUT / "algo_compare.json"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        render(json.loads(out.read_text()))
        return 0
    if args.quick:
        args.budget_min, args.problems, args.kl_prompts = 0.5, 20, 8
        args.only = args.only or "grpo,exopd,fdpo"
        out = OUT / "algo_compare_quick.json"
    wanted = [x for x in args.only.split(",") if x] or [n for n, _, _ in ROWS]
    unknown = sorted(set(wanted) - {n for n, _, _ in ROWS})
    if unknown:
        ap.error(f"--only: unknown rows {unknown}; choose from {[n for n, _, _ in ROWS]}")
    (OUT / "compare").mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() and args.only and not args.quick else None
    result: dict[str, Any] = previous or {"rows": []}
    result.update({"budget_min": args.budget_min, "problems": args.problems, "machine": common.machine(),
                   "date": time.strftime("%Y-%m-%d")})
    done = {r["name"]: r for r in result["rows"]}
    teacher: Path | None = None
    for name, config, seed in ROWS:
        if name not in wanted:
            continue
        if config == "exopd":
            grpo = done.get("grpo")
            if not grpo or not grpo.get("final_hf"):
                print("[exopd] skipped: needs the grpo row's checkpoint as its teacher (run grpo first)")
                continue
            teacher = Path(grpo["final_hf"])
        first = "start_accuracy" not in result
        row = run_row(name, config, seed, args, teacher if config == "exopd" else None, at_start=first)
        if first and row.get("acc_curve") and row["acc_curve"][0][2] == 0:
            result["start_accuracy"] = row["acc_curve"].pop(0)[1]
        done[name] = row
        result["rows"] = [done[n] for n, _, _ in ROWS if n in done]
        out.write_text(json.dumps(result, indent=1))
    if "start_accuracy" in result and not args.quick:
        render(result)
    print(json.dumps({r["name"]: (r.get("acc_curve") or [[None, None]])[-1][1] for r in result["rows"]}))
    return 0 if all(r.get("rc") == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
