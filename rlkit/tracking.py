"""Experiment trackers behind one interface: TensorBoard, Weights & Biases, MLflow (``report_to``).

``report_to`` follows TRL's convention (a list of backend names). Each backend receives the run's
config, run name and tags at start, then per-step scalars, text blocks, evaluation tables and PNG
images. :class:`rlkit.metrics.MetricsLogger` fans its calls out to the opened trackers; the JSONL
file it writes is always there whatever ``report_to`` says.

* ``tensorboard``: event files in ``run_dir/tb`` (a base dependency).
* ``wandb``: ``pip install 'rlkit[wandb]'``. Project from ``WANDB_PROJECT`` (default ``rlkit``);
  ``WANDB_MODE=offline`` writes the run under ``run_dir/wandb`` for a later ``wandb sync``.
* ``mlflow``: ``pip install 'rlkit[mlflow]'``. Tracking server from ``MLFLOW_TRACKING_URI``; when it
  is unset, a file store in ``run_dir/mlruns`` (open with ``mlflow ui --backend-store-uri ...``).
  Experiment from ``MLFLOW_EXPERIMENT_NAME`` (default ``rlkit``). MLflow metric names may not hold
  ``@``: ``eval/pass@4`` is logged as ``eval/pass_at_4``.

A resumed run (``resume=True``) continues the same W&B / MLflow run: their ids are kept in
``run_dir/trackers.json``. Steps re-run after the checkpoint are purged from TensorBoard; W&B keeps
the first value logged at a step, MLflow keeps both.

Every backend imports its library only when opened, so importing this module is free.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "trackers.json"

# name -> (module that must import, pip extra that provides it)
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "rlkit"),
    "wandb": ("wandb", "rlkit[wandb]"),
    "mlflow": ("mlflow", "rlkit[mlflow]"),
}


def check_available(report_to: Sequence[str]) -> None:
    """Raise ``ValueError`` saying what to install when a tracker named in ``report_to`` is missing.

    Called at config validation, before any worker starts.

    >>> check_available(["tensorboard"])
    >>> check_available(["neptune"])
    Traceback (most recent call last):
    ...
    ValueError: report_to: unknown tracker 'neptune'; valid: ['mlflow', 'tensorboard', 'wandb']
    """
    for name in report_to:
        if name not in REQUIREMENTS:
            raise ValueError(f"report_to: unknown tracker {name!r}; valid: {sorted(REQUIREMENTS)}")
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"report_to includes {name!r} but the {module} package is not installed: "
                             f"pip install '{extra}'")


class Tracker(Protocol):
    """What every backend implements. Values are finite floats; ``None`` values never reach it."""

    def log_scalars(self, step: int, values: Mapping[str, float], wall_time: float) -> None: ...
    def log_text(self, tag: str, text: str, step: int) -> None: ...
    def log_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...
    def log_image(self, tag: str, path: Path, step: int) -> None: ...
    def truncate_after(self, step: int) -> None: ...
    def close(self) -> None: ...


def _state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _remember(run_dir: Path, key: str, value: str) -> None:
    state = _state(run_dir)
    state[key] = value
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, run_dir / STATE_FILE)


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


class TensorBoardTracker:
    """Scalars, text, tables (as markdown text) and images in ``run_dir/tb``."""

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any] | None = None, run_name: str = "",
                 tags: Sequence[str] = (), resume: bool = False):
        self.dir = run_dir / "tb"
        self._purge_step: int | None = None
        self._writer: Any = None
        self._header = []
        if config is not None:
            import yaml

            self._header.append(("config", f"```\n{yaml.safe_dump(dict(config), sort_keys=False)}```"))
        if run_name or tags:
            self._header.append(("run", f"name: {run_name}  \ntags: {', '.join(tags) or '-'}"))

    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes TensorBoard discard events at steps >= it from earlier event files.
            self._writer = SummaryWriter(str(self.dir), purge_step=self._purge_step)
            for tag, text in self._header:
                self._writer.add_text(tag, text, 0)
            self._header = []
        return self._writer

    def log_scalars(self, step: int, values: Mapping[str, float], wall_time: float) -> None:
        w = self.writer()
        for key, value in values.items():
            w.add_scalar(key, value, step, walltime=wall_time)
        w.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer().add_text(tag, text, step)
        self.writer().flush()

    def log_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.log_text(tag, _markdown_table(columns, rows), step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        from matplotlib.image import imread

        self.writer().add_image(tag, imread(str(path))[..., :3], step, dataformats="HWC")
        self.writer().flush()

    def truncate_after(self, step: int) -> None:
        self._purge_step = int(step) + 1
        if self._writer is not None:  # reopen so the new writer records the purge
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker:
    """A W&B run named ``run_name`` with ``tags`` and the config; resumed by id from ``trackers.json``."""

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any] | None = None, run_name: str = "",
                 tags: Sequence[str] = (), resume: bool = False):
        import wandb

        self._wandb = wandb
        previous = _state(run_dir).get("wandb") if resume else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlkit"), name=run_name or None,
                              tags=list(tags) or None, config=dict(config or {}), dir=str(run_dir),
                              id=previous, resume="allow" if previous else None, reinit="create_new")
        _remember(run_dir, "wandb", self.run.id)

    def log_scalars(self, step: int, values: Mapping[str, float], wall_time: float) -> None:
        self.run.log(dict(values), step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.run.summary[tag] = text

    def log_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({tag: self._wandb.Table(columns=columns, data=[[str(c) for c in r] for r in rows])}, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self._wandb.Image(str(path))}, step=step)

    def truncate_after(self, step: int) -> None:
        pass  # W&B keeps the first value of a step; later writes to an earlier step are dropped

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / : space``).

    >>> mlflow_key("eval/pass@4"), mlflow_key("eval/reasoning_gym/basic_arithmetic/maj@8")
    ('eval/pass_at_4', 'eval/reasoning_gym/basic_arithmetic/maj_at_8')
    """
    return _MLFLOW_BAD.sub("_", key.replace("@", "_at_"))


