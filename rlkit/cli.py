"""The ``rlkit`` command line (``python -m rlkit`` is the same).

    rlkit train CONFIG [key.sub=value ...] [--resume auto|PATH] [--trust-checkpoint]
    rlkit eval TARGET [DATA] [key.sub=value ...] [--config FILE] [--out DIR] [--seed N]
    rlkit config CONFIG [key.sub=value ...]      # print the validated, fully resolved config
    rlkit plan CONFIG [key.sub=value ...]        # placement, batch arithmetic, memory, sync bytes

A user error (configuration, data, checkpoint, reward loading, evaluation target) prints as one
message and exits with status 2; ``--debug`` on any command, or ``RLKIT_DEBUG=1``, shows the
traceback instead. ``rlkit eval`` is described in docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Exceptions that are the user's to fix, by class (qualified name) -> how the message is headed.
# Matched by name along the exception's MRO so this module imports none of them (nor torch).
USER_ERRORS = {
    "rlkit.config.ConfigError": "configuration error",
    "rlkit.data.DataError": "data error",
    "rlkit.checkpoint.CheckpointError": "checkpoint error",
    "rlkit.rewards.registry.RewardLoadError": "reward error",
    "rlkit.rewards.registry.RewardSignatureError": "reward error",
    "rlkit.cli.EvalTargetError": "evaluation error",
}


class EvalTargetError(ValueError):
    """``rlkit eval`` was given a target or data it cannot evaluate."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of errors (or RLKIT_DEBUG=1)")
    p = argparse.ArgumentParser(prog="rlkit", description="KL-regularized RL post-training for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="run a training job from a YAML config")
    t.add_argument("config", help="YAML file in configs/ (overrides of rlkit.config.RunConfig)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    t.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in run_dir) or a path")
    t.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints written elsewhere (sets RLKIT_TRUST_CHECKPOINTS=1)")
    e = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint, a run's checkpoints or a model",
                       description="TARGET: a run directory (every checkpoint: a curve), a checkpoint "
                                   "(checkpoints/step_N or its hf folder), a model folder, or 'smollm2'. "
                                   "DATA: a data file or save_to_disk folder, 'arithmetic', or a "
                                   "reasoning-gym task; default: the config's eval set.")
    e.add_argument("target")
    e.add_argument("rest", nargs="*", metavar="[DATA] key.sub=value",
                   help="optional DATA, then overrides such as eval.n=8 eval.k=[1,4] data.num_eval=50")
    e.add_argument("--config", default=None, help="YAML config for defaults (default: the run's config.yaml)")
    e.add_argument("--out", default=None, help="output folder (default: next to the target; docs/eval.md)")
    e.add_argument("--seed", type=int, default=None, help="seed of the n samples (default: train.seed)")
    for name, text in (("config", "validate a config and print it fully resolved"),
                       ("plan", "dry run: placement, batch arithmetic, memory and sync bytes; starts nothing")):
        c = sub.add_parser(name, parents=[common], help=text)
        c.add_argument("config")
        c.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("RLKIT_DEBUG", "") not in ("", "0")
    try:
        return _run(args)
    except Exception as e:  # user errors become one message; anything else re-raises
        heading = _user_error(e)
        if heading is None or debug:
            raise
        cause = getattr(e, "cause", None) or e  # an error raised inside a Ray actor carries its cause
        print(f"rlkit: {heading}:\n{cause}\n(run with --debug or RLKIT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2


def _user_error(e: BaseException) -> str | None:
    for cls in type(e).__mro__:
        heading = USER_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if heading is not None:
            return heading
    return None


def _run(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return run_eval(args)
    from rlkit.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command == "plan":
        from rlkit.plan import run_plan

        return run_plan(cfg)
    if args.trust_checkpoint:
        os.environ["RLKIT_TRUST_CHECKPOINTS"] = "1"  # read by rlkit.checkpoint, here and in the actors
    from rlkit.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        final = trainer.fit(resume=args.resume)  # a stop signal exits here with code 75 (requeue)
    finally:
        trainer.close()
    print(trainer.summary)  # plots and summary.txt were written as the run finished
    return 0 if final is not None else 1


# ----------------------------------------------------------------------------------------------
# rlkit eval
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalTarget:
    """What ``rlkit eval TARGET`` evaluates: models by checkpoint step, and where defaults come from."""

    models: list[tuple[int | None, str]]
    """(checkpoint step or None, model folder or 'smollm2'); a run gives its base model as step 0."""
    config: Path | None
    """The run's config.yaml, or None (defaults)."""
    out: Path
    curve: bool


def _checkpoint_target(ckpt: Path) -> EvalTarget:
    from rlkit.checkpoint import CheckpointError

    if not (ckpt / "COMPLETE").is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no COMPLETE marker)")
    step = int(ckpt.name.split("_")[-1])
    return EvalTarget([(step, str(ckpt / "hf"))], ckpt / "config.yaml", ckpt.parent.parent / "eval-cli", False)


def resolve_target(target: str) -> EvalTarget:
    """Classify TARGET: 'smollm2', a run directory, a checkpoint (or its hf folder), a model folder."""
    if target == "smollm2":
        return EvalTarget([(None, "smollm2")], None, Path("smollm2-eval"), False)
    path = Path(target).resolve()
    if not path.is_dir():
        raise EvalTargetError(f"{target}: no such folder (TARGET is a run directory, a checkpoint, "
                              f"a model folder or 'smollm2')")
    if path.name == "hf" and path.parent.name.startswith("step_"):
        return _checkpoint_target(path.parent)
    if path.name.startswith("step_") and (path / "hf").is_dir():
        return _checkpoint_target(path)
    if (path / "checkpoints").is_dir():
        from rlkit.checkpoint import complete_checkpoints

        ckpts = complete_checkpoints(path)
        if not ckpts:
            raise EvalTargetError(f"{target}: a run directory without any complete checkpoint")
        config = path / "config.yaml" if (path / "config.yaml").is_file() else ckpts[-1] / "config.yaml"
        models = [(int(c.name.split("_")[-1]), str(c / "hf")) for c in ckpts]
        return EvalTarget(models, config, path / "eval-cli", True)
    if (path / "config.json").is_file():
        return EvalTarget([(None, str(path))], None, path.parent / f"{path.name}-eval", False)
    raise EvalTargetError(f"{target}: not a run directory (no checkpoints/), a checkpoint (no hf/ folder) "
                          f"or a model folder (no config.json)")


def data_overrides(data: str | None, overrides: list[str]) -> list[str]:
    """Overrides that select the evaluation data: DATA replaces the config's ``data:`` section, and so
    does a ``data.kind=`` override (kind-specific keys of the old section would conflict).

    >>> data_overrides("basic_arithmetic", ["eval.n=4"])
    ['data={}', 'data.kind=reasoning_gym', 'data.task="basic_arithmetic"', 'eval.n=4']
    >>> data_overrides(None, ["data.kind=arithmetic", "data.num_eval=20"])
    ['data={}', 'data.kind=arithmetic', 'data.num_eval=20']
    """
    fresh = data is not None or any(o.split("=", 1)[0].strip() == "data.kind" for o in overrides)
    out = ["data={}"] if fresh else []
    if data is None:
        return out + overrides
    path = Path(data)
    if path.exists():
        kind = "hf_disk" if path.is_dir() else "file"
        where = json.dumps(str(path.resolve()))
        # Every row of the file is an evaluation row: the file is its own eval set.
        out += [f"data.kind={kind}", f"data.path={where}", f"data.eval_path={where}"]
    elif data == "arithmetic":
        out += ["data.kind=arithmetic"]
    elif path.suffix or "/" in data:
        raise EvalTargetError(f"DATA {data}: no such file or folder")
    else:
        out += ["data.kind=reasoning_gym", f"data.task={json.dumps(data)}"]
    return out + overrides


def _split_rest(rest: list[str]) -> tuple[str | None, list[str]]:
    data = [r for r in rest if "=" not in r]
    if len(data) > 1:
        raise EvalTargetError(f"expected at most one DATA argument before the key=value overrides, got {data}")
    return (data[0] if data else None), [r for r in rest if "=" in r]


@dataclass
class _Prepared:
    step: int | None
    model_dir: str
    tokenizer: Any
    rows: list


def run_eval(args: argparse.Namespace) -> int:
    """``rlkit eval``: load data and check rewards for every model first, then evaluate each in turn."""
    from rich.console import Console

    from rlkit.config import build_reward_config, load_config
    from rlkit.evaluate import rich_table, strict_flag_line
    from rlkit.rewards import check_loadable

    target = resolve_target(args.target)
    data, overrides = _split_rest(args.rest)
    config = Path(args.config) if args.config else target.config
    if config is not None and not config.is_file():
        raise EvalTargetError(f"{config}: config file not found")
    cfg = load_config(config, [*data_overrides(data, overrides), f"model.path={json.dumps(target.models[0][1])}"])
    if not cfg.eval.num_problems:
        raise EvalTargetError("eval.num_problems is 0: nothing to evaluate")
    models = list(target.models)
    base = cfg_model_path(config) if target.curve and config is not None else None
    if base is not None and (base == "smollm2" or Path(base).is_dir()):
        models.insert(0, (0, base))  # the run's starting point, when it is still there
    prepared = [_prepare(cfg, step, model) for step, model in models]  # data errors before any actor
    reward_cfg = build_reward_config(cfg)
    columns = {k for p in prepared for r in p.rows for k in r.fields}
    check_loadable(reward_cfg, columns | {"answer", "completion_len", "completion_ids", "group_id", "data_source"})
    out = Path(args.out) if args.out else target.out
    seed = cfg.train.seed if args.seed is None else args.seed
    # Off a terminal (logs, pipes) rich would wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=220)
    points = []
    for p in prepared:
        report = _evaluate_model(cfg, p, reward_cfg.outcome_name(), seed, reward_cfg.answer_fallback())
        name = "eval.json" if p.step is None else f"step_{p.step:07d}.json"
        saved = report.save(out / name)
        title = f"{p.model_dir}" + ("" if p.step is None else f" (step {p.step})")
        console.print(rich_table(report.to_json(), title=title))
        flag = strict_flag_line(report.metrics, cfg.monitors.strict_gap)
        if flag:
            console.print(flag)
        console.print(f"report: {saved}")
        points.append((p.step, report.to_json()))
    if target.curve:
        _write_curve(points, out, args.target, console)
    return 0


def cfg_model_path(config: Path) -> str:
    """``model.path`` of a saved run config (the model the run started from)."""
    import yaml

    tree = yaml.safe_load(config.read_text()) or {}
    return str((tree.get("model") or {}).get("path", "smollm2"))


def _prepare(cfg: Any, step: int | None, model: str) -> _Prepared:
    from rlkit.assets import load_tokenizer, smollm2_dir
    from rlkit.config import build_data_spec
    from rlkit.data import load_prompts

    model_dir = str(smollm2_dir()) if model == "smollm2" else model
    if not Path(model_dir).is_dir():
        raise EvalTargetError(f"model folder {model_dir} not found")
    tokenizer = load_tokenizer(model_dir)
    _, rows = load_prompts(build_data_spec(cfg), tokenizer)
    if not rows:
        raise EvalTargetError("the data has no evaluation rows: give DATA, data.eval_path or data.num_eval")
    return _Prepared(step, model_dir, tokenizer, rows[: cfg.eval.num_problems])


def _evaluate_model(cfg: Any, p: _Prepared, outcome: str | None, seed: int, answer_fallback: str = "none") -> Any:
    from rlkit.evaluate import evaluate
    from rlkit.runtime import Runtime

    cfg.model.path = p.model_dir
    runtime = Runtime(cfg, p.model_dir, learners=False)
    try:
        return evaluate(runtime, p.tokenizer, p.rows, cfg.eval, outcome, seed=seed, answer_fallback=answer_fallback,
                        strict_gap=cfg.monitors.strict_gap)
    finally:
        runtime.shutdown()


def _write_curve(points: list, out: Path, target: str, console: Any) -> None:
    from rich.table import Table

    from rlkit.plots import eval_curve

    curve = {"target": str(target), "points": [{"step": s, "report": r} for s, r in points]}
    (out / "curve.json").write_text(json.dumps(curve, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    png = eval_curve(points, out / "curve.png", title=f"evaluation of {Path(target).name}")
    table = Table(title="overall, by checkpoint step")
    names = [m for m in points[0][1]["table"][-1]["metrics"] if m not in ("length_mean", "truncated_frac")]
    for col in ("step", *names):
        table.add_column(col, justify="right")
    for step, rep in points:
        cells = rep["table"][-1]["metrics"]
        table.add_row(str(step), *(f"{100 * cells[m]['value']:.1f}%" for m in names))
    console.print(table)
    console.print(f"curve: {png}")


if __name__ == "__main__":
    sys.exit(main())
