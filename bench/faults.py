"""Fault barrage: inject each fault kind many times into tiny-model runs and count what survived.

    .venv/bin/python bench/faults.py --count 20        # make faults; writes bench/out/faults.json
    .venv/bin/python bench/faults.py --report          # docs/reliability.md from that JSON

Real components only: Ray actors killed with SIGKILL, the learner's NaN-loss injection point
(``recovery.inject``), the driver stopped by SIGUSR1 and resumed. For each kind: injected,
survived (the run reached its last step), samples lost (prompts of a step not trained on, or
trained twice), steps lost (redone after a learner restart), seconds to recover. Then the
bad-input catalogue: each kind of bad input and the message it produces.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOY = str(common.ROOT / "tests" / "toy_rewards.py") + ":letter_a"
SLOW = str(common.ROOT / "tests" / "data" / "const_rewards.py") + ":slow_zero"


def tiny_cfg(run_dir: Path, model: Path, **over: Any):
    from rlkit.config import load_config

    base = {"run_dir": run_dir, "model.path": model, "data.kind": "arithmetic", "data.num_train": 256,
            "data.num_eval": 8, "rewards.rewards": f"[{{name: '{TOY}'}}]", "rollout.max_new_tokens": 8,
            "rollout.threads": 1, "learner.threads": 1, "learner.num_ranks": 1, "learner.micro_batch_size": 16,
            "learner.lr": 1e-3, "train.prompts_per_step": 4, "train.samples_per_prompt": 4,
            "eval.num_problems": 0, "progress": "false", "report_to": "[]", "algorithm.args.beta": 0.04}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _kill_actors(rt) -> None:
    import ray

    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a, no_restart=True)
    rt.placement.remove()


def rollout_kills(model: Path, count: int, work: Path) -> dict[str, Any]:
    """``count`` steps, the rollout worker SIGKILLed during each step's generation."""
    import ray

    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    cfg = tiny_cfg(work / "rollout", model, **{"recovery.actor_restarts": count + 1})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    rt.sync()
    lost, survived, launch, collect = 0, 0, rt.generate_async, rt.collect
    seen: list = []
    rt.collect = lambda tasks: seen.append(collect(tasks)) or seen[-1]
    try:
        for _ in range(count):
            pid = ray.get(rt.rollout[0].ready.remote())["pid"]

            def launch_then_kill(*a, pid=pid, **kw):
                tasks = launch(*a, **kw)
                os.kill(pid, signal.SIGKILL)
                return tasks

            rt.generate_async = launch_then_kill
            trainer.step(StageTimer())
            rows = [r.prompt_index for r in seen[-1]]
            lost += abs(16 - len(rows)) + sum(abs(rows.count(i) - 4) for i in set(rows))
            survived += 1
    finally:
        _kill_actors(rt)
    secs = [e["seconds"] for e in rt.supervisor.recovered]
    return {"kind": "rollout worker SIGKILL mid-generation", "injected": count, "survived": survived,
            "samples_lost": lost, "steps_lost": 0, "recover_s": common.summary(secs)}


def reward_kills(model: Path, count: int, work: Path) -> dict[str, Any]:
    """``count`` score calls (a 3 s reward), the reward actor SIGKILLed 1.5 s into each."""
    import threading

    import ray

    from rlkit.runtime import Runtime
    from rlkit.trainer import model_dir

    cfg = tiny_cfg(work / "reward", model, **{"rewards.rewards": f"[{{name: '{SLOW}'}}]",
                                              "recovery.actor_restarts": count + 1})
    rt = Runtime(cfg, model_dir(cfg), learners=False)
    survived, lost = 0, 0
    try:
        for _ in range(count):
            pid = ray.get(rt.reward.ready.remote())["pid"]
            out: dict = {}
            th = threading.Thread(target=lambda: out.update(r=rt.score(["a"] * 4, ["p"] * 4, [{}] * 4, ["s"] * 4)))
            th.start()
            time.sleep(1.5)
            os.kill(pid, signal.SIGKILL)
            th.join(timeout=300)
            if "r" in out:
                survived += 1
                lost += 4 - len(out["r"].scores)
    finally:
        _kill_actors(rt)
    secs = [e["seconds"] for e in rt.supervisor.recovered]
    return {"kind": "reward actor SIGKILL mid-batch", "injected": count, "survived": survived,
            "samples_lost": lost, "steps_lost": 0, "recover_s": common.summary(secs)}


