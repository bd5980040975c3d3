"""Two Ray nodes on one machine: the rollout worker on one, the learner ranks on the other.

``ray.cluster_utils.Cluster`` starts two raylets (separate object stores, separate worker pools)
that carry the custom resources ``node_a`` / ``node_b``; ``resources.custom`` pins each role to
one of them through its placement-group bundle. A tiny GRPO job then trains for two steps, so the
weight sync (rank 0 on node_b → driver on node_a's raylet → rollout worker on node_a) crosses
the node boundary and is checked by the runtime's checksums after every step. Across nodes the
sync goes through the collective transport over gloo (rank 0 broadcasts to the engine).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from rlkit.config import load_config

TOY_REWARD = str(Path(__file__).parent / "toy_rewards.py") + ":letter_a"


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    # Set before the raylets start: their workers (the actors) inherit the environment.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    common = {"num_cpus": 1, "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**common, "resources": {"node_a": 1}, "include_dashboard": False})
    cluster.add_node(**common, resources={"node_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _config(tmp_path: Path, model_dir: Path):
    custom = "{rollout: {node_a: 0.1}, reward: {node_a: 0.1}, learner: {node_b: 0.1}}"
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}", "data.kind=arithmetic",
        "data.num_train=32", "data.num_eval=4", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]",
        "rollout.max_new_tokens=6", "rollout.threads=1", "learner.threads=1", "learner.num_ranks=2",
        "learner.micro_batch_size=4", "learner.lr=1.0e-3", "train.prompts_per_step=2",
        "train.samples_per_prompt=4", "train.steps=2", "eval.num_problems=0", "progress=false",
        "report_to=[]", "algorithm.name=grpo", "resources.placement=separate",
        f"resources.custom={custom}",
    ])


def _actor_node(actor) -> str:
    # __ray_call__ runs a function inside the actor's own process: where it really lives.
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def test_rollout_and_learners_on_different_nodes_sync_across(two_nodes, tmp_path, tiny_llama_dir):
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    node_of = {name: n["NodeID"] for n in ray.nodes() if n["Alive"] for name in ("node_a", "node_b")
               if name in n["Resources"]}
    assert len(set(node_of.values())) == 2, node_of

    cfg = _config(tmp_path, tiny_llama_dir)
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        assert _actor_node(rt.rollout[0]) == node_of["node_a"]
        assert _actor_node(rt.reward) == node_of["node_a"]
        assert [_actor_node(a) for a in rt.learners] == [node_of["node_b"]] * 2
        # The placement groups agree with where the actors run.
        assert rt.placement.node_id("learner", 0) == node_of["node_b"]
        assert rt.placement.node_id("rollout", 0) == node_of["node_a"]

        first = rt.sync()  # version 0 from rank 0 (node_b) into the engine (node_a), checksummed
        before = ray.get(rt.learners[0].param_vector.remote())
        timer = StageTimer()
        metrics = [trainer.step(timer) for _ in range(2)]
        after = ray.get(rt.learners[0].param_vector.remote())
        assert not torch.equal(before, after), "the learner's parameters did not change"
        assert rt.version == 2
        n_bytes = 4 * before.numel()  # fp32; the tiny model's tied embedding is sent once
        assert first["sync/bytes"] == pytest.approx(n_bytes, rel=0.01)
        assert all(m["sync/bytes"] == pytest.approx(n_bytes, rel=0.01) for m in metrics)
        # The engine on node_a holds exactly the weights rank 0 on node_b has now.
        names = ray.get(rt.learners[0].full_state.remote(1 << 30))["names"]  # every tensor a sync sends
        want = ray.get(rt.learners[0].checksum.remote(names))
        got = ray.get(rt.rollout[0].checksum.remote(names))
        assert got["version"] == 2
        for name in names:
            assert got["sums"][name] == pytest.approx(want[name], rel=1e-6, abs=1e-6)
        # Across nodes on CPU the automatic transport is rank 0's gloo broadcast group
        # (rlkit.sync.CollectiveTransport); the object store delivers the same weights.
        assert rt.weight_sync.transport.name == "collective"
        rt.sync(transport="object")
    finally:
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)
        rt.placement.remove()


def test_learner_node_lost_mid_run_stops_with_a_resumable_checkpoint(two_nodes, tmp_path, tiny_llama_dir):
    """node_b's raylet (both learner ranks) is killed during step 2. The learner group cannot
    restart: no node carries ``node_b`` any more. The run must not hang: within the step timeout
    it stops with an error naming the lost placement and the checkpoint to resume from, and that
    checkpoint verifies. (Runs last in this module: the cluster keeps one node afterwards.)"""
    from rlkit import checkpoint
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "run_dir": tmp_path / "run", "model.path": tiny_llama_dir, "data.kind": "arithmetic",
        "data.num_train": 32, "data.num_eval": 4, "rewards.rewards": f"[{{name: '{TOY_REWARD}'}}]",
        "rollout.max_new_tokens": 6, "rollout.threads": 1, "learner.threads": 1, "learner.num_ranks": 2,
        "learner.micro_batch_size": 4, "learner.lr": 1.0e-3, "train.prompts_per_step": 2,
        "train.samples_per_prompt": 4, "train.steps": 3, "eval.num_problems": 0, "progress": "false",
        "report_to": "[]", "algorithm.name": "grpo", "resources.placement": "separate",
        "resources.custom": "{rollout: {node_a: 0.1}, reward: {node_a: 0.1}, learner: {node_b: 0.1}}",
        "checkpoint.every_steps": 1, "recovery.min_timeout_s": 15, "recovery.learner_restarts": 2,
    }.items()])
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    node_b = next(n for n in two_nodes.worker_nodes)
    learn, calls = rt.learn, []

    def learn_losing_node_b(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            two_nodes.remove_node(node_b, allow_graceful=False)
        return learn(*args, **kw)

    rt.learn = learn_losing_node_b
    t0 = time.perf_counter()
    try:
        with pytest.raises(Exception) as e:
            trainer.fit()
        elapsed = time.perf_counter() - t0
        msg = str(e.value)
        assert elapsed < 240, (elapsed, msg)
        ckpt = checkpoint.root(tmp_path / "run") / "step_0000001"
        assert str(ckpt) in msg and "--resume auto" in msg, msg
        assert "learner rank" in msg and "could not be placed" in msg, msg  # names the lost placement
        assert checkpoint.resolve("auto", tmp_path / "run") == ckpt
    finally:
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)
        rt.placement.remove()
