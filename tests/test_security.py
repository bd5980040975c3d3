"""Closed to strangers (docs/security.md), for real: a two-node Ray cluster started by
launch/ray_cluster.sh refuses clients without its token; checkpoint files cannot run code when
loaded and a checkpoint changed after it was written is refused; secrets reach the actors through
the runtime environment and leave no trace under the run directory."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rlkit import checkpoint
from rlkit.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
BIN = Path(sys.executable).parent
REFUSED = "Authentication token is missing or incorrect"


@pytest.fixture(autouse=True)
def own_key(tmp_path, monkeypatch):
    """Each test signs with a key of its own, and trusts nothing unless it says so."""
    monkeypatch.setenv("RLKIT_CHECKPOINT_KEY", str(tmp_path / "keys" / "checkpoint.key"))
    monkeypatch.delenv("RLKIT_TRUST_CHECKPOINTS", raising=False)


def _bash(body: str, cwd: Path, timeout: float, **extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RC_PYTHON=sys.executable, RC_LOG_DIR=str(cwd / "logs"),
               PATH=f"{BIN}:{os.environ.get('PATH', '')}", **extra)
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "WANDB_API_KEY"):
        env.pop(k, None)
    script = f"set -uo pipefail\nsource {shlex.quote(str(LAUNCH / 'ray_cluster.sh'))}\n{body}"
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Stop what the script started (its Ray nodes are in its process group), then fail.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _all_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                   and p.stat().st_size < 50 * 2**20)


# ---------------------------------------------------------------------------------- Ray token
CLIENT = """
import os, ray
if os.environ.get("CLIENT_VIA_RLKIT"):  # the way the rlkit driver joins
    from rlkit.cluster import init_ray
    from rlkit.config import load_config
    init_ray(load_config(None, ["ray_address=" + os.environ["CLIENT_ADDR"]]))
else:
    ray.init(address=os.environ["CLIENT_ADDR"], logging_level="ERROR")
where = [ray.remote(resources={n: 0.1})(lambda: ray.get_runtime_context().get_node_id()).remote()
         for n in ("node_a", "node_b")]
print("RAN on", len(set(ray.get(where))), "nodes")
"""


@pytest.mark.slow
def test_two_node_cluster_refuses_clients_without_its_token():
    """Head + worker on this machine, started by ray_cluster.sh with rc_auth_setup. A client with
    no token (joining as the rlkit driver does) and one with a wrong token are refused by the GCS;
    one with the job's token runs a task on each node. The token file is 0600 in a 0700 folder, appears in no output or Ray log,
    and is deleted at teardown."""
    body = r"""
rc_auth_setup "$PWD/auth" || exit 9
echo "MODES $(stat -c %a "$PWD/auth") $(stat -c %a "$RAY_AUTH_TOKEN_PATH")"
cp "$RAY_AUTH_TOKEN_PATH" "$PWD/token.seen-by-test"
port=$(rc_free_port)
small=(--num-cpus=1 --object-store-memory=100000000)
rc_start_head "$port" "${small[@]}" --resources='{"node_a": 1}' --temp-dir="$PWD/head"
addr=$(rc_head_address "$port")
rc_start_worker worker1 "$addr" "${small[@]}" --resources='{"node_b": 1}' --temp-dir="$PWD/w1" \
    --node-manager-port="$(rc_free_port)" --object-manager-port="$(rc_free_port)"
rc_wait_for_nodes "$addr" 2 240 >/dev/null || { echo "WAIT FAILED"; rc_teardown; exit 3; }
export CLIENT_ADDR="$addr"
# The two strangers run side by side (each is refused only after Ray's connection retries).
(env -u RAY_AUTH_TOKEN_PATH RAY_AUTH_MODE=disabled CLIENT_VIA_RLKIT=1 timeout 150 "$RC_PYTHON" client.py \
    >none.out 2>&1; echo "NONE rc=$?") &
