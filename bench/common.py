"""Shared helpers of the benchmark scripts: machine description, matmul roofline probe, statistics,
model folders, child processes and JSON output.

Every benchmark writes one JSON file to ``bench/out/<name>.json`` with the same envelope::

    {"bench": "<name>", "schema": 1, "machine": machine(), "args": {...}, ... bench-specific keys}

and every timed figure is a :func:`summary` (median, min, max over repeats) so that
``bench/report.py`` can print it as "median (min–max)".
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
SCHEMA = 1
RESULT_PREFIX = "RESULT "


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements, plus the raw values: ``{"median", "min", "max", "n", "values"}``.

    The median is the headline figure (robust to one noisy repeat on a shared machine); min and
    max show the spread. An empty input gives ``n = 0`` and None figures.
    """
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": [round(v, 6) for v in vals]}


def ratio_summary(num: dict[str, Any], den: dict[str, Any]) -> dict[str, Any]:
    """Ratio of two summaries: median/median, with the extreme ratios as min and max.

    min = num.min / den.max and max = num.max / den.min bound every ratio of one repeat of each
    side, so the interval is conservative.
    """
    if not num.get("n") or not den.get("n") or not den["median"] or not den["min"]:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": num["median"] / den["median"], "min": num["min"] / den["max"],
            "max": num["max"] / den["min"], "n": min(num["n"], den["n"]), "values": []}


# ----------------------------------------------------------------------------------------------
# The machine and its fp32 matmul rate
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed: the description just says so
        return None


def git_state() -> dict[str, Any]:
    """The commit this run measured and whether the tree had uncommitted changes to tracked files."""
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, load average, the date and the git commit of this run."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": affinity, "ram_gib": _mem_total_gib(),
        "python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
        "trl": _version("trl"), "deepspeed": _version("deepspeed"), "ray": _version("ray"),
        "os": platform.platform(), "loadavg_1_5_15": load,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
    }


def matmul_gflops(n: int = 2048, repeats: int = 5, threads: Optional[int] = None) -> dict[str, Any]:
    """fp32 matmul rate of this process, GFLOP/s = 2·n³ / seconds of one ``(n×n) @ (n×n)``.

    The roofline of the step-FLOP fractions: it is measured in the same run (same machine state,
    same thread count) as the figure it divides. One untimed warm-up call first (thread pool and
    allocator), then ``repeats`` timed calls; returns a :func:`summary` of GFLOP/s plus size and threads.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {**summary(rates), "size": n, "threads": torch.get_num_threads()}


def step_flops(params: int, *, generated: int, prefill: int, trained: int, extra_forward: int = 0) -> float:
    """Model FLOPs of one RL step: 2·P·(prefill + generated) + 6·P·trained + 2·P·extra_forward.

    The usual dense-transformer count (Kaplan et al. 2020, "Scaling Laws for Neural Language
    Models", §2.1: 2·N per token forward, 6·N forward + backward), with N = ``params`` counted once
    for tied embeddings, which is the LM-head matmul. Attention-score FLOPs (∝ sequence length) are
    left out: at ~100-token sequences they are under 1 % of the total here.

    generated: completion tokens sampled (EOS included, padding not); prefill: prompt tokens of
        every sampled sequence (the prompt's forward before decoding); trained: prompt + completion
        tokens of every sequence in the update; extra_forward: tokens of detached passes (old or
        reference log-probs), summed over the passes. All counts are unpadded (useful) tokens, so
        padding waste shows up as a lower roofline fraction.
    """
    return 2.0 * params * (prefill + generated) + 6.0 * params * trained + 2.0 * params * extra_forward


# ----------------------------------------------------------------------------------------------
# Models, environments, child processes, output
# ----------------------------------------------------------------------------------------------


def model_dir(which: str) -> Path:
    """``smollm2`` (the converted SmolLM2-135M-Instruct), ``tiny`` (random 2-layer Llama), or a folder."""
    from rlkit import assets

    if which == "smollm2":
        return assets.smollm2_dir()
    if which == "tiny":
        return assets.tiny_model_dir(assets.cache_root() / "models" / "bench-tiny-llama")
    return Path(which)


def bench_env(threads: int) -> dict[str, str]:
    """Environment of a child process: thread counts fixed, everything offline, CPU DeepSpeed."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"),
               DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=os.pathsep.join(
                   p for p in (str(BENCH_DIR), env.get("PYTHONPATH")) if p))
    return env


