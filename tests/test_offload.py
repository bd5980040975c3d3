"""DeepSpeed ZeRO-Offload through the learner (``learner.offload_optimizer``, ``offload_params``):
the optimizer states really live in DeepSpeed's host partitions, and an update equals the one
without offload (same rollouts, same AdamW), on real Ray actors and DeepSpeed ranks."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from test_runtime import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return tiny_llama_dir


def _offload_state(learner) -> dict:
    """What DeepSpeed's ZeRO optimizer of a rank says about offload, read inside the rank."""
    def probe(self):
        zero = self.engine.optimizer
        # ZeRO-1/2's optimizer calls it cpu_offload, ZeRO-3's offload_optimizer.
        return {"cpu_offload": bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)),
                "offload_param": bool(getattr(self.engine, "zero_offload_param", lambda: None)()),
                "optimizer": type(getattr(zero, "optimizer", zero)).__name__}

    return ray.get(learner.__ray_call__.remote(probe))


@pytest.mark.parametrize(("stage", "over"), [
    (2, {"learner.offload_optimizer": "true"}),
    (3, {"learner.offload_optimizer": "true", "learner.offload_params": "true"}),
])
def test_offloaded_update_equals_the_plain_one(ray_session, tmp_path, tiny_model, stage, over):
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    after = {}
    for name, extra in (("plain", {}), ("offload", over)):
        cfg = tiny_config(tmp_path / name, tiny_model, "grpo", {"beta": 0.04},
                          **{"learner.zero_stage": stage, **extra})
        trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
        rt = trainer.runtime
        try:
            rt.sync()
            before = rt.on_learners("param_vector")
            state = _offload_state(rt.learners[0])
            assert state["cpu_offload"] == (name == "offload"), state
            if stage == 3:
                assert state["offload_param"] == (name == "offload"), state
            m = trainer.step(StageTimer())  # same seeds and weights: the same rollouts both times
            assert m["gap/kl"] < 1e-4, m
            after[name] = rt.on_learners("param_vector")
            assert not torch.equal(before, after[name])
            trainer.step(StageTimer())  # a second update from the offloaded states, synced and verified
        finally:
            for a in rt.learners + rt.rollout + [rt.reward]:
                ray.kill(a)
    # Same gradients, same AdamW on fp32 partitions: equal up to the order of the reductions.
    torch.testing.assert_close(after["offload"], after["plain"], rtol=0, atol=1e-5)
