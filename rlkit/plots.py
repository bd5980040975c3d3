"""PNG learning curves of a run from ``run_dir/metrics.jsonl`` (key conventions: ``rlkit.metrics``).

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
        ax.plot(steps_S, values_S, "o-" if sparse else "-", label=key,
                alpha=0.45 if key == "reward/mean" else 1.0)
        if key == "reward/mean":
            ax.plot(steps_S, moving_average(values_S), label=f"{MOVING_AVERAGE}-step average")
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
