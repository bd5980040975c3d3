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
    """The run directory of 4 uninterrupted steps (its output in ``output.txt`` beside it)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(_cmd(run, tiny_model), env=_env(), check=False, timeout=600, capture_output=True, text=True)
    (run.parent / "output.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_a_correct_run_prints_no_data_corruption_warning(straight):
    """Torch tensors cross actors by copy; the one zero-copy path (weight buckets in the object store)
    is scoped to its payload, so a run prints neither Ray's zero-copy warning nor torch's warning
    about tensors over non-writable NumPy arrays (both printed by every run when zero-copy tensor
    transfer was enabled globally)."""
    out = (straight.parent / "output.txt").read_text()
    for warning in ("ZeroCopyTensorsWarning", "only works safely for read-only tensors", "is not writable"):
        assert warning not in out, out[max(0, out.find(warning) - 800):][:1600]


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


def _mount_small_disk(path: Path, size_bytes: int) -> None:
    path.mkdir(parents=True)
    size_kib = max(64, size_bytes // 1024)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs CAP_SYS_ADMIN): {proc.stderr.strip()}")


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_disk_full_while_checkpointing_names_the_path_and_keeps_the_previous(tmp_path, tiny_model, straight):
    """A real full disk: the run directory on a tmpfs with room for one checkpoint (step 2) but not a
    second (step 4). The run stops with one message naming the file that could not be written and
    the intact step-2 checkpoint; the partial folder is gone; the step-2 checkpoint verifies and a
    copy of the run directory resumes from it to weights bitwise equal to the uninterrupted run."""
    one = _tree_bytes(checkpoint.complete_checkpoints(straight)[0])
    disk = tmp_path / "disk"
    _mount_small_disk(disk, int(1.5 * one) + 2 * 2**20)
    try:
        run = disk / "run"
        proc = subprocess.run(_cmd(run, tiny_model), env=_env(), capture_output=True, text=True, timeout=600,
                              check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        err = proc.stderr
        assert "Traceback" not in err, err[-3000:]
        assert "checkpoint of step 4: writing " + str(checkpoint.root(run) / "step_0000004.tmp-") in err, err[-3000:]
        assert "No space left on device" in err or "the filesystem was full" in err, err[-3000:]
        assert f"the previous checkpoint {checkpoint.root(run) / 'step_0000002'} is intact" in err, err[-3000:]
        assert [p.name for p in checkpoint.root(run).iterdir()] == ["step_0000002"]
        kept = checkpoint.resolve("auto", run)
        assert kept is not None and kept.name == "step_0000002"
        assert checkpoint.load_trainer_state(kept)["step"] == 2
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    subprocess.run(_cmd(copy, tiny_model, "--resume", "auto"), env=_env(), check=True, timeout=600)
    a, b = _weights(checkpoint.latest(straight)), _weights(checkpoint.latest(copy))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming past the failed write"


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("victim", ["hf/model.safetensors", "rng_rank0.pt"])
def test_truncated_checkpoint_is_named_trusted_or_not(tmp_path, straight, monkeypatch, victim, trusted):
    """A checkpoint file cut short: refused naming the file, whether the manifest is checked (its
    digest differs) or the user trusts the checkpoint (the file is not whole)."""
    ckpt = tmp_path / "step_0000002"
    subprocess.run(["cp", "-a", str(checkpoint.complete_checkpoints(straight)[0]), str(ckpt)], check=True)
    path = ckpt / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setenv(checkpoint.TRUST_ENV, "1" if trusted else "0")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.resolve(str(ckpt), tmp_path)
    assert str(path) in str(e.value)
    assert ("truncated or corrupted" if trusted else "content differs") in str(e.value)


def test_truncated_checkpoint_given_to_the_command_is_one_message(tmp_path, tiny_model, straight):
    ckpt = tmp_path / "step_0000002"
    subprocess.run(["cp", "-a", str(checkpoint.complete_checkpoints(straight)[0]), str(ckpt)], check=True)
    victim = next((ckpt / "deepspeed").rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = subprocess.run(_cmd(tmp_path / "run", tiny_model, "--resume", str(ckpt), "--trust-checkpoint"),
                          env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"{victim}: truncated or corrupted" in proc.stderr, proc.stderr[-3000:]
