"""Run metrics: a crash-safe JSONL log mirrored to TensorBoard, stage timers, a live progress bar,
and the end-of-run text summary.

Files in a run directory:

* ``metrics.jsonl`` — one JSON object per ``MetricsLogger.log`` call:
  ``{"step": int, "wall_time": unix seconds, "<key>": number or null, ...}``. Several calls may
  share a step (e.g. training metrics, then the evaluation at that step); readers merge them.
  Non-finite values are stored as ``null`` with the key kept, so the file is strict JSON.
* ``eval.jsonl`` (optional) — evaluation rows in the same schema; merged with the above.
* ``tb/`` — TensorBoard event files with the same scalars.
* ``summary.txt`` — written by ``summarize``.

Key conventions (issue 4 "Metrics", issue 6): ``reward/mean``, ``reward/accuracy``, ``kl/mean``,
``entropy/mean``, ``response/length_mean``, ``time/<stage>`` in seconds (``time/step`` is the
whole step), ``eval/accuracy`` and ``eval/accuracy_brief`` as fractions in [0, 1] (step 0 holds
the evaluation before training), ``eval/pass@1``.

Imports only the standard library at module level: torch (TensorBoard writer) and tqdm load when
first needed, so a metrics-only process stays light.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
SUMMARY_FILE = "summary.txt"
_RESERVED = ("step", "wall_time")


def to_scalar(key: str, value: Any) -> float | int | None:
    """Convert one metric value to a plain JSON number: int stays int, non-finite float → None.

    Accepts Python/NumPy numbers and one-element tensors or arrays (``.item()``); bools become 0/1.
    Raises ``TypeError`` (non-numeric) or ``ValueError`` (more than one element) naming ``key``.
    """
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        size = value.numel() if hasattr(value, "numel") else getattr(value, "size", 1)
        if size != 1:
            shape = tuple(getattr(value, "shape", ()))
            raise ValueError(f"metric {key!r} must be a scalar, got a value of shape {shape}")
        value = value.item()
    if isinstance(value, numbers.Integral):  # includes bool
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r:.60}")


def _rewrite_jsonl(path: Path, max_step: int | None) -> None:
    """Atomically rewrite ``path`` keeping its well-formed rows with step <= ``max_step``."""
    keep = [r for r in _parse_lines(path) if max_step is None or r["step"] <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the new one, never a half-written one


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn or malformed line (e.g. a crash mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl`` (and ``eval.jsonl``) merged per step, sorted by step.

    Within a step a later row's keys win; ``wall_time`` is the latest write of that step.
    """
    merged: dict[int, dict[str, Any]] = {}
    for name in (METRICS_FILE, EVAL_FILE):
        for row in _parse_lines(Path(run_dir) / name):
            merged.setdefault(row["step"], {}).update(row)
    return [merged[s] for s in sorted(merged)]


class MetricsLogger:
    """Append-only per-step metrics: ``run_dir/metrics.jsonl`` (fsync'd per line) + TensorBoard.

    ``resume=False`` starts a fresh file (stale lines of an earlier run would corrupt the curves);
    ``resume=True`` keeps it, and the caller then calls ``truncate_after(resumed_step)`` so steps
    re-run after the checkpoint are not logged twice.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._tensorboard = tensorboard
        self._writer: Any = None
        self._purge_step: int | None = None
        if resume:
            _rewrite_jsonl(self.path, max_step=None)  # drops a torn last line before appending
        else:
            self.path.write_text("", encoding="utf-8")
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row for ``step``; every value is validated before anything is written."""
        row: dict[str, Any] = {"step": int(step), "wall_time": time.time()}
        for key, value in metrics.items():
            if not isinstance(key, str) or key in _RESERVED:
                raise ValueError(f"metric key {key!r} must be a string other than {_RESERVED}")
            row[key] = to_scalar(key, value)
        if self._file is None:
            raise RuntimeError("MetricsLogger is closed")
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        # flush + fsync per line: a crash (even SIGKILL or power loss) loses no logged step.
        self._file.flush()
        os.fsync(self._file.fileno())
        writer = self._tb()
        if writer is not None:
            for key, value in row.items():
                # Non-finite values stay out of TensorBoard (they wreck its axis scaling); the
                # JSONL keeps them as null.
                if key not in _RESERVED and value is not None:
                    writer.add_scalar(key, value, row["step"], walltime=row["wall_time"])
            writer.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > ``step`` from the JSONL and, from now on, from TensorBoard."""
        if self._file is not None:
            self._file.close()
        _rewrite_jsonl(self.path, max_step=int(step))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._purge_step = int(step) + 1
        if self._writer is not None:  # reopen so the new writer records the purge
            self._writer.close()
            self._writer = None

    def log_text(self, tag: str, text: str) -> None:
        """Record a text block (e.g. the final summary) in TensorBoard; no-op without TensorBoard."""
        writer = self._tb()
        if writer is not None:
            writer.add_text(tag, text)
            writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tb(self) -> Any:
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes TensorBoard discard events at steps >= it from earlier event files.
            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
        return self._writer


class StageTimer:
    """Wall-clock seconds per stage of the current step: ``with timer("generate"): ...``.

    Repeated entries of a stage add up; nesting is allowed (``with timer("step")`` around the
    others gives ``time/step``). ``pop()`` returns ``{"time/<stage>": seconds}`` and resets.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._seconds[stage] = self._seconds.get(stage, 0.0) + elapsed

    def pop(self) -> dict[str, float]:
        out = {f"time/{stage}": s for stage, s in self._seconds.items()}
        self._seconds = {}
        return out