class MLflowTracker:
    """An MLflow run: flattened config as params (and ``config.json``), tags, metrics, artifacts."""

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any] | None = None, run_name: str = "",
                 tags: Sequence[str] = (), resume: bool = False):
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # No server configured: a file store in the run directory (MLflow 3 asks for an explicit
            # opt-in to file stores).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        else:
            uri = os.environ["MLFLOW_TRACKING_URI"]
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlkit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        previous = _state(run_dir).get("mlflow") if resume else None
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            run_tags = {t: "true" for t in tags}
            run_tags.update({"rlkit.tags": ",".join(tags), "mlflow.runName": run_name or run_dir.name})
            self.run_id = self.client.create_run(experiment_id, tags=run_tags, run_name=run_name or None).info.run_id
            _remember(run_dir, "mlflow", self.run_id)
            if config is not None:
                self._log_config(config)

    def _log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, dict(config), "config.json")

    def log_scalars(self, step: int, values: Mapping[str, float], wall_time: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall_time * 1000)
        metrics = [Metric(mlflow_key(k), float(v), ms, step) for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt")

    def log_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.client.log_dict(self.run_id, {"step": step, "columns": columns, "rows": rows},
                             f"{tag}/step_{step:07d}.json")

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(tag).parent) if "/" in tag else None)

    def truncate_after(self, step: int) -> None:
        pass  # MLflow keeps every value; re-run steps appear twice in its history

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}


def open_trackers(report_to: Sequence[str], run_dir: str | Path, *, config: Mapping[str, Any] | None = None,
                  run_name: str | None = None, tags: Sequence[str] = (), resume: bool = False) -> list[Any]:
    """Start one tracker per name in ``report_to`` (checked with :func:`check_available` first)."""
    check_available(report_to)
    run_dir = Path(run_dir)
    name = run_name or run_dir.resolve().name
    return [BACKENDS[b](run_dir, config=config, run_name=name, tags=list(tags), resume=resume)
            for b in dict.fromkeys(report_to)]
