"""Run metrics, plots and progress display (rlkit.metrics, rlkit.plots): CPU, a few seconds."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rlkit.metrics import MetricsLogger, Progress, StageTimer, read_metrics, summarize, to_scalar
from rlkit.plots import make_plots, moving_average


def _rows(run_dir: Path) -> list[dict]:
    # parse_constant rejects NaN/Infinity: the file must be strict JSON.
    def strict(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=strict) for line in text.splitlines()]


def test_log_writes_plain_json_rows(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"reward/mean": 0.25, "kl/mean": np.float32(0.5), "tokens": np.int64(640)})
        log.log(2, {"reward/mean": torch.tensor(0.75), "response/length_mean": torch.tensor([31])})
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.25 and rows[0]["kl/mean"] == 0.5
    assert rows[0]["tokens"] == 640 and isinstance(rows[0]["tokens"], int)
    assert rows[1]["reward/mean"] == 0.75 and rows[1]["response/length_mean"] == 31
    assert rows[0]["wall_time"] <= rows[1]["wall_time"]


def test_non_finite_values_are_null_with_key_kept(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"a": math.nan, "b": math.inf, "c": torch.tensor(-math.inf),
                    "d": np.float64("nan"), "e": 1.0})
    (row,) = _rows(tmp_path)
    assert row == {"step": 1, "wall_time": row["wall_time"],
                   "a": None, "b": None, "c": None, "d": None, "e": 1.0}


def test_non_numeric_values_rejected_naming_the_key(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"reward/mean": 0.5})
    with pytest.raises(TypeError, match="reward/std"):
        log.log(2, {"reward/mean": 0.5, "reward/std": "0.1"})
    with pytest.raises(ValueError, match="kl/per_token"):
        log.log(2, {"kl/per_token": torch.zeros(3)})
    with pytest.raises(TypeError, match="x"):
        to_scalar("x", None)
    with pytest.raises(ValueError, match="step"):
        log.log(2, {"step": 3})
    log.close()
    # A rejected call writes nothing: the row is validated whole before the write.
    assert [r["step"] for r in _rows(tmp_path)] == [1]


_CRASHING_WRITER = """
import os, sys
from rlkit.metrics import MetricsLogger
log = MetricsLogger(sys.argv[1], tensorboard=False)
for step in range(1, 6):
    log.log(step, {"reward/mean": step / 10})
