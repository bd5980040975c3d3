"""When each actor generates, learns and syncs: wall-clock spans of a run (``timeline: true``).

Every rollout worker and learner rank keeps a :class:`Spans` list of what it did (``generate``,
``sync`` while loading weights, ``eval`` for greedy decoding; ``side passes``, ``learn`` and
``sync`` while gathering and sending its weights), and
the driver adds its own stages (the :class:`rlkit.metrics.StageTimer` stages and ``step``). At the
end of :meth:`rlkit.trainer.Trainer.fit` the driver collects them into ``run_dir/timeline.jsonl``,
one span per line: ``{"who": "rollout 0", "what": "generate", "t0": unix s, "t1": unix s,
"version": int, ...}``, and draws ``plots/timeline.png`` (:func:`plot`). Actor clocks are the
machine's wall clock (``time.time``), so on one node the spans line up; across nodes they are as
good as the nodes' clock synchronization.

Actors always record (a span costs a few hundred bytes, and each actor keeps only its newest
``KEEP``); the driver collects only with ``timeline: true``, once, at the end: a call to a plain
rollout actor queues behind its calls in flight, so a per-step collection would stall an
asynchronous run (docs/async.md).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMELINE_FILE = "timeline.jsonl"
KEEP = 4096
"""Spans an actor keeps (the newest): about 400 steps of a rollout worker's."""
COLORS = {"generate": "tab:blue", "learn": "tab:orange", "sync": "tab:green", "side passes": "tab:purple",
          "eval": "tab:gray", "score": "tab:red", "reference": "tab:purple", "step": "0.85"}


class Spans:
    """Wall-clock spans of one process; thread-safe (a partial-rollout worker syncs on a second thread)."""

    def __init__(self, who: str, enabled: bool = True, keep: int = KEEP) -> None:
        self.who, self.enabled, self.keep = who, enabled, keep
        self._spans: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, what: str, **meta: Any) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.time()
        try:
            yield
        finally:
            self.add(what, t0, time.time(), **meta)

    def add(self, what: str, t0: float, t1: float, **meta: Any) -> None:
        if self.enabled:
            with self._lock:
                self._spans.append({"who": self.who, "what": what, "t0": t0, "t1": t1, **meta})

    def drain(self) -> list[dict[str, Any]]:
        """The spans recorded so far (then forgotten)."""
        with self._lock:
            out, self._spans = list(self._spans), deque(maxlen=self.keep)
        return out


def write(run_dir: str | Path, spans: Iterable[dict[str, Any]]) -> Path:
    """Append ``spans`` to ``run_dir/timeline.jsonl``, sorted by start time."""
    path = Path(run_dir) / TIMELINE_FILE
    with path.open("a") as f:
        for s in sorted(spans, key=lambda s: s["t0"]):
            f.write(json.dumps(s) + "\n")
    return path


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / TIMELINE_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_window(spans: list[dict[str, Any]], first: int, last: int) -> tuple[float, float] | None:
    """Start of the driver's step ``first`` and end of its step ``last`` (1-based, as logged)."""
    steps = sorted((s for s in spans if s["who"] == "driver" and s["what"] == "step"), key=lambda s: s["t0"])
    if len(steps) < first:
        return None
    last = min(last, len(steps))
    return steps[first - 1]["t0"], steps[last - 1]["t1"]


def draw(ax: Any, spans: list[dict[str, Any]], window: tuple[float, float] | None = None,
         title: str | None = None) -> None:
    """One lane per actor (driver stages, rollout workers, learner ranks), one bar per span;
    seconds from the window's start. Driver steps are drawn as a light band with their number."""
    if not spans:
        ax.set_title(title or "timeline: no spans")
        return
    t_from, t_to = window or (min(s["t0"] for s in spans), max(s["t1"] for s in spans))
    shown = [s for s in spans if s["t1"] > t_from and s["t0"] < t_to]
    order = {"driver": 0}
    lanes = sorted({s["who"] for s in shown}, key=lambda w: (order.get(w, 1 if w.startswith("rollout") else 2), w))
    seen: set[str] = set()
    for y, who in enumerate(reversed(lanes)):
        for s in (s for s in shown if s["who"] == who):
            x0, x1 = max(s["t0"], t_from) - t_from, min(s["t1"], t_to) - t_from
            what = s["what"]
            if who == "driver" and what != "step":
                continue
            label = None if what in seen else what
            seen.add(what)
            ax.broken_barh([(x0, max(x1 - x0, 1e-3))], (y - 0.35, 0.7), color=COLORS.get(what, "tab:brown"),
                           label=label, edgecolor="none")
            if who == "driver":
                ax.text((x0 + x1) / 2, y, f"step {s.get('step', '')}", ha="center", va="center", fontsize=7)
            elif what == "generate" and "version" in s:
                ax.text(x0, y + 0.38, f"v{s['version']}", fontsize=6, va="bottom")
    ax.set_yticks(range(len(lanes)), list(reversed(lanes)))
    ax.set_xlim(0, t_to - t_from)
    ax.set_xlabel("seconds")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=7, ncol=4)


def plot(run_dir: str | Path, path: str | Path | None = None, steps: tuple[int, int] | None = None) -> Path | None:
    """``plots/timeline.png`` of a run (or ``path``), for driver steps ``steps`` (default: all)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spans = read(run_dir)
    if not spans:
        return None
    window = step_window(spans, *steps) if steps else None
    fig = Figure(figsize=(11, 3.2))
    FigureCanvasAgg(fig)
    draw(fig.add_subplot(1, 1, 1), spans, window, title=f"timeline of {Path(run_dir).name}")
    fig.tight_layout()
    out = Path(path) if path else Path(run_dir) / "plots" / "timeline.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
