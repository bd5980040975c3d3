"""The ``rlkit`` command line.

    rlkit train CONFIG [key.sub=value ...] [--resume auto|PATH]
    rlkit config CONFIG [key.sub=value ...]      # print the validated, fully resolved config
    rlkit plan CONFIG [key.sub=value ...]        # placement, batch arithmetic, memory, sync bytes
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlkit", description="KL-regularized RL post-training for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a training job from a YAML config")
    t.add_argument("config", help="YAML file in configs/ (overrides of rlkit.config.RunConfig)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    t.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in run_dir) or a path")
    for name, text in (("config", "validate a config and print it fully resolved"),
                       ("plan", "dry run: placement, batch arithmetic, memory and sync bytes; starts nothing")):
        c = sub.add_parser(name, help=text)
        c.add_argument("config")
        c.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rlkit.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlkit: configuration error:\n{e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command == "plan":
        from rlkit.plan import run_plan

        return run_plan(cfg)
    from rlkit.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        final = trainer.fit(resume=args.resume)
    finally:
        trainer.close()
    from rlkit.metrics import summarize
    from rlkit.plots import make_plots

    make_plots(cfg.run_dir)
    print(summarize(cfg.run_dir))
    return 0 if final is not None else 1


if __name__ == "__main__":
    sys.exit(main())