os._exit(1)  # no close, no interpreter shutdown: only what log() flushed survives
"""


def test_crash_loses_nothing_and_resume_truncates_later_steps(tmp_path):
    subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(tmp_path)], check=False,
                   timeout=60)
    assert [r["reward/mean"] for r in _rows(tmp_path)] == [0.1, 0.2, 0.3, 0.4, 0.5]
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a line torn by a crash mid-write
        f.write('{"step": 6, "reward/me')

    log = MetricsLogger(tmp_path, tensorboard=False, resume=True)
    log.truncate_after(3)  # the checkpoint was at step 3: steps 4-5 are re-run
    log.log(4, {"reward/mean": 0.9})
    log.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["reward/mean"] == 0.9


def test_fresh_logger_replaces_a_stale_file(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(7, {"a": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"a": 2.0})
    assert [(r["step"], r["a"]) for r in _rows(tmp_path)] == [(1, 2.0)]


def _tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_read_back_and_purged_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 5):
            log.log(step, {"reward/mean": step / 4, "kl/mean": math.nan if step == 2 else 0.01})
        log.log_text("summary", "accuracy 22.0% -> 37.5%")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert _tb_scalars(tmp_path, "reward/mean") == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    # The NaN at step 2 stays out of TensorBoard (it is null in the JSONL).
    assert [s for s, _ in _tb_scalars(tmp_path, "kl/mean")] == [1, 3, 4]

    with MetricsLogger(tmp_path, resume=True) as log:
        log.truncate_after(2)
        log.log(3, {"reward/mean": -1.0})
    assert _tb_scalars(tmp_path, "reward/mean") == [(1, 0.25), (2, 0.5), (3, -1.0)]


def test_stage_timer_accumulates_and_resets():
    timer = StageTimer()
    with timer("step"):
        for _ in range(2):
            with timer("generate"):
                time.sleep(0.02)
        with timer("learn"):
            time.sleep(0.01)
    times = timer.pop()
    assert set(times) == {"time/step", "time/generate", "time/learn"}
    assert 0.04 <= times["time/generate"] < 1.0  # sleep never returns early; CI may be slow
    assert 0.01 <= times["time/learn"] < 1.0
    assert times["time/step"] >= times["time/generate"] + times["time/learn"]
    assert timer.pop() == {}


def test_progress_prints_one_line_per_step_without_a_tty():
    out = io.StringIO()
    progress = Progress(10, initial=2, stream=out)
    progress.update(3, {"reward/mean": 0.25, "kl/mean": 0.0012, "time/step": 2.0,
                        "response/length_mean": torch.tensor(31.5)})
    progress.update(4, {"reward/mean": 0.5, "eval/accuracy": 0.375, "kl/mean": math.nan})
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 3/10 | reward 0.250 | kl 0.0012 | len 31.5 | s/step 2.0")
    assert "eta" in lines[0]
    # Values persist until replaced; the absent entropy key is never shown.
    assert "reward 0.500 | eval_acc 37.5% | kl nan | len 31.5" in lines[1]
    assert "ent" not in out.getvalue()


def test_progress_eta_honours_max_minutes():
    """20 steps of 6 s of training each, but a 0.45-minute limit: the run ends after step 5 (the first
    step ending past 27 s, at 30 s), so at step 2 (12 s) the ETA counts 3 more steps, not 18."""
    out = io.StringIO()
    progress = Progress(20, stream=out, max_minutes=0.45)
    progress._start -= 12.0  # two steps' worth of wall time already passed
    progress.update(1, {"time/step": 6.0, "progress/train_minutes": 0.1})
    progress.update(2, {"time/step": 6.0, "progress/train_minutes": 0.2})
    line = out.getvalue().splitlines()[-1]
    assert progress.projected_last_step(2) == (5, True)
    # wall time per step so far ~6 s; 3 steps left -> ~18 s
    assert line.startswith("step 2/20") and "(time limit)" in line
    eta = line.split("eta ")[1].split(" ")[0]
    assert eta in ("0m18s", "0m19s"), line
    # without the limit: 18 steps left -> ~1m48s
    free = Progress(20, stream=io.StringIO(), max_minutes=None)
    assert free.projected_last_step(2) == (20, False)
    # a limit that is not reached before total_steps changes nothing
    loose = Progress(4, stream=io.StringIO(), max_minutes=60)
    loose.update(1, {"time/step": 6.0, "progress/train_minutes": 0.1})
    assert loose.projected_last_step(1) == (4, False)


def test_progress_bar_counts_to_the_time_limit_step():
    out = _Terminal()
    progress = Progress(100, stream=out, max_minutes=0.2)
    progress.update(1, {"time/step": 5.0, "progress/train_minutes": 5 / 60})
    # 7 s of training left at 5 s per step: steps 2 and 3 run (3 ends at 15 s, past the 12 s limit)
    assert progress._bar.total == 3
    progress.close()
    assert "time limit" in out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_tty_and_nothing_when_disabled():
    out = _Terminal()
    progress = Progress(4, stream=out)
    progress.update(1, {"reward/mean": 0.125, "entropy/mean": 0.8})
    progress.close()
    assert "\r" in out.getvalue() and "1/4" in out.getvalue()
    assert "reward 0.125 | ent 0.800" in out.getvalue()
    quiet = io.StringIO()
    Progress(4, enabled=False, stream=quiet).update(1, {"reward/mean": 0.5})
    assert quiet.getvalue() == ""


def _synthetic_run(run_dir: Path) -> None:
    """Step 0 evaluates the base model, 10 training steps, a final evaluation at step 10."""
    with MetricsLogger(run_dir, tensorboard=False) as log:
        log.log(0, {"eval/accuracy": 0.22, "eval/accuracy_brief": 0.30})
        for step in range(1, 11):
            log.log(step, {
                "reward/mean": step / 10 if step != 7 else math.nan,
                "kl/mean": 0.001 * step, "response/length_mean": 40 - step,
                "time/generate": 2.0, "time/learn": 5.0, "time/step": 8.0,
                "reward/accuracy": step / 20,
            })
        log.log(5, {"eval/accuracy": 0.30})  # a second row of the same step merges with it
        log.log(10, {"eval/accuracy": 0.375, "eval/accuracy_brief": 0.41})


def test_summary_reports_before_after_and_timing(tmp_path):
    _synthetic_run(tmp_path)
    merged = read_metrics(tmp_path)
    assert [r["step"] for r in merged] == list(range(11))
    assert merged[5]["eval/accuracy"] == 0.30 and merged[5]["time/learn"] == 5.0
    text = summarize(tmp_path)
    assert (tmp_path / "summary.txt").read_text() == text
    assert "held-out accuracy: 22.0% -> 37.5% (+15.5 points, step 0 -> 10)" in text
    assert "answered briefly: 30.0% -> 41.0%" in text
    assert "pass@1" in text
    assert "steps: 10" in text
    assert "total wall time: 1m20s (80 s)" in text  # 10 steps x 8 s
    assert "learn" in text and "5.00 s  (62%)" in text  # 5 s of an 8 s step
    # Finite rewards 0.1 .. 0.6, 0.8, 0.9, 1.0 (step 7 is null and skipped): last 5 mean 3.8 / 5.
    assert "first 5 steps 0.300, last 5 steps 0.760" in text


def test_make_plots_writes_pngs_and_skips_absent_curves(tmp_path):
    _synthetic_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a key that is only ever null
        f.write(json.dumps({"step": 10, "wall_time": 0.0, "entropy/mean": None}) + "\n")
    paths = make_plots(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "kl.png", "response_length.png", "reward.png",
                     "time_per_step.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_noisy_curves_get_a_moving_average_over_the_raw_points(tmp_path):
    """reward/mean and reward/accuracy are drawn raw (faint) with their moving average on top."""
    from matplotlib.figure import Figure

    from rlkit import plots

    drawn = []
    real_plot = plots.Figure.add_subplot

    def spy(self, *a, **k):  # record what each axes draws, still drawing it
        ax = real_plot(self, *a, **k)
        original = ax.plot

        def plot(*args, **kwargs):
            drawn.append((kwargs.get("label"), np.asarray(args[1], dtype=float)))
            return original(*args, **kwargs)

        ax.plot = plot
        return ax

    _synthetic_run(tmp_path)
    Figure.add_subplot = spy
    try:
        make_plots(tmp_path)
    finally:
        Figure.add_subplot = real_plot
    labels = [label for label, _ in drawn]
    for key in ("reward/mean", "reward/accuracy"):
        assert f"{key} (raw)" in labels and f"{key} (5-step average)" in labels
        raw = next(v for label, v in drawn if label == f"{key} (raw)")
        avg = next(v for label, v in drawn if label == f"{key} (5-step average)")
        np.testing.assert_allclose(avg, moving_average(raw, 5), rtol=1e-12)
    # sparse evaluation points stay as they are
    assert "eval/accuracy" in labels and "eval/accuracy (5-step average)" not in labels


def test_moving_average_ignores_nulls():
    values = np.array([1.0, math.nan, 3.0, 5.0, 7.0, 9.0, 11.0])
    # Trailing window of 5 over finite values: [1], [1], [1,3], [1,3,5], [1,3,5,7], [3,5,7,9], ...
    expected = [1.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0]
    np.testing.assert_allclose(moving_average(values, 5), expected, rtol=1e-12)
    assert math.isnan(moving_average(np.array([math.nan, math.nan]), 5)[1])
