"""PNG learning curves of a run from ``run_dir/metrics.jsonl`` (key conventions: ``rlkit.metrics``),
and the accuracy-vs-checkpoint curve of ``rlkit eval`` (docs/eval.md).

Per-step curves that are noisy (``NOISY``: the training reward and accuracy, one batch each) are
drawn as faint raw points with a trailing moving average over them on top.

Uses matplotlib's Agg canvas directly (no pyplot), so plotting never touches a display or the
global backend of the calling process. Null values become NaN, which matplotlib draws as gaps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlkit.metrics import read_metrics

# (file stem, title, y label, keys drawn on the same axes)
_CURVES = (
    ("reward", "reward", "mean reward", ("reward/mean",)),
    ("accuracy", "accuracy", "accuracy",
     ("eval/accuracy", "eval/accuracy_brief", "reward/accuracy")),
    ("kl", "KL to the reference", "KL (mean per token)", ("kl/mean",)),
    ("entropy", "policy entropy", "entropy (nats per token)", ("entropy/mean",)),
    ("response_length", "response length", "tokens", ("response/length_mean",)),
)
MOVING_AVERAGE = 5
NOISY = ("reward/mean", "reward/accuracy")
"""Per-step keys drawn raw (faint) with a ``MOVING_AVERAGE``-step average over the raw points."""


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` over the rows that carry it; null → NaN."""
    rows = [r for r in rows if key in r]
    steps_S = np.array([r["step"] for r in rows], dtype=float)
    values_S = np.array([math.nan if r[key] is None else r[key] for r in rows], dtype=float)
    return steps_S, values_S


def moving_average(values_S: np.ndarray, window: int = MOVING_AVERAGE) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values at each point (NaN if there are none).

    NaN-aware so that one non-finite step does not blank out ``window`` points of the average.
    """
    finite_S = np.isfinite(values_S)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite_S, values_S, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(finite_S)])
    hi = np.arange(1, len(values_S) + 1)
    lo = np.maximum(hi - window, 0)
    count = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), math.nan)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _curve(rows: list[dict[str, Any]], stem: str, title: str, ylabel: str,
           keys: tuple[str, ...], out_dir: Path) -> Path | None:
    present = [(k, *_series(rows, k)) for k in keys]
    present = [(k, s, v) for k, s, v in present if np.isfinite(v).any()]
    if not present:
        return None
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for key, steps_S, values_S in present:
        sparse = len(steps_S) < 0.5 * len(rows)  # evaluations: a few points, mark them
        noisy = key in NOISY and not sparse
        line = ax.plot(steps_S, values_S, "o-" if sparse else "-", label=f"{key} (raw)" if noisy else key,
                       alpha=0.35 if noisy else 1.0, linewidth=1.0 if noisy else 1.5)[0]
        if noisy:
            ax.plot(steps_S, moving_average(values_S), color=line.get_color(),
                    label=f"{key} ({MOVING_AVERAGE}-step average)")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir / f"{stem}.png")


def _stage_times(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Stacked seconds per stage; ``time/step`` (if logged) as a dashed total on top."""
    stages = sorted({k for r in rows for k in r if k.startswith("time/") and k != "time/step"})
    rows = [r for r in rows if any(k.startswith("time/") for k in r)]
    if not rows:
        return None
    steps_S = np.array([r["step"] for r in rows], dtype=float)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    if stages:
        # A missing or null stage counts as 0 s so the stack stays defined at every step.
        stacked = [np.array([r.get(k) or 0.0 for r in rows], dtype=float) for k in stages]
        ax.stackplot(steps_S, *stacked, labels=[k[len("time/"):] for k in stages], alpha=0.8)
    total_steps_S, total_S = _series(rows, "time/step")
    if np.isfinite(total_S).any():
        ax.plot(total_steps_S, total_S, "k--", label="step (total)")
    ax.set(title="time per step by stage", xlabel="step", ylabel="seconds")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, out_dir / "time_per_step.png")


def make_plots(run_dir: str | Path) -> list[Path]:
    """Write ``run_dir/plots/*.png`` for each curve whose keys are logged; return their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_curve(rows, *spec, out_dir) for spec in _CURVES]
    paths.append(_stage_times(rows, out_dir))
    return [p for p in paths if p is not None]


def eval_curve(points: list[tuple[int, dict[str, Any]]], path: str | Path, title: str = "evaluation") -> Path:
    """PNG of overall metrics vs checkpoint step, with 95 % intervals as error bars.

    ``points``: (step, report JSON of ``rlkit.evaluate.EvalReport.to_json()``), any order. Every
    interval-carrying metric of the reports' ``all`` row is drawn (greedy accuracy, mean@n,
    pass@k, maj@k).
    """
    points = sorted(points, key=lambda p: p[0])
    rows = [(step, next(r for r in rep["table"] if r["source"] == "all")) for step, rep in points]
    # the fractions (length and truncation are other units)
    names = [m for m in rows[0][1]["metrics"] if m not in ("length_mean", "truncated_frac")] if rows else []
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    steps_P = np.array([s for s, _ in rows], dtype=float)
    for name in names:
        cells = [row["metrics"].get(name, {"value": None}) for _, row in rows]
        values_P = np.array([math.nan if c["value"] is None else c["value"] for c in cells], dtype=float)
        lo_P = np.array([c["ci95"][0] if c.get("ci95") else v for c, v in zip(cells, values_P)], dtype=float)
        hi_P = np.array([c["ci95"][1] if c.get("ci95") else v for c, v in zip(cells, values_P)], dtype=float)
        err = np.vstack([values_P - lo_P, hi_P - values_P])
        ax.errorbar(steps_P, values_P, yerr=err, fmt="o-", capsize=3,
                    label="greedy accuracy" if name == "accuracy" else name)
    ax.set(title=title, xlabel="checkpoint step", ylabel="fraction correct (95 % interval)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    if names:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)
