"""Fault injection on tiny models, real components only: Ray actors killed with SIGKILL, NaN losses
injected at the learner, hung reward calls, and bad numbers before the learner. Each test asserts
the outcome docs/reliability.md promises: survived with nothing lost, or stopped with a clear error."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from test_runtime import tiny_config  # noqa: E402

CONST = str(Path(__file__).parent / "data" / "const_rewards.py")


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return tiny_llama_dir


def _trainer(cfg):
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    trainer.runtime.sync()
    return trainer


def _kill(rt) -> None:
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a, no_restart=True)
    rt.placement.remove()


def _recording(rt) -> list:
    """Every list of rollouts the runtime hands the driver (the work is unchanged)."""
    seen, collect = [], rt.collect

    def recording(tasks):
        out = collect(tasks)
        seen.append(out)
        return out

    rt.collect = recording
    return seen


def test_rollout_worker_killed_mid_generation_is_restarted_and_the_step_completes(
        ray_session, tmp_path, tiny_model):
    """SIGKILL while a generation call is outstanding, twice: Ray restarts the worker, the runtime
    syncs the current weights into it (verified) and regenerates exactly the step's prompts."""
    from rlkit.metrics import StageTimer

    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0}, **{"learner.num_ranks": 1})
    trainer = _trainer(cfg)
    rt = trainer.runtime
    seen = _recording(rt)
    try:
        trainer.step(StageTimer())  # version 1: a restarted engine (version 0 weights) is detectably stale
        for _ in range(2):
            pid = ray.get(rt.rollout[0].ready.remote())["pid"]
            drawn = trainer.sampler.state_dict()["position"]
            launch = rt.generate_async

            def launch_then_kill(*args, **kw):
                tasks = launch(*args, **kw)
                os.kill(pid, signal.SIGKILL)  # the call is in flight or queued: either way it is lost
                return tasks

            rt.generate_async = launch_then_kill
            m = trainer.step(StageTimer())
            rt.generate_async = launch
            rows = [r.prompt_index for r in seen[-1]]
            # Exactly the step's 4 prompts, each with its 4 samples: none lost or doubled, and no
            # extra batch drawn from the sampler.
            assert len(rows) == 16 and len(set(rows)) == 4 and all(rows.count(i) == 4 for i in set(rows)), rows
            assert trainer.sampler.state_dict()["position"] == drawn + 4
            assert all(r.policy_version == rt.version - 1 for r in seen[-1])  # made by the current weights
            assert ray.get(rt.rollout[0].ready.remote())["pid"] != pid
            assert m["sync/bytes"] > 0
        assert rt.supervisor.deaths["rollout worker 0"] == 2
        assert [e["actor"] for e in rt.supervisor.recovered] == ["rollout worker 0"] * 2
        # One death more than recovery.actor_restarts (3) allows stops the run, naming the worker.
        rt.supervisor.deaths["rollout worker 0"] = 3
        pid = ray.get(rt.rollout[0].ready.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        from rlkit.recovery import ActorLost

        with pytest.raises(ActorLost, match="rollout worker 0 died 4 times"):
            trainer.step(StageTimer())
    finally:
        _kill(rt)


def test_reward_actor_killed_mid_batch_rescores(ray_session, tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0},
                      **{"learner.num_ranks": 1, "rewards.rewards": f"[{{name: '{CONST}:slow_zero'}}]"})
    from rlkit.runtime import Runtime
    from rlkit.trainer import model_dir

    rt = Runtime(cfg, model_dir(cfg), learners=False)
    try:
        pid = ray.get(rt.reward.ready.remote())["pid"]
        out = {}
        worker = threading.Thread(target=lambda: out.update(r=rt.score(["a", "b"], ["p", "q"], [{}, {}], ["s", "s"])))
        worker.start()
        time.sleep(1.5)  # inside the reward function's 3 s
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=120)
        assert out["r"].scores == [0.0, 0.0]
        assert rt.supervisor.deaths["reward worker"] == 1
        assert ray.get(rt.reward.ready.remote())["pid"] != pid
    finally:
        _kill(rt)


def test_nan_loss_skips_the_update_and_repeated_skips_stop(ray_session, tmp_path, tiny_model):
    """The injected NaN loss at update 1 leaves the weights exactly as update 0 left them (and the
    next update trains); three NaN updates in a row stop the run naming the loss."""
    from rlkit.metrics import StageTimer

    cfg = tiny_config(tmp_path / "one", tiny_model, "grpo", {"beta": 0.04},
                      **{"learner.num_ranks": 1, "recovery.inject": "[nan_loss@1]"})
    trainer = _trainer(cfg)
    rt = trainer.runtime
    try:
        vec = lambda: ray.get(rt.learners[0].param_vector.remote())  # noqa: E731
        m0 = trainer.step(StageTimer())
        after0 = vec()
        m1 = trainer.step(StageTimer())
        after1 = vec()
        m2 = trainer.step(StageTimer())
        assert m0["learn/skipped_updates"] == 0 and m2["learn/skipped_updates"] == 0
        assert m1["learn/skipped_updates"] == 1 and m1["learn/nonfinite_loss"] == 1
        assert torch.equal(after0, after1), "a skipped update changed the weights"
        assert not torch.equal(after1, vec()), "the update after the skip did not train"
        assert torch.isfinite(vec()).all()
    finally:
        _kill(rt)

    cfg = tiny_config(tmp_path / "three", tiny_model, "grpo", {"beta": 0.0},
                      **{"learner.num_ranks": 1, "recovery.inject": "[nan_loss@0, nan_loss@1, nan_loss@2]"})
    trainer = _trainer(cfg)
    try:
        trainer.step(StageTimer())
        trainer.step(StageTimer())
        with pytest.raises(RuntimeError, match=r"step \d+: 3 updates in a row skipped for a non-finite loss"):
            trainer.step(StageTimer())
    finally:
        _kill(trainer.runtime)


