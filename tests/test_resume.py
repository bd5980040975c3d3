"""Exact resume and crash-safe checkpoints, through the real `rlkit train` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rlkit import checkpoint

TOY_REWARD = str(Path(__file__).parent / "toy_rewards.py") + ":letter_a"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlkit.assets import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _cmd(run_dir: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "rlkit.cli", "train", str(Path(__file__).parent / "data" / "tiny_run.yaml"),
        f"run_dir={run_dir}", f"model.path={model}", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]", *extra,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "hf" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model) -> Path:
    """The run directory of 4 uninterrupted steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_cmd(run, tiny_model), env=_env(), check=True, timeout=600)
    return run


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_model, straight):
    """4 steps in one go == 2 steps, SIGKILL, `--resume auto`, 2 more steps: bitwise equal weights."""
    broken = tmp_path / "broken"
    proc = subprocess.Popen(_cmd(broken, tiny_model), env=_env(), start_new_session=True)
    deadline = time.time() + 600
    while checkpoint.latest(broken) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    proc.wait()
    first = checkpoint.latest(broken)
    assert first is not None and first.name == "step_0000002", first
    subprocess.run(_cmd(broken, tiny_model, "--resume", "auto"), env=_env(), check=True, timeout=600)

    a, b = _weights(checkpoint.latest(straight)), _weights(checkpoint.latest(broken))
    assert checkpoint.latest(broken).name == "step_0000004"
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    init = _weights_of_model(tiny_model)
    assert any(not torch.equal(a[n], init[n]) for n in a), "training did not change the weights"


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_signalled_run_checkpoints_exits_75_and_resumes_exactly(tmp_path, tiny_model, straight, signame):
    """A stop signal once step 1 is logged, in a run with no periodic checkpoints: the driver
    finishes the step it is in, checkpoints it and exits with the requeue code 75; the requeued
    `--resume auto` reaches weights bitwise equal to the uninterrupted run."""
    from rlkit.metrics import read_metrics

    run = tmp_path / "signalled"
    proc = subprocess.Popen(_cmd(run, tiny_model, "checkpoint.every_steps=0"), env=_env(), start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not any(
            r.get("step") == 1 for r in (read_metrics(run) if (run / "metrics.jsonl").exists() else [])):
        time.sleep(0.2)
    os.kill(proc.pid, getattr(signal, signame))  # the driver only, as sbatch forwards it
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-2000:]
    ckpt = checkpoint.latest(run)
    assert ckpt is not None and ckpt.name in ("step_0000001", "step_0000002"), ckpt  # within one step
    assert f"{signame} received; stopped after step {int(ckpt.name[5:])}" in err
    subprocess.run(_cmd(run, tiny_model, "checkpoint.every_steps=0", "--resume", "auto"), env=_env(),
                   check=True, timeout=600)
    a, b = _weights(checkpoint.latest(straight)), _weights(checkpoint.latest(run))
    assert checkpoint.latest(run).name == "step_0000004"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the signalled stop and resume"


def _weights_of_model(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_writer_killed_mid_checkpoint_leaves_previous_loadable(tmp_path):
    run = tmp_path / "run"
    tmp = checkpoint.begin(run, 1)
    checkpoint.commit(tmp, 1, {"step": 1, "marker": "first"}, "run_dir: x\n", keep=3)
    writer = textwrap.dedent(f"""
        import os, sys, time
        from rlkit import checkpoint
        tmp = checkpoint.begin({str(run)!r}, 2)
        with open(tmp / "big.bin", "wb") as f:
            print("writing", flush=True)
            while True:
                f.write(os.urandom(1 << 20)); f.flush()
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith("step_0000002.tmp") for p in checkpoint.root(run).iterdir())
    last = checkpoint.latest(run)
    assert last is not None and last.name == "step_0000001"
    assert checkpoint.load_trainer_state(last)["marker"] == "first"
    assert checkpoint.resolve("auto", run) == last


def test_resume_from_incomplete_path_is_refused(tmp_path):
    bad = tmp_path / "step_0000003"
    bad.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="COMPLETE"):
        checkpoint.resolve(str(bad), tmp_path)
