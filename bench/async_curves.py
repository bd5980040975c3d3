"""Bounded asynchrony on the demo workload: trained tokens/s, accuracy vs training time and a
per-step timeline for ``rollout.max_staleness`` N = 0, 1, 2, 4 (docs/async.md § Measured).

    .venv/bin/python bench/async_curves.py                       # about 25 minutes on 2 cores
    .venv/bin/python bench/async_curves.py --settings 0,2 --budget-min 2
    .venv/bin/python bench/async_curves.py --report              # re-render from bench/out/async_curves.json

Each setting is one ``rlkit train configs/grpo_demo.yaml`` run (SmolLM2-135M, 8 prompts × 8, 48
new tokens, temperature 0.7, GRPO without KL) from the same start and seed, stopped after the first
step ending past ``--budget-min`` minutes of training time, with one thread per role
(``rollout.threads = learner.threads = 1``: on this 2-core machine one core each), token-level
truncated IS (``learner.tis_cap = 2``) for the off-policy tokens, ``timeline: true``. Setting
``0t2`` is the synchronous loop with two threads per role, the demo's own setting: with N = 0 the
roles never run at the same time, so each may use both cores.

Per setting: trained tokens/s (response tokens trained ÷ step time, steps 2..K: step 1 loads
thread pools and, for N > 0, fills the buffer), the mean stage seconds, the mean staleness, and
greedy accuracy on 200 held-out problems at half the budget and at the end (the start model's
accuracy is measured once, by the first setting). From the N = 0 stage times it also prints
what separate hardware would give: the synchronous step is generate + score + side passes + learn
+ sync; with generation on its own cores the asynchronous step tends to max(generate, the rest).

Writes ``bench/out/async_curves.json``, ``docs/img/async_accuracy.png`` and
``docs/img/async_timeline.png`` (steps 3–5 of each setting), and the table between the markers
of docs/async.md.
"""

from __future__ import annotations

import argparse
import json
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
DOC = ROOT / "docs" / "async.md"
IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- async_curves: begin -->", "<!-- async_curves: end -->"
TIMELINE_STEPS = (3, 5)


def parse_setting(s: str) -> tuple[int, int]:
    """'2' → (N 2, 1 thread per role); '0t2' → (N 0, 2 threads)."""
    n, _, t = s.partition("t")
    return int(n), int(t or 1)