none=$!
(env -u RAY_AUTH_TOKEN_PATH RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(printf '%064d' 7)" \
    timeout 150 "$RC_PYTHON" client.py >wrong.out 2>&1; echo "WRONG rc=$?") &
wrong=$!
timeout 150 "$RC_PYTHON" client.py >good.out 2>&1; echo "GOOD rc=$?"
wait "$none" "$wrong"
token_file="$RAY_AUTH_TOKEN_PATH"
rc_teardown
[[ -e "$token_file" ]] && echo "TOKEN LEFT" || echo "TOKEN GONE"
"""
    short = Path(tempfile.mkdtemp(prefix="rlk", dir="/tmp"))  # Ray's Unix socket paths must stay short
    try:
        (short / "client.py").write_text(CLIENT)
        res = _bash(body, short, timeout=480, RAY_AUTH_MODE="disabled")
        outs = {name: (short / f"{name}.out").read_text() if (short / f"{name}.out").exists() else ""
                for name in ("none", "wrong", "good")}
        token = (short / "token.seen-by-test").read_text() if (short / "token.seen-by-test").exists() else ""
        ray_logs = _all_text(short / "head") + _all_text(short / "w1") + _all_text(short / "logs")
    finally:
        shutil.rmtree(short, ignore_errors=True)
    out = res.stdout + res.stderr
    assert "MODES 700 600" in res.stdout, out
    assert "GOOD rc=0" in res.stdout and "RAN on 2 nodes" in outs["good"], out + outs["good"][-3000:]
    for name in ("none", "wrong"):
        assert f"{name.upper()} rc=0" not in res.stdout, out
        assert REFUSED in outs[name] and "RAN on" not in outs[name], outs[name][-3000:]
    assert "the cluster refused this driver's authentication token (RAY_AUTH_MODE=disabled" in outs["none"], \
        outs["none"][-3000:]
    assert re.fullmatch(r"[0-9a-f]{64}", token), "the token file does not hold a 256-bit hex token"
    assert token not in out + "".join(outs.values()) + ray_logs, "the token was printed or logged"
    assert "TOKEN GONE" in res.stdout, out


PRIVATE = """
import os, stat, subprocess, sys
import ray
from rlkit.cluster import init_ray
from rlkit.config import load_config

init_ray(load_config(None, ["object_store_mb=128"]))
path = os.environ["RAY_AUTH_TOKEN_PATH"]
print("MODE", os.environ["RAY_AUTH_MODE"], oct(stat.S_IMODE(os.stat(path).st_mode)),
      oct(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))
print("ACTOR", ray.get(ray.remote(lambda: os.environ["RAY_AUTH_MODE"]).remote()))
stranger = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"RAY_AUTH_MODE": "disabled"}
res = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={ray.get_runtime_context().gcs_address!r})"],
                     env=stranger, capture_output=True, text=True, timeout=150)