# (metric key, label, format) shown by Progress, in this order, when present.
_SHOWN = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/accuracy", "acc", "{:.1%}"),
    ("eval/accuracy", "eval_acc", "{:.1%}"),
    ("kl/mean", "kl", "{:.3g}"),
    ("entropy/mean", "ent", "{:.3f}"),
    ("response/length_mean", "len", "{:.1f}"),
    ("time/step", "s/step", "{:.1f}"),
)


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Live progress of a run: step n/N with reward, accuracy, KL, entropy, length, step time.

    On a terminal a tqdm bar updates in place; otherwise (CI logs, files) one compact line per
    step is printed, with an ETA. Values stay shown until replaced, so the sparse ``eval/accuracy``
    remains visible between evaluations.
    """

    def __init__(self, total_steps: int, *, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None):
        self.total = int(total_steps)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self._initial = int(initial)
        self._start = time.perf_counter()
        self._last: dict[str, float | int | None] = {}
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if enabled and isatty is not None and isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self._initial, file=self.stream,
                             unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        for key, _, _ in _SHOWN:
            if key in metrics:
                self._last[key] = to_scalar(key, metrics[key])
        fields = self.fields()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(fields, refresh=True)
            return
        done = step - self._initial
        eta = ""
        if 0 < done and step < self.total:
            per_step = (time.perf_counter() - self._start) / done
            eta = f" | eta {_format_duration(per_step * (self.total - step))}"
        print(f"step {step}/{self.total} | {fields}{eta}", file=self.stream, flush=True)

    def fields(self) -> str:
        """The shown values as ``reward 0.250 | kl 0.0012 | ...`` (null values as ``nan``)."""
        parts = []
        for key, label, fmt in _SHOWN:
            if key in self._last:
                value = self._last[key]
                parts.append(f"{label} {'nan' if value is None else fmt.format(value)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def _accuracy_line(label: str, eval_rows: list[dict[str, Any]], key: str) -> str | None:
    rows = [r for r in eval_rows if r.get(key) is not None]
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    if len(rows) == 1:
        return f"{label}: {first[key]:.1%} (step {first['step']}; one evaluation)"
    gain = 100 * (last[key] - first[key])
    return (f"{label}: {first[key]:.1%} -> {last[key]:.1%} ({gain:+.1f} points, "
            f"step {first['step']} -> {last['step']})")


def _timing_lines(train_rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in train_rows for k in r if k.startswith("time/")})
    means = {k: sum(_values(train_rows, k)) / len(_values(train_rows, k))
             for k in keys if _values(train_rows, k)}
    step_mean = means.get("time/step")
    lines = ["mean time per step by stage:"] if means else []
    for key in sorted(means, key=lambda k: -means[k]):
        share = f"  ({means[key] / step_mean:.0%})" if step_mean and key != "time/step" else ""
        lines.append(f"  {key[len('time/'):]:<16} {means[key]:8.2f} s{share}")
    return lines


def summarize(run_dir: str | Path) -> str:
    """Write ``run_dir/summary.txt``: accuracy before -> after, pass@1, steps, wall time, time per
    stage and the reward trend (mean of the first 5 vs the last 5 steps). Returns the text."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    train_rows = [r for r in rows
                  if any(k not in _RESERVED and not k.startswith("eval/") for k in r)]
    lines = [f"run: {run_dir}"]
    accuracy = _accuracy_line("held-out accuracy", eval_rows, "eval/accuracy")
    lines.append(accuracy or "held-out accuracy: no evaluation logged")
    brief = _accuracy_line("  on problems the base model answered briefly", eval_rows,
                           "eval/accuracy_brief")
    pass1 = _accuracy_line("pass@1", eval_rows, "eval/pass@1")
    if accuracy and not pass1:  # the held-out evaluation decodes greedily: one sample per problem
        pass1 = "pass@1: equal to the held-out (greedy) accuracy"
    lines += [line for line in (brief, pass1) if line]
    lines.append(f"steps: {len(train_rows)}")
    step_times = _values(train_rows, "time/step")
    if step_times and len(step_times) == len(train_rows):
        wall = sum(step_times)
    else:  # no per-step timing: span of the log (excludes the first step's own duration)
        wall = rows[-1]["wall_time"] - rows[0]["wall_time"] if rows else 0.0
    lines.append(f"total wall time: {_format_duration(wall)} ({wall:.0f} s)")
    lines += _timing_lines(train_rows)
    rewards = _values(train_rows, "reward/mean")
    if rewards:
        head, tail = rewards[:5], rewards[-5:]
        lines.append(f"reward mean: first {len(head)} steps {sum(head) / len(head):.3f}, "
                     f"last {len(tail)} steps {sum(tail) / len(tail):.3f}")
    text = "\n".join(lines) + "\n"
    (run_dir / SUMMARY_FILE).write_text(text, encoding="utf-8")
    return text