def run_setting(label: str, args: argparse.Namespace, at_start: bool) -> dict[str, Any]:
    n, threads = parse_setting(label)
    run_dir = OUT / "async_curves" / f"n{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"run_dir={run_dir}", f"rollout.threads={threads}", f"learner.threads={threads}",
        f"rollout.max_staleness={n}", "learner.tis_cap=2.0", "timeline=true", "progress=false",
        "train.steps=100000", f"train.max_minutes={args.budget_min}", f"eval.num_problems={args.problems}",
        f"eval.at_start={'true' if at_start else 'false'}", f"eval.at_minutes=[{args.budget_min / 2:g}]",
        "checkpoint.every_steps=0", "checkpoint.keep=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled")
    log_path = OUT / "async_curves" / f"n{label}.log"
    cmd = [sys.executable, "-m", "rlkit", "train", str(ROOT / "configs" / "grpo_demo.yaml"), *overrides]
    print(f"[N={n}, {threads} thread(s) per role] running", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    row: dict[str, Any] = {"setting": label, "max_staleness": n, "threads": threads, "rc": rc,
                           "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir.relative_to(ROOT))}
    if rc != 0:
        row["error"] = "\n".join(log_path.read_text().splitlines()[-15:])
        print(row["error"], flush=True)
        return row
    row.update(read_run(run_dir))
    print(f"[N={n}, {threads} thread(s)] {row['tokens_per_s']:.1f} trained tokens/s, step {row['step_s']:.1f} s, "
          f"accuracy {row['acc_curve'][-1][1]:.3f}", flush=True)
    return row


def read_run(run_dir: Path) -> dict[str, Any]:
    train, curve = common.run_curves(run_dir)
    timed = train[1:] or train
    elapsed = sum(float(r["time/step"]) for r in train)
    seconds = sum(float(r["time/step"]) for r in timed)
    tokens = sum(float(r.get("rollout/tokens") or 0.0) for r in timed)
    stages = sorted({k for r in timed for k in r if k.startswith("time/") and k != "time/step"})
    mean = lambda key: sum(float(r.get(key) or 0.0) for r in timed) / len(timed)  # noqa: E731
    return {
        "steps": len(train), "timed_steps": len(timed), "train_min": round(elapsed / 60, 3),
        "tokens_per_s": tokens / seconds if seconds else 0.0, "step_s": seconds / len(timed),
        "stage_s": {k[len("time/"):]: round(mean(k), 3) for k in stages},
        "staleness_mean": mean("rollout/staleness_mean"), "old_token_frac": mean("rollout/old_token_frac"),
        "dropped_stale": sum(float(r.get("async/dropped_stale") or 0.0) for r in timed),
        "is_clipped_frac": mean("is/clipped_frac"), "reward_mean": mean("reward/mean"),
        "acc_curve": curve,
    }


def separate_hardware(row: dict[str, Any]) -> dict[str, float]:
    """From a synchronous run's stage means: its step, and max(generate, the rest) that an
    asynchronous loop with generation on its own cores tends to."""
    st = row["stage_s"]
    gen = st.get("generate", 0.0)
    rest = sum(v for k, v in st.items() if k != "generate")
    step = gen + rest
    return {"sync_step_s": round(step, 2), "generate_s": round(gen, 2), "rest_s": round(rest, 2),
            "async_step_s": round(max(gen, rest), 2), "speedup": round(step / max(gen, rest), 3) if step else 0.0}


def render(result: dict[str, Any]) -> None:
    rows = [r for r in result["rows"] if r.get("rc") == 0]
    base = next((r for r in rows if r["setting"] == "0"), None)
    start = result.get("start_accuracy")
    lines = [BEGIN, "",
             f"Measured by `make bench-async-curves` (`bench/async_curves.py --budget-min {result['budget_min']:g}`) "
             f"on {result['machine']['cpu']} ({result['machine']['cores']} cores), {result['date']}: "
             f"the demo workload, {result['budget_min']:g} minutes of training time per setting, one thread per "
             "role except `0t2`. Start accuracy "
             f"{'—' if start is None else f'{start:.1%}'} (greedy, {result['problems']} held-out problems).", "",
             "| N | threads per role | steps | s/step (2..K) | trained tokens/s | × N=0 | generate s | learn s | sync s | "
             "staleness | old-token frac | accuracy mid → end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("rc") != 0:
            lines.append(f"| {r['max_staleness']} | {r['threads']} | failed (rc {r['rc']}) | | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "—"
        acc = " → ".join(f"{a:.1%}" for _, a, _ in r["acc_curve"])
        st = r["stage_s"]
        lines.append(f"| {r['max_staleness']} | {r['threads']} | {r['steps']} | {r['step_s']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {st.get('generate', 0):.1f} | {st.get('learn', 0):.1f} | "
                     f"{st.get('sync', 0):.2f} | {r['staleness_mean']:.2f} | {r['old_token_frac']:.2f} | {acc} |")
    if base:
        sh = separate_hardware(base)
        lines += ["", f"Separate hardware, from the N = 0 run's stage means (1 thread per role): the synchronous step "
                  f"is {sh['sync_step_s']:.1f} s (generate {sh['generate_s']:.1f} s + everything else "
                  f"{sh['rest_s']:.1f} s); with generation on cores of its own the asynchronous step tends to "
                  f"max of the two, {sh['async_step_s']:.1f} s: **{sh['speedup']:.2f}×** the throughput."]
    lines += ["", "![accuracy vs training time](img/async_accuracy.png)", "",
              f"![timeline, steps {TIMELINE_STEPS[0]}–{TIMELINE_STEPS[1]}](img/async_timeline.png)", ""]
    lines += result.get("notes", []) + [END]
    text = DOC.read_text()
    if BEGIN in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        text = text.replace("## Placement:", "## Measured\n\n" + "\n".join(lines) + "\n\n## Placement:", 1)
    DOC.write_text(text)
    plots(result, rows, start)
    print(f"wrote {DOC.relative_to(ROOT)}")


def plots(result: dict[str, Any], rows: list[dict[str, Any]], start: float | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rlkit import timeline

    IMG.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        pts = ([(0.0, start)] if start is not None else []) + [(m, a) for m, a, _ in r["acc_curve"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"N = {r['max_staleness']}, {r['threads']} thread(s) per role")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel(f"greedy accuracy ({result['problems']} held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "async_accuracy.png", dpi=110)

    fig = Figure(figsize=(11, 2.4 * len(rows)))
    FigureCanvasAgg(fig)
    for i, r in enumerate(rows):
        spans = timeline.read(ROOT / r["run_dir"])
        window = timeline.step_window(spans, *TIMELINE_STEPS)
        timeline.draw(fig.add_subplot(len(rows), 1, i + 1), spans, window,
                      title=f"N = {r['max_staleness']}, {r['threads']} thread(s) per role: steps "
                            f"{TIMELINE_STEPS[0]}–{TIMELINE_STEPS[1]}")
    fig.tight_layout()
    fig.savefig(IMG / "async_timeline.png", dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="0,1,2,4,0t2", help="N per run; a 't2' suffix: two threads per role")
    ap.add_argument("--budget-min", type=float, default=4.0)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", default=str(OUT / "async_curves.json"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        render(json.loads(out.read_text()))
        return 0
    (OUT / "async_curves").mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"budget_min": args.budget_min, "problems": args.problems,
                              "machine": common.machine(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    for i, label in enumerate(s for s in args.settings.split(",") if s):
        row = run_setting(label, args, at_start=i == 0)
        if i == 0 and row.get("acc_curve") and row["acc_curve"][0][2] == 0:
            result["start_accuracy"] = row["acc_curve"].pop(0)[1]
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=1))
    render(result)
    return 0 if all(r.get("rc") == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