print("STRANGER", res.returncode, "Authentication token is missing or incorrect" in res.stderr)
ray.shutdown()
print("TOKEN_FILE", path)
"""


@pytest.mark.slow
def test_private_instance_started_by_the_driver_requires_a_token_of_its_own(tmp_path):
    """``rlkit train`` without ``ray_address`` and without ``RAY_AUTH_MODE``: the Ray instance it
    starts takes a per-run token (0600 file in a 0700 folder, deleted at exit); actors work, a
    client without the token is refused."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                                            "RAY_ADDRESS", "RLKIT_RAY_AUTH")}
    res = subprocess.run([sys.executable, "-c", PRIVATE], env=env | {"OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert "MODE token 0o600 0o700" in res.stdout and "ACTOR token" in res.stdout, res.stdout
    assert "STRANGER 1 True" in res.stdout, res.stdout
    token_file = Path(res.stdout.split("TOKEN_FILE ", 1)[1].strip())
    assert not token_file.exists() and not token_file.parent.exists()


def test_auth_opt_out_is_explicit_and_warns(tmp_path):
    res = _bash('rc_auth_setup "$PWD/auth"; echo "MODE=$RAY_AUTH_MODE rc=$?"; ls auth 2>/dev/null | wc -l',
                tmp_path, timeout=60, RLKIT_RAY_AUTH="off")
    assert "MODE=disabled rc=0" in res.stdout and res.stdout.split()[-1] == "0", res.stdout
    assert "WARNING: Ray token authentication is OFF (RLKIT_RAY_AUTH=off)" in res.stderr
    bad = _bash('rc_auth_setup "$PWD/auth"; echo "rc=$?"', tmp_path, timeout=60, RLKIT_RAY_AUTH="maybe")
    assert "rc=2" in bad.stdout and "RLKIT_RAY_AUTH must be 'token' or 'off'" in bad.stderr


def test_forwarded_env_carries_secrets_but_not_the_ray_token(monkeypatch):
    from rlkit.cluster import forwarded_env

    monkeypatch.setenv("WANDB_API_KEY", "k1")
    monkeypatch.setenv("HF_TOKEN", "k2")
    monkeypatch.setenv("RLKIT_TRUST_CHECKPOINTS", "1")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "never-forwarded")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/somewhere/token")
    env = forwarded_env()
    assert env["WANDB_API_KEY"] == "k1" and env["HF_TOKEN"] == "k2" and env["RLKIT_TRUST_CHECKPOINTS"] == "1"
    assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_TOKEN_PATH" not in env


# ---------------------------------------------------------------------------------- state files
class _Payload:
    """Unpickling this writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_payload_is_refused_naming_the_file_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    bad = tmp_path / "trainer_state.pt"
    torch.save({"step": 3, "sampler": _Payload(marker)}, bad)

    with pytest.raises(CheckpointError) as err:
        checkpoint.load_state(bad)
    msg = str(err.value)
    assert str(bad) in msg and "full unpickling" in msg and "RLKIT_TRUST_CHECKPOINTS=1" in msg, msg
    assert "--trust-checkpoint" in msg and "exec" in msg, msg
    assert not marker.exists()

    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    ckpt.mkdir(parents=True)
    shutil.copy(bad, ckpt / "trainer_state.pt")
    (ckpt / "COMPLETE").write_text("3")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "trainer_state.pt"))):
        checkpoint.load_trainer_state(ckpt)
    # --resume finds no signed manifest and refuses before anything is loaded.
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "MANIFEST.json"))):
        checkpoint.resolve("auto", tmp_path / "run")
    assert not marker.exists()

    # Trusted explicitly, the old-style file loads, and its code does run: the payload is real.
    monkeypatch.setenv("RLKIT_TRUST_CHECKPOINTS", "1")
    assert checkpoint.resolve("auto", tmp_path / "run") == ckpt
    checkpoint.load_trainer_state(ckpt)
    assert marker.read_text() == "pwned"


def test_state_round_trip_and_unsupported_types_named(tmp_path):
    state = {"step": 7, "lr": 1e-3, "ok": True, "none": None, "name": "x", "ids": [1, 2, (3, "a")],
             "t": torch.arange(5, dtype=torch.float64), "arr": np.arange(4, dtype=np.int32),
             "scalar": np.float32(0.5), "nested": {"deep": [{"u8": torch.tensor([1, 2], dtype=torch.uint8)}]}}
    f = tmp_path / "s.pt"
    checkpoint.save_state(f, state)
    back = checkpoint.load_state(f)
    assert back["step"] == 7 and back["lr"] == 1e-3 and back["ok"] is True and back["none"] is None
    assert back["ids"][:2] == [1, 2] and list(back["ids"][2]) == [3, "a"]
    assert torch.equal(back["t"], state["t"]) and back["t"].dtype == torch.float64
    assert torch.equal(back["arr"], torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    assert back["scalar"] == 0.5 and type(back["scalar"]) is float
    assert torch.equal(back["nested"]["deep"][0]["u8"], torch.tensor([1, 2], dtype=torch.uint8))

    with pytest.raises(TypeError, match=re.escape(f"{tmp_path / 'bad.pt'}: cannot save: state['carry'][1] is a")):
        checkpoint.save_state(tmp_path / "bad.pt", {"carry": [1, {2, 3}]})
    assert not (tmp_path / "bad.pt").exists()

    (tmp_path / "cut.pt").write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "cut.pt")) + ": cannot read it"):
        checkpoint.load_state(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load_state(tmp_path / "nope.pt")


def test_rng_capture_restore_is_exact_through_a_state_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    checkpoint.save_state(tmp_path / "rng.pt", {"rng": checkpoint.capture_rng(), "version": 4})

    def draw():
        return random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    want = draw()
    draw()  # move every generator on
    saved = checkpoint.load_state(tmp_path / "rng.pt")
    checkpoint.restore_rng(saved["rng"])
    assert draw() == want and saved["version"] == 4


# ---------------------------------------------------------------------------------- signed checkpoints
def _checkpoint(run: Path, step: int = 2) -> Path:
    tmp = checkpoint.begin(run, step)
    (tmp / "deepspeed" / "state").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_config": {"zero": 2}}, tmp / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    checkpoint.save_state(tmp / "rng_rank0.pt", {"rng": checkpoint.capture_rng(), "version": step})
    return checkpoint.commit(tmp, step, {"step": step, "sampler": {"seed": 0}}, "run_dir: x\n", keep=3)


def test_signed_checkpoint_verifies_and_any_change_is_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt = _checkpoint(run)
    key = Path(os.environ["RLKIT_CHECKPOINT_KEY"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"deepspeed/state/mp_rank_00_model_states.pt", "rng_rank0.pt",
                                      "trainer_state.pt", "config.yaml"}
    assert checkpoint.resolve("auto", run) == ckpt and checkpoint.resolve(str(ckpt), run) == ckpt
    assert checkpoint.load_trainer_state(ckpt) == {"step": 2, "sampler": {"seed": 0}}

    # A DeepSpeed file (loaded by DeepSpeed with full unpickling) swapped for a payload.
    ds = ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    original = ds.read_bytes()
    torch.save({"module": _Payload(tmp_path / "marker")}, ds)
    with pytest.raises(CheckpointError, match=re.escape(str(ds)) + ": content differs"):
        checkpoint.resolve("auto", run)
    ds.write_bytes(original)

    extra = ckpt / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    extra.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=re.escape(str(extra)) + ": not part of the checkpoint"):
        checkpoint.resolve(str(ckpt), run)
    extra.unlink()

    (ckpt / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "config.yaml")) + ": listed in MANIFEST.json but missing"):
        checkpoint.resolve(str(ckpt), run)
    (ckpt / "config.yaml").write_text("run_dir: x\n")
    assert checkpoint.resolve(str(ckpt), run) == ckpt

    # Another user's key (or a manifest re-signed by someone without ours) is refused.
    monkeypatch.setenv("RLKIT_CHECKPOINT_KEY", str(tmp_path / "other.key"))
    (tmp_path / "other.key").write_text(secrets.token_hex(32))
    (tmp_path / "other.key").chmod(0o600)
    with pytest.raises(CheckpointError, match="signature does not match this user's checkpoint key"):
        checkpoint.resolve(str(ckpt), run)
    monkeypatch.setenv("RLKIT_TRUST_CHECKPOINTS", "1")
    assert checkpoint.resolve(str(ckpt), run) == ckpt
    assert not (tmp_path / "marker").exists()


def test_key_readable_by_others_is_refused(tmp_path):
    _checkpoint(tmp_path / "run")
    key = Path(os.environ["RLKIT_CHECKPOINT_KEY"])
    key.chmod(0o644)
    with pytest.raises(CheckpointError, match=re.escape(str(key)) + ": the checkpoint key is readable by other users"):
        checkpoint.resolve("auto", tmp_path / "run")


def test_unpickling_never_happens_on_refusal_even_for_pickle_protocol_0(tmp_path):
    """A raw pickle (not a torch zip file) with a payload is refused the same way."""
    marker = tmp_path / "marker"
    f = tmp_path / "raw.pt"
    f.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=0))
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        checkpoint.load_state(f)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- secrets
@pytest.mark.slow
def test_wandb_key_reaches_the_actors_and_leaves_no_trace_under_the_run_dir(tmp_path, tiny_llama_dir):
    """A token-authenticated one-node cluster started without the key; the driver joins it with
    ``WANDB_API_KEY`` set. The reward function sees the key (reward 1.0 = it reached the reward
    actor's children through the runtime environment), and no file under the run directory nor
    the driver's output contains it."""
    canary = "wandb-canary-" + secrets.token_hex(16)
    short = Path(tempfile.mkdtemp(prefix="rlk", dir="/tmp"))
    (short / "canary").write_text(canary)
    run = tmp_path / "run"
    probe = Path(__file__).parent / "data" / "env_probe_rewards.py"
    train = [sys.executable, "-m", "rlkit.cli", "train", str(Path(__file__).parent / "data" / "tiny_run.yaml"),
             f"run_dir={run}", f"model.path={tiny_llama_dir}", f"rewards.rewards=[{{name: '{probe}:wandb_key_present'}}]",
             "train.steps=2", "checkpoint.every_steps=2", "report_to=[tensorboard]"]
    body = f"""
rc_auth_setup "$PWD/auth" || exit 9
port=$(rc_free_port)
rc_start_head "$port" --num-cpus=2 --object-store-memory=300000000 --temp-dir="$PWD/head"
addr=$(rc_head_address "$port")
rc_wait_for_nodes "$addr" 1 240 >/dev/null || {{ rc_teardown; exit 3; }}
WANDB_API_KEY="$(cat "$PWD/canary")" {shlex.join(train)} ray_address="$addr"; echo "TRAIN rc=$?"
rc_teardown
"""
    try:
        res = _bash(body, short, timeout=900, RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    finally:
        shutil.rmtree(short, ignore_errors=True)
    out = res.stdout + res.stderr
    assert "TRAIN rc=0" in res.stdout, out[-5000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in rows if "reward/mean" in r] == [1.0, 1.0], rows
    assert checkpoint.latest(run) is not None
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("tfevents" in p.name for p in files), files
    leaked = [p for p in files if canary.encode() in p.read_bytes()]
    assert leaked == [], f"the key was written to {leaked}"
    assert canary not in out, "the key was printed"
