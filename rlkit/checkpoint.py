"""Crash-safe checkpoint directories.

A checkpoint is written under a temporary name, completed with a ``COMPLETE`` marker, fsync'd and
renamed to ``step_NNNNNNN``. A writer killed mid-write leaves only a ``.tmp-*`` folder, which
:func:`latest` ignores, so the previous checkpoint still loads.

Layout of a checkpoint:
    deepspeed/state/...   model, optimizer, scheduler (ZeRO partitions, per rank)
    rng_rank{r}.pt        every RNG of each learner rank, and its policy version
    hf/                   weights as safetensors in Hugging Face layout (transformers and vLLM load it)
    trainer_state.pt      driver state: step, data position, controller, dynamic-sampling carry-over
    config.yaml           the run's configuration
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

_NAME = re.compile(r"^step_(\d{7})$")


class CheckpointError(RuntimeError):
    pass


def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = root(run_dir) / f"step_{step:07d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, step: int, trainer_state: dict, config_text: str, keep: int) -> Path:
    """Write the driver state and marker, then atomically rename ``tmp`` to its final name."""
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_text)
    marker = tmp / "COMPLETE"
    marker.write_text(str(step))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = tmp.parent / f"step_{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    _prune(tmp.parent, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    done = complete_checkpoints(directory.parent)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    d = root(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _NAME.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: str | Path) -> Optional[Path]:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resolve(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """``None`` → no resume; ``auto`` → newest complete checkpoint (or none); else a path."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(run_dir)
    p = Path(resume)
    if not (p / "COMPLETE").is_file():
        raise CheckpointError(f"--resume {p}: not a complete checkpoint (no COMPLETE marker)")
    return p


def load_trainer_state(ckpt: Path) -> dict:
    f = ckpt / "trainer_state.pt"
    try:
        return torch.load(f, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{f}: cannot read the trainer state ({e})") from e