def nan_losses(model: Path, count: int, work: Path) -> dict[str, Any]:
    """A run of 2·count steps with a NaN loss injected at every other update."""
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    at = [2 * i + 1 for i in range(count)]
    cfg = tiny_cfg(work / "nan", model, **{"train.steps": 2 * count, "recovery.inject": f"[{', '.join(f'nan_loss@{i}' for i in at)}]"})
    rt = Runtime(cfg, model_dir(cfg))
    trainer = Trainer(cfg, runtime=rt)
    try:
        trainer.fit()
    finally:
        _kill_actors(rt)
    from rlkit.metrics import read_metrics

    rows = [r for r in read_metrics(cfg.run_dir) if "learn/skipped_updates" in r]
    skipped = sum(r["learn/skipped_updates"] for r in rows)
    return {"kind": "NaN loss at the learner", "injected": count, "survived": int(skipped) if
            trainer.state.step == 2 * count else 0, "samples_lost": int(16 * skipped), "steps_lost": 0,
            "recover_s": common.summary([0.0] * int(skipped)),
            "note": "each skipped update's samples are not trained on (weights and optimizer untouched)"}


def learner_kills(model: Path, count: int, work: Path) -> dict[str, Any]:
    """One run with a checkpoint every 2 steps; learner rank 0 SIGKILLed ``count`` times."""
    import threading

    import ray

    from rlkit.metrics import read_metrics
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    steps = 2 * count + 2
    cfg = tiny_cfg(work / "learner", model, **{"train.steps": steps, "checkpoint.every_steps": 2,
                                               "recovery.learner_restarts": count})
    rt = Runtime(cfg, model_dir(cfg))
    trainer = Trainer(cfg, runtime=rt)
    done = threading.Event()
    kill_times: list[float] = []

    def killer() -> None:
        for k in range(count):
            while not done.is_set() and trainer.state.step < 2 * k + 1:
                time.sleep(0.05)
            if done.is_set():
                return
            try:
                pid = ray.get(rt.learners[0].ready.remote(), timeout=60)["pid"]
            except Exception:  # the group is being restarted: try again at the next step
                continue
            kill_times.append(time.perf_counter())
            os.kill(pid, signal.SIGKILL)
            while not done.is_set() and trainer.state.learner_restarts <= k:
                time.sleep(0.05)

    threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        done.set()
        _kill_actors(rt)
    rows = [r for r in read_metrics(cfg.run_dir) if "recovery/steps_lost" in r]
    return {"kind": "learner rank SIGKILL", "injected": len(kill_times),
            "survived": trainer.state.learner_restarts if trainer.state.step == steps else 0,
            "samples_lost": 0, "steps_lost": int(sum(r["recovery/steps_lost"] for r in rows)),
            "recover_s": common.summary([]), "run_s": time.perf_counter() - t0,
            "note": "steps since the last checkpoint are redone from it (bitwise equal: tests/test_faults.py)"}


