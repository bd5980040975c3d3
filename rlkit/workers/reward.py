"""Reward worker: scores completions with weighted reward functions, in child processes, fail-loud.

score_i = Σ_c w_c · r_c(i) over the components c that scored sample i (a ``None`` is skipped).
Each sample gets a status per component, ``ok`` / ``invalid`` (NaN, inf, not a number, wrong
length) / ``error`` (raised, crashed, out of memory) / ``timeout`` (child killed), and its overall
status is the worst of them. A non-ok sample is never a silent 0: it is counted in the metrics,
logged at WARNING, and handled by ``RewardConfig.on_error``:

* ``zero``: its score is 0.0;
* ``drop_group``: its score is 0.0 and ``keep`` is False for every sample of its group (same
  ``fields["group_id"]``, else same prompt), which the trainer drops;
* ``stop``: :class:`RewardError` is raised with the counts and the first messages.

Peers' failures this avoids: verl PR#5635 (math-verify's ``signal.alarm`` raised inside Ray worker
threads and every MATH score became 0) and OpenRLHF's ``agent.py`` (reward exceptions logged at
INFO and scored 0).

``RewardWorker`` is a plain class (usable in-process); ``make_reward_actor`` wraps it as a Ray actor.
Ray is imported only there.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from rlkit.rewards.config import RewardConfig, RewardSpec
from rlkit.rewards.registry import STATUSES, resolve

from .reward_pool import Outcome, RewardPool, Task

logger = logging.getLogger(__name__)

_SEVERITY = {s: i for i, s in enumerate(STATUSES)}  # ok < invalid < error < timeout
_MAX_MESSAGES = 20

__all__ = ["RewardBatchResult", "RewardConfig", "RewardError", "RewardSpec", "RewardWorker", "make_reward_actor"]


class RewardError(RuntimeError):
    """Raised by :meth:`RewardWorker.score` under ``on_error="stop"`` when a sample is not ok."""


@dataclass
class RewardBatchResult:
    """Scores of one batch. Lists are in input order, length B."""

    scores: list[float]
    """Σ_c w_c · r_c per sample; 0.0 for non-ok samples (``zero`` and ``drop_group``)."""
    components: dict[str, list[Optional[float]]]
    """Unweighted value of each component; None where it gave no score or was not ok."""
    status: list[str]
    """Worst status over the components (``invalid`` too when no component scored the sample)."""
    status_by_component: dict[str, list[str]]
    metrics: dict[str, float]
    """Flat metrics (see :func:`batch_metrics`); keys have no ``reward/`` prefix."""
    keep: list[bool] = field(default_factory=list)
    """False for samples whose group is dropped (``drop_group``); all True otherwise."""
    errors: list[str] = field(default_factory=list)
    """The first messages of non-ok samples: ``"sample 3 [math] timeout: ..."``."""


class RewardWorker:
    """Runs ``cfg.rewards`` over batches in ``cfg.num_procs`` persistent child processes."""

    def __init__(self, cfg: RewardConfig):
        if isinstance(cfg, dict):
            cfg = RewardConfig(**cfg)
        self.cfg = cfg
        self.names = cfg.component_names()
        # Resolve here first: a bad name or signature fails in the driver, naming the function.
        resolved = [resolve(s.name, s.kwargs) for s in cfg.rewards]
        self.labels = [r.label for r in resolved]
        specs = [(s.name, dict(s.kwargs)) for s in cfg.rewards]
        self.pool = RewardPool(specs, self.labels, cfg.num_procs, cfg.memory_mb)
        self.totals: Counter = Counter()
        """Run-wide counts: ``samples``, ``not_ok``, ``unscored`` and ``<component>/<status>`` (non-ok)."""

    def score(
        self,
        completions: list[str],
        prompts: list[str],
        fields: list[dict],
        data_sources: Optional[list[str]] = None,
    ) -> RewardBatchResult:
        """Score B samples; ``fields[i]`` are sample i's dataset columns (``answer`` for ``math``).

        ``data_sources`` (default: each row's ``data_source`` field, else ``"default"``) splits the
        metrics and is passed to reward functions as the ``data_source`` column.
        """
        t0 = time.monotonic()
        n = len(completions)
        if len(prompts) != n or len(fields) != n or (data_sources is not None and len(data_sources) != n):
            raise ValueError(
                f"score: {n} completions, {len(prompts)} prompts, {len(fields)} fields rows, "
                f"{None if data_sources is None else len(data_sources)} data sources: lengths must match"
            )
        if data_sources is None:
            data_sources = [str(f.get("data_source", "default")) for f in fields]
        sources = list(data_sources)
        columns = _columns(fields)
        columns.setdefault("data_source", sources)  # rewards may branch on it, as in verl
        respawns0, retried0 = self.pool.respawns, self.pool.retried
        tasks = [
            Task(c, list(range(a, b)), completions[a:b], prompts[a:b], {k: v[a:b] for k, v in columns.items()})
            for c in range(len(self.names))
            for a, b in _chunks(n, self.cfg.batch_size, self.cfg.num_procs)
        ]
        outcomes = self.pool.run(tasks, self.cfg.timeout_s, self.cfg.max_consecutive_timeouts)
        values, status_c, messages = self._gather(outcomes, n)
        result = self._combine(values, status_c, messages, prompts, fields)
        result.metrics.update(batch_metrics(self.cfg, self.names, values, status_c, result, sources))
        elapsed = time.monotonic() - t0
        result.metrics["respawns"] = float(self.pool.respawns - respawns0)
        result.metrics["retried_samples"] = float(self.pool.retried - retried0)
        result.metrics["seconds"] = elapsed
        result.metrics["samples_per_s"] = n / elapsed if elapsed > 0 else 0.0
        self._account(result)
        return result

    def _gather(self, outcomes: list[Outcome], n: int):
        C = len(self.names)
        values: list[list[Optional[float]]] = [[None] * n for _ in range(C)]
        status_c = [["ok"] * n for _ in range(C)]
        messages: list[tuple[int, int, str, str]] = []
        for out in outcomes:
            for i, (st, val, msg) in zip(out.task.idx, out.results):
                values[out.task.comp][i] = val if st == "ok" else None
                status_c[out.task.comp][i] = st
                if st != "ok":
                    messages.append((i, out.task.comp, st, msg))
        messages.sort()
        return values, status_c, messages

    def _combine(self, values, status_c, messages, prompts, fields) -> RewardBatchResult:
        n, weights = len(prompts), [s.weight for s in self.cfg.rewards]
        status, scores = [], []
        for i in range(n):
            st = max((status_c[c][i] for c in range(len(weights))), key=_SEVERITY.__getitem__)
            scored = [(w, values[c][i]) for c, w in enumerate(weights) if values[c][i] is not None]
            if st == "ok" and not scored:
                st = "invalid"
                messages.append((i, -1, "invalid", "no reward component scored this sample (all returned None)"))
            status.append(st)
            scores.append(math.fsum(w * v for w, v in scored) if st == "ok" else 0.0)
        keep = [True] * n
        if self.cfg.on_error == "drop_group":
            group = [f.get("group_id", p) for f, p in zip(fields, prompts)]
            bad = {group[i] for i in range(n) if status[i] != "ok"}
            keep = [g not in bad for g in group]
        names = self.names
        errors = [f"sample {i} [{names[c] if c >= 0 else 'total'}] {st}: {msg}" for i, c, st, msg in sorted(messages)]
        return RewardBatchResult(
            scores=scores,
            components={names[c]: values[c] for c in range(len(names))},
            status=status,
            status_by_component={names[c]: status_c[c] for c in range(len(names))},
            metrics={},
            keep=keep,
            errors=errors[:_MAX_MESSAGES],
        )

    def _account(self, result: RewardBatchResult) -> None:
        """Count, log at WARNING, and apply ``stop``: a non-ok sample is never silent."""
        n = len(result.status)
        n_bad = sum(st != "ok" for st in result.status)
        bad = Counter(f"{name}/{st}" for name, sts in result.status_by_component.items() for st in sts if st != "ok")
        bad["unscored"] = sum(  # ok everywhere but every component returned None
            st == "invalid" and all(s[i] == "ok" for s in result.status_by_component.values())
            for i, st in enumerate(result.status))
        bad = +bad
        self.totals.update(bad)
        self.totals["samples"] += n
        self.totals["not_ok"] += n_bad
        if not n_bad:
            return
        summary = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        first = "; ".join(result.errors[:3])
        if self.cfg.on_error == "stop":
            raise RewardError(f"{n_bad}/{n} samples not ok ({summary}); on_error=stop. First: {first}")
        logger.warning("reward: %d/%d samples not ok (%s; on_error=%s). First: %s",
                       n_bad, n, summary, self.cfg.on_error, first)

    def ready(self) -> dict[str, int]:
        import os

        return {"pid": os.getpid()}

    def stats(self) -> dict[str, int]:
        """Run-wide counts: ``samples``, ``not_ok``, ``unscored`` and ``<component>/<status>`` (non-ok)."""
        return dict(self.totals)

    def close(self) -> None:
        """Stop the child processes (idempotent)."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
            self.pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the children are daemons and die with us
            pass


def _columns(fields: list[dict]) -> dict[str, list]:
    """Rows of dataset fields → one list per column (a key missing in a row gives None there)."""
    keys: dict[str, None] = {}
    for f in fields:
        keys.update(dict.fromkeys(f))
    return {k: [f.get(k) for f in fields] for k in keys}


def _chunks(n: int, batch_size: int, num_procs: int) -> list[tuple[int, int]]:
    """Contiguous [a, b) ranges of at most ``batch_size``, enough of them to keep every child busy."""
    if n == 0:
        return []
    size = max(1, min(batch_size, -(-n // num_procs)))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def batch_metrics(cfg, names, values, status_c, result: RewardBatchResult, sources: list[str]) -> dict[str, float]:
    """Status rates and score summaries: overall, per component, per component × data source.

    Keys: ``score/mean``, ``status/<s>_rate``, ``dropped_rate``, ``<comp>/mean``,
    ``<comp>/<s>_rate`` (s ∈ error, timeout, invalid) and ``<comp>/none_rate``,
    ``<comp>/hist/<k>`` (fraction of scored samples in bin k of ``cfg.hist_range``, plus
    ``below``/``above``), and ``<comp>/<source>/{mean,error_rate,timeout_rate,invalid_rate}``
    when the batch has more than one data source.
    """
    n = len(result.status)
    m: dict[str, float] = {}
    if n == 0:
        return m
    ok_scores = [s for s, st in zip(result.scores, result.status) if st == "ok"]
    m["score/mean"] = sum(ok_scores) / len(ok_scores) if ok_scores else 0.0
    for s in STATUSES[1:]:
        m[f"status/{s}_rate"] = sum(st == s for st in result.status) / n
    m["dropped_rate"] = sum(not k for k in result.keep) / n
    groups = {"": list(range(n))}
    if len(set(sources)) > 1:
        for i, src in enumerate(sources):
            groups.setdefault(f"/{src}", []).append(i)
    for c, name in enumerate(names):
        for suffix, idx in groups.items():
            m.update(_component_metrics(f"{name}{suffix}", [values[c][i] for i in idx], [status_c[c][i] for i in idx]))
        m.update(_histogram(f"{name}/hist", [v for v in values[c] if v is not None], cfg.hist_bins, cfg.hist_range))
    return m


def _component_metrics(prefix: str, vals: list, sts: list[str]) -> dict[str, float]:
    n = len(sts)
    scored = [v for v, st in zip(vals, sts) if st == "ok" and v is not None]
    out = {f"{prefix}/mean": sum(scored) / len(scored) if scored else 0.0}
    for s in STATUSES[1:]:
        out[f"{prefix}/{s}_rate"] = sum(st == s for st in sts) / n
    out[f"{prefix}/none_rate"] = sum(st == "ok" and v is None for v, st in zip(vals, sts)) / n
    return out


def _histogram(prefix: str, vals: list[float], bins: int, rng: tuple[float, float]) -> dict[str, float]:
    lo, hi = rng
    counts = [0] * bins
    below = above = 0
    for v in vals:
        if v < lo:
            below += 1
        elif v > hi:
            above += 1
        else:
            counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1  # v == hi goes in the last bin
    total = max(1, len(vals))
    out = {f"{prefix}/{k:02d}": c / total for k, c in enumerate(counts)}
    out[f"{prefix}/below"] = below / total
    out[f"{prefix}/above"] = above / total
    return out


def make_reward_actor(cfg: RewardConfig, **ray_options: Any):
    """A Ray actor running :class:`RewardWorker` (``ray.remote(RewardWorker)``, created on first use).

    ``ray_options`` go to ``.options()`` (e.g. ``num_cpus=0``: the actor only dispatches; its
    children do the work). Call ``actor.close.remote()`` before killing it.
    """
    import ray

    actor_cls = ray.remote(RewardWorker)
    return actor_cls.options(**ray_options).remote(cfg) if ray_options else actor_cls.remote(cfg)