def test_hung_reward_call_becomes_an_error_naming_the_stage(ray_session, tmp_path, tiny_model):
    from rlkit.metrics import StageTimer
    from rlkit.recovery import StageTimeout

    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0},
                      **{"learner.num_ranks": 1, "rewards.rewards": f"[{{name: '{CONST}:hang'}}]",
                         "rewards.timeout_s": 300, "recovery.min_timeout_s": 4})
    trainer = _trainer(cfg)
    try:
        t0 = time.perf_counter()
        with pytest.raises(StageTimeout, match="score: no answer within 4 s"):
            trainer.step(StageTimer())
        assert time.perf_counter() - t0 < 60
    finally:
        _kill(trainer.runtime)


def test_hung_engine_during_weight_sync_becomes_an_error_naming_the_sync(ray_session, tmp_path, tiny_model):
    """A rollout worker frozen (SIGSTOP, a real hung process) while the weights are sent: the sync's
    wait ends at the step timeout as StageTimeout naming the sync stage, instead of blocking."""
    from rlkit.recovery import StageTimeout

    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0},
                      **{"learner.num_ranks": 1, "recovery.min_timeout_s": 4})
    trainer = _trainer(cfg)
    rt = trainer.runtime
    pid = ray.get(rt.rollout[0].ready.remote())["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(StageTimeout, match=r"weight sync \(engines load shm\): no answer within 4 s"):
            rt.sync()
        assert time.perf_counter() - t0 < 30
    finally:
        os.kill(pid, signal.SIGCONT)
        _kill(rt)


def test_hung_engine_during_evaluation_becomes_an_error_naming_the_evaluation(ray_session, tmp_path, tiny_model):
    """A rollout worker frozen (SIGSTOP) while the held-out set is generated: the greedy and the
    sampled evaluation both end at the step timeout as StageTimeout, instead of blocking the run."""
    from rlkit.recovery import StageTimeout

    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0},
                      **{"learner.num_ranks": 1, "recovery.min_timeout_s": 4})
    trainer = _trainer(cfg)
    rt = trainer.runtime
    pid = ray.get(rt.rollout[0].ready.remote())["pid"]
    prompts = [[1, 2, 3], [4, 5]]
    assert len(rt.greedy(prompts, 4)) == 2  # answers while it runs
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(StageTimeout, match=r"evaluation \(greedy\): no answer within 4 s"):
            rt.greedy(prompts, 4)
        with pytest.raises(StageTimeout, match=r"evaluation \(samples\): no answer within 4 s"):
            rt.sample(prompts, 2, 1.0, 4, seed=0)
        assert time.perf_counter() - t0 < 30
    finally:
        os.kill(pid, signal.SIGCONT)
        _kill(rt)


def test_learner_rank_killed_restarts_the_group_from_the_checkpoint(ray_session, tmp_path, tiny_model):
    """SIGKILL of learner rank 0 after the step-2 checkpoint: fit restarts the learner group from
    it, redoes step 3, and ends with weights bitwise equal to a run that was never interrupted."""
    from safetensors.torch import load_file

    from rlkit import checkpoint
    from rlkit.metrics import read_metrics
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    over = {"learner.num_ranks": 1, "train.steps": 4, "checkpoint.every_steps": 2}
    finals = {}
    for name in ("straight", "killed"):
        cfg = tiny_config(tmp_path / name, tiny_model, "grpo", {"beta": 0.04}, **over)
        rt = Runtime(cfg, model_dir(cfg))
        trainer = Trainer(cfg, runtime=rt)
        stop = threading.Event()
        if name == "killed":
            def killer() -> None:
                while not stop.is_set() and checkpoint.latest(cfg.run_dir) is None:
                    time.sleep(0.05)
                if not stop.is_set():
                    os.kill(ray.get(rt.learners[0].ready.remote())["pid"], signal.SIGKILL)

            threading.Thread(target=killer, daemon=True).start()
        try:
            trainer.fit()
        finally:
            stop.set()
            _kill(rt)
        finals[name] = load_file(str(checkpoint.latest(cfg.run_dir) / "hf" / "model.safetensors"))
        if name == "killed":
            rows = read_metrics(cfg.run_dir)
            restarts = [r for r in rows if "recovery/learner_restarts" in r]
            assert len(restarts) == 1 and restarts[0]["recovery/steps_lost"] >= 0, restarts
            assert trainer.state.learner_restarts == 1 and trainer.state.step == 4
    for n in finals["straight"]:
        assert torch.equal(finals["straight"][n], finals["killed"][n]), f"{n} differs after the learner restart"


def test_non_finite_numbers_are_named_before_the_learner():
    from rlkit.recovery import check_finite
    from rlkit.types import Rollout

    rs = [Rollout([1], [2], [-0.1], "stop", 0, g, 10 + g) for g in range(3)]
    check_finite(5, rs, rewards=torch.tensor([0.0, 1.0, 0.5]), advantages=None)
    with pytest.raises(ValueError, match=r"step 5: non-finite rewards in row 1 \(prompt row 11, group 1\)"):
        check_finite(5, rs, rewards=torch.tensor([0.0, float("nan"), 0.5]))
    with pytest.raises(ValueError, match="non-finite sampler_logp in row 2"):
        check_finite(5, rs, sampler_logp=torch.tensor([[0.0], [-1.0], [float("-inf")]]))