def stop_signals(model: Path, count: int, work: Path) -> dict[str, Any]:
    """``count`` SIGUSR1 stops of `rlkit train`, each resumed with --resume auto."""
    from rlkit import checkpoint

    run = work / "signals"
    steps = 2 * count + 2  # a stop may come one step late: every resumed run still has steps left
    cmd = [sys.executable, "-m", "rlkit", "train", str(common.ROOT / "tests" / "data" / "tiny_run.yaml"),
           f"run_dir={run}", f"model.path={model}", f"rewards.rewards=[{{name: '{TOY}'}}]", f"train.steps={steps}",
           "checkpoint.every_steps=0", "learner.num_ranks=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    survived, recover = 0, []
    for k in range(count):
        proc = subprocess.Popen(cmd + (["--resume", "auto"] if k else []), env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = checkpoint.latest(run)
        while proc.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        n0 = _lines(run)
        while proc.poll() is None and _lines(run) <= n0:
            time.sleep(0.2)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=600)
        after = checkpoint.latest(run)
        if proc.returncode == 75 and after is not None and after != before:
            survived += 1
            recover.append(time.perf_counter() - t0)
    final = subprocess.run(cmd + ["--resume", "auto"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = final.returncode == 0 and checkpoint.latest(run) is not None and checkpoint.latest(run).name.endswith(f"{steps:07d}")
    return {"kind": "SIGUSR1 (time limit) → checkpoint, exit 75, resume", "injected": count,
            "survived": survived if ok else 0, "samples_lost": 0, "steps_lost": 0,
            "recover_s": common.summary(recover), "note": "recover_s: signal to checkpointed exit"}


def sync_hangs(model: Path, count: int, work: Path) -> dict[str, Any]:
    """``count`` weight syncs into a rollout worker frozen by SIGSTOP (a real hung process): each must
    end as StageTimeout naming the sync within the timeout (4 s here); after SIGCONT the next sync
    must deliver verified weights."""
    import ray

    from rlkit.recovery import StageTimeout
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    cfg = tiny_cfg(work / "hang", model, **{"recovery.min_timeout_s": 4})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt, survived, waits = trainer.runtime, 0, []
    try:
        rt.sync()
        pid = ray.get(rt.rollout[0].ready.remote())["pid"]
        for _ in range(count):
            os.kill(pid, signal.SIGSTOP)
            t0 = time.perf_counter()
            try:
                rt.sync()
                named = False
            except StageTimeout as e:
                named = "weight sync" in str(e)
            waits.append(time.perf_counter() - t0)
            os.kill(pid, signal.SIGCONT)
            rt.sync()  # verified on every tensor
            survived += int(named)
    finally:
        _kill_actors(rt)
    return {"kind": "rollout worker frozen (SIGSTOP) during weight sync", "injected": count, "survived": survived,
            "samples_lost": 0, "steps_lost": 0, "recover_s": common.summary(waits),
            "note": "survived = StageTimeout naming the sync (4 s timeout), then a verified sync after SIGCONT"}


def disk_full(model: Path, count: int, work: Path) -> dict[str, Any]:
    """A run directory on a small tmpfs, filled up before each of ``count`` checkpoints: each save
    must fail naming the path, leave the previous checkpoint verifiable, and a save after space is
    freed must succeed. Needs CAP_SYS_ADMIN (mount); reported as not run otherwise."""
    from rlkit import checkpoint
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    disk = work / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    row = {"kind": "disk full while checkpointing", "injected": 0, "survived": 0, "samples_lost": 0,
           "steps_lost": 0, "recover_s": common.summary([])}
    if mounted.returncode != 0:
        return row | {"note": f"not run: cannot mount a tmpfs ({mounted.stderr.strip()[:80]})"}
    cfg = tiny_cfg(disk / "run", model)
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt, survived = trainer.runtime, 0
    try:
        rt.sync()
        trainer.step(StageTimer())
        trainer.state.step = 1
        size = sum(p.stat().st_size for p in trainer.save().rglob("*") if p.is_file())
        for k in range(count):
            trainer.state.step = 2 + k
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            filler = disk / "filler"
            with open(filler, "wb") as f:  # leave half a checkpoint of room
                os.posix_fallocate(f.fileno(), 0, max(1, int(free - size // 2)))
            ok = False
            try:
                trainer.save()
            except checkpoint.CheckpointWriteError as e:
                prev = checkpoint.latest(disk / "run")
                ok = f"step_{2 + k:07d}.tmp-" in str(e) and str(prev) in str(e) and prev is not None
                checkpoint.resolve(str(prev), disk / "run")  # verifies and checks every file is whole
            filler.unlink()
            print(f"[faults] disk: checkpoint {size / 2**20:.1f} MiB, free before {free / 2**20:.1f} MiB, "
                  f"failed as expected: {ok}; free now {_free_mib(disk):.1f} MiB", flush=True)
            survived += int(ok and trainer.save().name == f"step_{2 + k:07d}")
    finally:
        _kill_actors(rt)
        subprocess.run(["umount", str(disk)], check=False)
    return row | {"injected": count, "survived": survived,
                  "note": "survived = error naming the file and the intact previous checkpoint, which verifies; "
                          "the next save succeeds"}


def _free_mib(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**20


def node_losses(model: Path, count: int, work: Path) -> dict[str, Any]:
    """``count`` two-node clusters (``ray.cluster_utils.Cluster``), the learners' node's raylet
    killed during step 2 each time: the run must stop within the timeout naming the lost placement
    and a checkpoint that verifies (no node can hold the learners any more)."""
    import ray
    from ray.cluster_utils import Cluster

    from rlkit import checkpoint
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    ray.shutdown()
    survived, stop_s = 0, []
    for k in range(count):
        common_args = {"num_cpus": 1, "object_store_memory": 200 * 2**20}
        cluster = Cluster(initialize_head=True, head_node_args={**common_args, "resources": {"node_a": 1},
                                                                  "include_dashboard": False})
        node_b = cluster.add_node(**common_args, resources={"node_b": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        run = work / f"node{k}"
        cfg = tiny_cfg(run, model, **{"learner.num_ranks": 2, "learner.micro_batch_size": 8, "train.steps": 3,
                                      "resources.placement": "separate", "checkpoint.every_steps": 1,
                                      "recovery.min_timeout_s": 15,
                                      "resources.custom": "{rollout: {node_a: 0.1}, reward: {node_a: 0.1}, "
                                                          "learner: {node_b: 0.1}}"})
        trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
        rt, learn, calls = trainer.runtime, trainer.runtime.learn, []

        def losing(*a, learn=learn, calls=calls, **kw):
            calls.append(1)
            if len(calls) == 2:
                cluster.remove_node(node_b, allow_graceful=False)
            return learn(*a, **kw)

        rt.learn = losing
        t0 = time.perf_counter()
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - the outcome is judged from the message
            stop_s.append(time.perf_counter() - t0)
            prev = checkpoint.latest(run)
            survived += int(prev is not None and str(prev) in str(e) and "could not be placed" in str(e)
                            and checkpoint.resolve("auto", run) == prev)
        finally:
            ray.shutdown()
            cluster.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    return {"kind": "learner node lost (raylet killed) on a two-node cluster", "injected": count,
            "survived": survived, "samples_lost": 0, "steps_lost": count,
            "recover_s": common.summary(stop_s),
            "note": "survived = stopped with an error naming the lost placement and a checkpoint that verifies "
                    "(seconds: run start to the error); the step in flight is redone on resume"}


def _lines(run: Path) -> int:
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def bad_inputs(model: Path, work: Path) -> list[dict[str, str]]:
    """Each kind of bad input and the first line of the message it produces."""
    from rlkit import checkpoint
    from rlkit.config import ConfigError, load_config

    out = []

    def catch(kind: str, fn) -> None:
        try:
            fn()
            out.append({"input": kind, "message": "(accepted)"})
        except Exception as e:  # noqa: BLE001 — the message is what is recorded
            out.append({"input": kind, "message": f"{type(e).__name__}: {str(e).splitlines()[0]}"})

    catch("config: unknown key", lambda: load_config(None, ["learner.lrr=1"]))
    catch("config: wrong type", lambda: load_config(None, ["train.steps=many"]))
    catch("config: unknown algorithm", lambda: load_config(None, ["algorithm.name=ppo2"]))
    catch("config: unknown outcome component", lambda: load_config(None, ["rewards.outcome=brevity"]))
    catch("config: unknown stop signal", lambda: load_config(None, ["recovery.stop_signals=[SIGFOO]"]))
    rows = work / "bad.jsonl"
    rows.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')

    def bad_row() -> None:
        from rlkit.assets import load_tokenizer
        from rlkit.data import DataSpec, load_prompts

        load_prompts(DataSpec(kind="file", path=str(rows)), load_tokenizer(str(model)))

    catch("data: a row without its answer", bad_row)

    def bad_reward_output() -> None:
        from rlkit.rewards import check_output

        check_output(["ok"], 2, "my_reward")

    catch("reward: wrong output (a string, wrong length)", bad_reward_output)
    ck = work / "ckpt"
    tmp = checkpoint.begin(ck, 1)
    path = checkpoint.commit(tmp, 1, {"step": 1}, "x: 1\n", keep=2)
    (path / "trainer_state.pt").write_bytes(b"\x80\x04truncated")
    catch("checkpoint: truncated trainer state", lambda: checkpoint.load_trainer_state(checkpoint.resolve(str(path), ck)))
    catch("checkpoint: not complete", lambda: checkpoint.resolve(str(work), work))
    _ = ConfigError
    return out


def report(data: dict[str, Any]) -> str:
    lines = ["# Reliability", "",
             "What rlkit survives, measured by injecting real faults into tiny-model runs ",
             f"(`make faults`: `bench/faults.py --count {data['args']['count']}`, {data['machine'].get('cpu', 'this machine')}, "
             f"{data['date'][:10]}). The single-injection versions of every row run in CI "
             "(`tests/test_faults.py`, `tests/test_resume.py`, `tests/test_sbatch.py`). Security: docs/security.md.", "",
             "| fault | injected | survived | samples lost | steps lost | seconds to recover (median, min–max) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in data["faults"]:
        s = r["recover_s"]
        rec = "—" if not s["n"] else f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"
        lines.append(f"| {r['kind']} | {r['injected']} | {r['survived']} | {r['samples_lost']} | {r['steps_lost']} | "
                     f"{rec} | {r.get('note', '')} |")
    lines += ["", "## How each fault is handled", "",
              "- **Rollout worker dies** (any signal, OOM, node loss): Ray restarts it (`recovery.actor_restarts`, "
              "default 3); the runtime waits for the new process, syncs the current weights into it (verified on "
              "every tensor) and regenerates that worker's share with the same prompts and seed. A worker that "
              "restarted before running a call answers with policy version 0 and is treated the same way. One "
              "death past the bound stops the run naming the worker and the last checkpoint.",
              "- **Reward actor dies**: restarted, and the batch is scored again.",
              "- **Learner rank dies**: a DeepSpeed step cannot continue without it, so the learner group is "
              "restarted and the run continues from the last checkpoint (`recovery.learner_restarts`, default 2); "
              "`recovery/steps_lost` is logged. Past the bound the run stops naming the rank and the checkpoint.",
              "- **Hung actor**: every wait on an actor in a step has a timeout, `recovery.min_timeout_s` (1800 s) "
              "or `recovery.timeout_factor` (10) × the slowest step so far; a timeout is an error naming the stage.",
              "- **NaN/inf loss or gradient**: the update is skipped on every rank (weights and optimizer state "
              "untouched; ZeRO 1–3 skip on a non-finite gradient norm, ZeRO 0 checks the gradients itself), "
              "counted in `learn/skipped_updates`; `recovery.max_consecutive_skips` (3) in a row stop the run "
              "naming the step and the metric. NaN/inf sampler log-probs, rewards or advantages are caught before "
              "the learner, naming the row and its prompt.",
              "- **Preemption / time limit**: SIGTERM or SIGUSR1 (`recovery.stop_signals`) let the current step "
              "finish, write a checkpoint and exit with code 75; `launch/slurm/rlkit.sbatch` asks for USR1 300 s "
              "before the limit, forwards it and requeues the job, which resumes with `--resume auto` "
              "(docs/launch.md).",
              "- **Hung weight sync**: every wait of a sync (each transport, the verification) has the same "
              "timeout; a frozen engine or learner rank is `StageTimeout: weight sync (<stage>)`.",
              "- **Node loss**: actors on a lost node die. Rollout and reward actors take the actor-death path "
              "above; Ray can restart them only where their placement bundle is rescheduled, otherwise the "
              "wait for the restarted actor ends at the step timeout naming it. Lost learner ranks restart the "
              "learner group, which waits for its placement bundles at most the step timeout, then stops "
              "naming the bundle and the checkpoint to resume from (`tests/test_multinode.py`; only the "
              "learner case is injected).",
              "- **Checkpoint write failure** (disk full, permission denied, on the driver or a learner rank): "
              "checkpoints are written to a temporary folder and renamed when complete; a failed write removes "
              "the partial folder and stops the run with one message naming the file, the free space and the "
              "intact previous checkpoint. A corrupted or truncated checkpoint given to `--resume` fails naming "
              "the file (digest check; with `--trust-checkpoint`, a check that every torch and safetensors file "
              "is whole).",
              "- **Data between actors**: torch tensors cross actors by copy; only the weight buckets of the "
              "object-store sync are read zero-copy, as read-only views that the engines copy from "
              "(`tests/test_sync_collective.py` checks the stored bytes are unchanged), so no run prints a "
              "corruption warning (`tests/test_resume.py`).",
              "", "## Bad input", "", "| input | message |", "|---|---|"]
    for b in data["bad_inputs"]:
        lines.append(f"| {b['input']} | `{b['message'].replace('|', '/')[:300]}` |")
    lines += ["", "## Not covered", "",
              "- A lost learner node is not replaced automatically: the run stops with a resumable checkpoint "
              "(the learners' placement cannot move while `resources.custom` pins it, and DeepSpeed cannot "
              "shrink the group). Resuming on a cluster with the resources continues exactly."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20, help="injections of each kind")
    p.add_argument("--kinds", default="rollout,reward,nan,learner,signal,hang,disk,node")
    p.add_argument("--report", action="store_true", help="only write docs/reliability.md from bench/out/faults.json")
    args = p.parse_args()
    out = common.OUT_DIR / "faults.json"
    if not args.report:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from rlkit.assets import tiny_model_dir

        work = Path(tempfile.mkdtemp(prefix="faults-"))
        model = tiny_model_dir(work / "model")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
        kinds = {"rollout": rollout_kills, "reward": reward_kills, "nan": nan_losses, "learner": learner_kills,
                 "signal": stop_signals, "hang": sync_hangs, "disk": disk_full, "node": node_losses}
        faults = []
        for name in args.kinds.split(","):
            t0 = time.perf_counter()
            # A node-loss injection starts a two-node cluster of its own (about a minute each).
            n = max(1, args.count // 5) if name == "node" else args.count
            faults.append(kinds[name](model, n, work))
            print(f"[faults] {name}: {faults[-1]['survived']}/{faults[-1]['injected']} survived "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        ray.shutdown()
        data = {"bench": "faults", "schema": common.SCHEMA, "machine": common.machine(), "args": vars(args),
                "date": time.strftime("%Y-%m-%d %H:%M"), "faults": faults, "bad_inputs": bad_inputs(model, work)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    data = json.loads(out.read_text())
    (common.ROOT / "docs" / "reliability.md").write_text(report(data))
    print(f"wrote {out} and docs/reliability.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
