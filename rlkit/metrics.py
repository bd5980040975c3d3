"""Run metrics: a crash-safe JSONL log mirrored to the experiment trackers, stage timers, a live
progress bar, and the end-of-run text summary.

Files in a run directory:

* ``metrics.jsonl`` — one JSON object per ``MetricsLogger.log`` call:
  ``{"step": int, "wall_time": unix seconds, "<key>": number or null, ...}``. Several calls may
  share a step (e.g. training metrics, then the evaluation at that step); readers merge them.
  Non-finite values are stored as ``null`` with the key kept, so the file is strict JSON.
* ``eval.jsonl`` (optional) — evaluation rows in the same schema; merged with the above.
* ``eval/step_NNNNNNN.json`` — each evaluation's full report (``rlkit.evaluate.EvalReport``).
* ``tb/``, ``wandb/``, ``mlruns/``, ``trackers.json`` — what the trackers of ``report_to`` write
  (:mod:`rlkit.tracking`).
* ``plots/*.png`` and ``summary.txt`` — written by :meth:`MetricsLogger.finish` (``make_plots``,
  ``summarize``) and sent to the trackers.

Key conventions (issue 4 "Metrics", issue 6, issue 17): ``reward/mean``, ``reward/accuracy``,
``kl/mean``, ``entropy/mean``, ``response/length_mean``, ``time/<stage>`` in seconds
(``time/step`` is the whole step), ``eval/accuracy`` and ``eval/accuracy_brief`` as fractions in
[0, 1] (step 0 holds the evaluation before training), ``eval/mean@n``, ``eval/pass@k``,
``eval/maj@k`` and ``eval/<data source>/<metric>`` (docs/eval.md).

Imports only the standard library at module level: the trackers (torch's TensorBoard writer,
wandb, mlflow) and tqdm load when first needed, so a metrics-only process stays light.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
SUMMARY_FILE = "summary.txt"
EVAL_DIR = "eval"
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
    """Append-only per-step metrics: ``run_dir/metrics.jsonl`` (fsync'd per line) + the trackers.

    ``report_to`` names the trackers (:mod:`rlkit.tracking`; TRL's convention); without it,
    ``tensorboard=True`` (the default) means ``["tensorboard"]``. ``run_name`` (default: the run
    directory's name), ``tags`` and ``config`` (the resolved run config) go to the trackers at start.

    ``resume=False`` starts a fresh file (stale lines of an earlier run would corrupt the curves);
    ``resume=True`` keeps it, and the caller then calls ``truncate_after(resumed_step)`` so steps
    re-run after the checkpoint are not logged twice.
    """

    def __init__(self, run_dir: str | Path, *, report_to: Sequence[str] | None = None, tensorboard: bool = True,
                 run_name: str | None = None, tags: Sequence[str] = (), config: Mapping[str, Any] | None = None,
                 resume: bool = False):
        from rlkit.tracking import check_available, open_trackers

        if report_to is None:
            report_to = ["tensorboard"] if tensorboard else []
        check_available(report_to)  # before any file is touched
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume:
            _rewrite_jsonl(self.path, max_step=None)  # drops a torn last line before appending
        else:
            self.path.write_text("", encoding="utf-8")
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._last_step = 0
        self.trackers = open_trackers(report_to, self.run_dir, config=config, run_name=run_name, tags=tags,
                                      resume=resume)

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
        self._last_step = max(self._last_step, row["step"])
        # Non-finite values stay out of the trackers (they wreck axis scaling); the JSONL keeps them as null.
        values = {k: v for k, v in row.items() if k not in _RESERVED and v is not None}
        for tracker in self.trackers:
            tracker.log_scalars(row["step"], values, row["wall_time"])

    def log_eval(self, step: int, report: Any, *, metrics: bool = True) -> None:
        """Log an evaluation (``rlkit.evaluate.EvalReport``): its metrics, its report as
        ``eval/step_NNNNNNN.json``, and its table to the trackers. ``metrics=False`` when the caller
        already logged ``report.metrics`` (e.g. in the same row as the step's training metrics)."""
        if metrics:
            self.log(step, report.metrics)
        report.save(self.run_dir / EVAL_DIR / f"step_{int(step):07d}.json")
        columns, rows = eval_table_rows(report.to_json())
        for tracker in self.trackers:
            tracker.log_table("eval/table", columns, rows, int(step))

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > ``step`` from the JSONL, the evaluation reports and the trackers
        that can forget (TensorBoard)."""
        if self._file is not None:
            self._file.close()
        _rewrite_jsonl(self.path, max_step=int(step))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        for report in (self.run_dir / EVAL_DIR).glob("step_*.json"):
            if _step_of(report) > int(step):
                report.unlink()
        self._last_step = int(step)
        for tracker in self.trackers:
            tracker.truncate_after(int(step))

    def log_text(self, tag: str, text: str) -> None:
        """Record a text block (e.g. the final summary) in the trackers."""
        for tracker in self.trackers:
            tracker.log_text(tag, text, self._last_step)

    def finish(self) -> str:
        """End of run: write ``plots/*.png`` and ``summary.txt``, send them to the trackers, close.

        Returns the summary text."""
        from rlkit.plots import make_plots

        if self._file is not None:
            self._file.flush()
        paths = make_plots(self.run_dir)
        text = summarize(self.run_dir)
        for tracker in self.trackers:
            for path in paths:
                tracker.log_image(f"plots/{path.stem}", path, self._last_step)
            tracker.log_text("summary", text, self._last_step)
        self.close()
        return text

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("_")[-1])
    except ValueError:
        return -1


def eval_table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """An evaluation report's table (``EvalReport.to_json()``) as columns and rows of numbers:
    per metric its value and 95 % interval bounds (None where there is none)."""
    table = report.get("table") or []
    names = list(table[0]["metrics"]) if table else []
    columns = ["source", "problems"]
    for name in names:
        columns += [name, f"{name} ci95 low", f"{name} ci95 high"]
    rows = []
    for row in table:
        cells: list[Any] = [row["source"], row["problems"]]
        for name in names:
            cell = row["metrics"][name]
            ci = cell.get("ci95") or [None, None]
            cells += [cell["value"], *ci]
        rows.append(cells)
    return columns, rows


def latest_eval_report(run_dir: str | Path) -> tuple[int, dict[str, Any]] | None:
    """(step, report JSON) of the newest ``eval/step_*.json`` in a run, or None."""
    reports = sorted((Path(run_dir) / EVAL_DIR).glob("step_*.json"), key=_step_of)
    for path in reversed(reports):
        try:
            return _step_of(path), json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


class StageTimer:
    """Wall-clock seconds per stage of the current step: ``with timer("generate"): ...``.

    Repeated entries of a stage add up; nesting is allowed (``with timer("step")`` around the
    others gives ``time/step``). ``pop()`` returns ``{"time/<stage>": seconds}`` and resets.
    """

    def __init__(self, spans: Any = None) -> None:
        self._seconds: dict[str, float] = {}
        self.spans = spans
        """An optional :class:`rlkit.timeline.Spans` that also records each stage's wall-clock span."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._seconds[stage] = self._seconds.get(stage, 0.0) + elapsed
            if self.spans is not None:
                self.spans.add(stage, wall, wall + elapsed)

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

    With ``max_minutes`` (``train.max_minutes``) the run ends after the first step whose training
    time passes it, so the ETA counts to the earlier of ``total_steps`` and that step: training
    time is ``progress/train_minutes`` when the metrics carry it (the sum of step times), and the
    mean ``time/step`` of this session (else the wall time per step) projects the steps left.
    """

    def __init__(self, total_steps: int, *, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, max_minutes: float | None = None):
        self.total = int(total_steps)
        self.enabled = enabled
        self.max_minutes = max_minutes
        self.stream = stream if stream is not None else sys.stdout
        self._initial = int(initial)
        self._start = time.perf_counter()
        self._last: dict[str, float | int | None] = {}
        self._step_seconds: list[float] = []
        self._train_minutes: float | None = None
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
        if metrics.get("time/step") is not None:
            self._step_seconds.append(float(to_scalar("time/step", metrics["time/step"]) or 0.0))
        if metrics.get("progress/train_minutes") is not None:
            self._train_minutes = float(to_scalar("progress/train_minutes", metrics["progress/train_minutes"]))
        fields = self.fields()
        if metrics.get("hack/alerts"):
            from rlkit.rewards.hacks import alert_line

            fields += " | " + alert_line({k: to_scalar(k, v) for k, v in metrics.items() if k.startswith("hack/")})
        last, limited = self.projected_last_step(step)
        if self._bar is not None:
            if self._bar.total != last:
                self._bar.total = last  # the bar (and tqdm's ETA) count to the time limit's step
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(fields + (" | time limit" if limited else ""), refresh=True)
            return
        done = step - self._initial
        eta = ""
        if 0 < done and step < last:
            per_step = (time.perf_counter() - self._start) / done
            eta = f" | eta {_format_duration(per_step * (last - step))}" + (" (time limit)" if limited else "")
        print(f"step {step}/{self.total} | {fields}{eta}", file=self.stream, flush=True)

    def projected_last_step(self, step: int) -> tuple[int, bool]:
        """(the step the run is expected to end at, whether ``max_minutes`` is what ends it)."""
        done = step - self._initial
        if self.max_minutes is None or done <= 0:
            return self.total, False
        elapsed = time.perf_counter() - self._start
        per_step_s = (sum(self._step_seconds) / len(self._step_seconds)) if self._step_seconds else elapsed / done
        train_minutes = self._train_minutes if self._train_minutes is not None else elapsed / 60
        left_s = 60 * self.max_minutes - 60 * train_minutes
        # The trainer stops after the first step that ends past the limit: that step still runs.
        steps_left = 0 if left_s < 0 else math.floor(left_s / max(per_step_s, 1e-9)) + 1
        last = step + steps_left
        return (last, True) if last < self.total else (self.total, False)

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
    stage, the reward trend (mean of the first 5 vs the last 5 steps) and the table of the latest
    evaluation report (``eval/step_*.json``: per data source, with 95 % intervals). Returns the text."""
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
    strict = _accuracy_line("strict (literal) score", eval_rows, "eval/strict_accuracy")
    lines += [line for line in (brief, pass1, strict) if line]
    flagged = [r for r in eval_rows if r.get("eval/strict_flag")]
    if flagged:
        worst = max(flagged, key=lambda r: r["eval/strict_gap"])
        lines.append(f"strict-score gap: the verifier's accuracy exceeds the strict score by more than the limit at "
                     f"{len(flagged)} of {len(eval_rows)} evaluations (largest {100 * worst['eval/strict_gap']:.1f} "
                     f"points, step {worst['step']}): read eval/step_*.json")
    from rlkit.rewards.hacks import run_summary

    hack = run_summary(train_rows)
    if hack:
        lines.append(hack)
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
    latest = latest_eval_report(run_dir)
    if latest is not None:
        from rlkit.evaluate import table_text

        step, report = latest
        lines += ["", table_text(report, title=f"evaluation at step {step}").rstrip("\n")]
    text = "\n".join(lines) + "\n"
    (run_dir / SUMMARY_FILE).write_text(text, encoding="utf-8")
    return text