def emit(result: dict[str, Any]) -> None:
    """A child's answer to its parent: one ``RESULT {json}`` line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_script(script: str, args: list[str], threads: int, timeout: Optional[float] = None,
               log: Optional[Path] = None) -> tuple[Optional[int], str, str]:
    """Run ``bench/<script> args`` in a fresh Python process (:func:`bench_env`); (exit code, stdout, stderr).

    A timeout gives exit code None and whatever output there was.
    """
    cmd = [sys.executable, str(BENCH_DIR / script), *args]
    try:
        proc = subprocess.run(cmd, env=bench_env(threads), capture_output=True, text=True, timeout=timeout,
                              cwd=str(ROOT))
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        rc, out, err = None, text(e.stdout), text(e.stderr) + f"\ntimed out after {timeout} s"
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out + "\n--- stderr ---\n" + err)
    return rc, out, err


def run_child(script: str, args: list[str], threads: int, timeout: Optional[float] = None,
              log: Optional[Path] = None) -> dict[str, Any]:
    """Run a bench child (``--child ...``) in a fresh process; return the dict of its RESULT line.

    A failed, timed-out or silent child gives ``{"ok": False, "error": ..., "tail": ...}`` instead of
    raising, so one broken side still leaves the other side's numbers in the report.
    """
    t0 = time.perf_counter()
    rc, out, err = run_script(script, args, threads, timeout, log)
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_PREFIX)]
    if rc != 0 or not lines:
        why = f"timed out after {timeout} s" if rc is None else f"exit {rc}"
        return {"ok": False, "error": why, "tail": (out + err)[-3000:], "wall_s": time.perf_counter() - t0}
    res = json.loads(lines[-1][len(RESULT_PREFIX):])
    res.setdefault("ok", True)
    res["wall_s"] = time.perf_counter() - t0
    return res


def write_result(name: str, payload: dict[str, Any], args: Any, out_dir: Path = OUT_DIR) -> Path:
    """Write ``out_dir/<name>.json`` with the common envelope (bench, schema, machine, args)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "schema": SCHEMA, "machine": machine(),
           "args": vars(args) if hasattr(args, "__dict__") else dict(args), **payload}
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    return path


def fmt(s: Optional[dict[str, Any]], spec: str = ".2f", scale: float = 1.0) -> str:
    """A summary as "median (min–max)"; "—" when not measured."""
    if not s or not s.get("n") or s.get("median") is None:
        return "—"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1 or lo == hi:
        return format(m, spec)
    return f"{format(m, spec)} ({format(lo, spec)}–{format(hi, spec)})"


def run_curves(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[tuple[float, float, int]]]:
    """A finished run's training rows (those with ``time/step``, in step order) and its evaluations
    as (training minutes at that step, ``eval/accuracy``, step); step 0 is the start."""
    from rlkit.metrics import read_metrics

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("time/step") is not None]
    elapsed, minutes_at = 0.0, {0: 0.0}
    for r in train:
        elapsed += float(r["time/step"])
        minutes_at[int(r["step"])] = elapsed / 60
    curve = [(round(minutes_at.get(int(r["step"]), 0.0), 3), float(r["eval/accuracy"]), int(r["step"]))
             for r in rows if r.get("eval/accuracy") is not None]
    return train, curve


# ----------------------------------------------------------------------------------------------
# Rewarded completions (read before publishing an accuracy)
# ----------------------------------------------------------------------------------------------


def rewarded_samples(report: dict[str, Any], k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` greedy completions of an evaluation report (``eval/step_*.json``) that the verifier
    scored 1, drawn with ``seed``, with their final answer, its form and the strict score."""
    import random

    rewarded = [p for p in report.get("problems", []) if p["greedy_correct"] == 1.0]
    return [{"index": p["index"], "answer": p["answer"], "text": p["greedy_text"],
             "final_answer": p.get("final_answer"), "answer_form": p.get("answer_form"),
             "strict_correct": p.get("strict_correct")}
            for p in random.Random(seed).sample(rewarded, min(k, len(rewarded)))]


def _md_code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎").replace("|", "\\|") + "`"


def rewarded_table(samples: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of :func:`rewarded_samples`."""
    lines = ["| problem | reference | completion | final answer | form | strict |", "|---|---|---|---|---|---|"]
    for x in samples:
        strict = "—" if x["strict_correct"] is None else int(x["strict_correct"])
        lines.append(f"| {x['index']} | {x['answer']} | {_md_code(x['text'])} | {_md_code(x['final_answer'] or '')} | "
                     f"{x['answer_form']} | {strict} |")
    return lines
