"""The reward worker as a Ray actor: faults are pinned and counted, and the actor keeps answering."""

import os

import pytest

ray = pytest.importorskip("ray")

from rlkit.rewards import RewardConfig  # noqa: E402
from rlkit.workers.reward import make_reward_actor  # noqa: E402

FAULTS = os.path.join(os.path.dirname(__file__), "data", "fault_rewards.py")
N = 100


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_reward_actor_pins_faults_and_keeps_answering(ray_local):
    # a relative file path: the spec makes it absolute in the driver, so the actor finds it
    rel = os.path.relpath(FAULTS)
    specs = [
        {"name": "math"},
        {"name": f"{rel}:aborts", "weight": 0.0, "kwargs": {"key": "crash"}},
        {"name": f"{rel}:hangs", "weight": 0.0, "kwargs": {"key": "hang"}},
        {"name": f"{rel}:raises", "weight": 0.0, "kwargs": {"key": "boom"}},
    ]
    actor = make_reward_actor(RewardConfig(rewards=specs, timeout_s=2.0, num_procs=2), num_cpus=0)
    try:
        completions = [rf"\boxed{{\frac{{{2 * i + 1}}}{{2}}}}" for i in range(N)]  # never a whole number
        fields = [
            {"answer": str((2 * i + 1) / 2), "crash": i % 25 == 3, "hang": i % 25 == 7, "boom": i % 25 == 11}
            for i in range(N)
        ]
        sources = ["gsm8k" if i % 2 else "math" for i in range(N)]
        res = ray.get(actor.score.remote(completions, ["p"] * N, fields, sources), timeout=300)
        assert [i for i, s in enumerate(res.status_by_component["aborts"]) if s != "ok"] == list(range(3, N, 25))
        assert {res.status_by_component["aborts"][i] for i in range(3, N, 25)} == {"error"}
        assert [i for i, s in enumerate(res.status_by_component["hangs"]) if s == "timeout"] == list(range(7, N, 25))
        assert [i for i, s in enumerate(res.status_by_component["raises"]) if s == "error"] == list(range(11, N, 25))
        assert res.components["math"] == [1.0] * N  # \frac{2i+1}{2} == (2i+1)/2 for every sample
        bad = {i for i in range(N) if i % 25 in (3, 7, 11)}
        assert res.scores == [0.0 if i in bad else 1.0 for i in range(N)]
        assert res.metrics["aborts/gsm8k/error_rate"] + res.metrics["aborts/math/error_rate"] == pytest.approx(4 / 50)
        # the actor still answers, with fresh children, and counted everything
        clean = [{"answer": "1", "crash": False, "hang": False, "boom": False}] * 8
        res2 = ray.get(actor.score.remote([r"\boxed{1}"] * 8, ["p"] * 8, clean), timeout=120)
        assert res2.status == ["ok"] * 8 and res2.scores == [1.0] * 8
        stats = ray.get(actor.stats.remote())
        assert stats["aborts/error"] == 4 and stats["hangs/timeout"] == 4 and stats["raises/error"] == 4
    finally:
        ray.get(actor.close.remote(), timeout=60)
        ray.kill(actor)
