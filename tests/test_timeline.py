"""Run timelines (rlkit.timeline, ``timeline: true``): spans by hand, and a real asynchronous run
whose timeline shows the next batch generating while the learner trains (docs/async.md)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from rlkit import timeline
from rlkit.metrics import StageTimer
from rlkit.timeline import Spans

TOY_REWARD = str(Path(__file__).parent / "toy_rewards.py") + ":letter_a"


def test_spans_record_in_order_across_threads_and_drain_once():
    s = Spans("rollout 0")
    with s("generate", version=3):
        time.sleep(0.01)

    def sync() -> None:
        with s("sync", version=4):
            pass

    t = threading.Thread(target=sync)
    t.start()
    t.join()
    spans = s.drain()
    assert [(x["what"], x["version"]) for x in spans] == [("generate", 3), ("sync", 4)]
    assert spans[0]["t1"] - spans[0]["t0"] >= 0.01 and spans[0]["who"] == "rollout 0"
    assert s.drain() == []


def test_spans_keep_only_the_newest_and_a_disabled_recorder_keeps_nothing():
    s = Spans("learner 0", keep=3)
    for i in range(5):
        s.add("learn", float(i), i + 0.5)
    assert [x["t0"] for x in s.drain()] == [2.0, 3.0, 4.0]
    off = Spans("driver", enabled=False)
    with off("step"):
        pass
    off.add("learn", 0.0, 1.0)
    assert off.drain() == []


def test_stage_timer_records_wall_clock_spans_of_its_stages():
    s = Spans("driver")
    timer = StageTimer(spans=s)
    with timer("generate"):
        time.sleep(0.01)
    with timer("learn"):
        pass
    spans = s.drain()
    assert [x["what"] for x in spans] == ["generate", "learn"]
    assert spans[0]["t1"] <= spans[1]["t0"]
    assert timer.pop()["time/generate"] == pytest.approx(spans[0]["t1"] - spans[0]["t0"], abs=1e-3)


def test_write_read_window_and_plot(tmp_path):
    spans = [{"who": "driver", "what": "step", "t0": 10.0 + 2 * i, "t1": 11.5 + 2 * i, "step": i + 1} for i in range(4)]
    spans += [{"who": "rollout 0", "what": "generate", "t0": 10.2, "t1": 11.0, "version": 0},
              {"who": "learner 0", "what": "learn", "t0": 11.0, "t1": 11.4}]
    timeline.write(tmp_path, spans[::-1])
    back = timeline.read(tmp_path)
    assert [x["t0"] for x in back] == sorted(x["t0"] for x in spans)
    assert timeline.step_window(back, 2, 3) == (12.0, 15.5)
    assert timeline.step_window(back, 9, 10) is None
    png = timeline.plot(tmp_path, steps=(1, 2))
    assert png.exists() and png.stat().st_size > 1000


ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlkit.assets import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_async_run_timeline_shows_the_next_batch_generating_before_the_learner_finishes(
        ray_session, tmp_path, tiny_model):
    """rollout.max_staleness = 1, timeline on: the run writes timeline.jsonl and its PNG, with one
    driver step span per step, and each batch started at step k ≥ 1 (policy version k, trained at
    step k + 1) starts generating before step k's update ends; with N = 0 it could only start after."""
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    steps = 4
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model}", "data.kind=arithmetic", "data.num_train=64",
        "data.num_eval=8", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]", "rollout.max_new_tokens=8",
        "rollout.threads=1", "learner.threads=1", "learner.num_ranks=1", "learner.micro_batch_size=8",
        "train.prompts_per_step=4", "train.samples_per_prompt=4", f"train.steps={steps}", "eval.num_problems=0",
        "progress=false", "report_to=[]", "algorithm.name=grpo", "algorithm.args.beta=0.0",
        "rollout.max_staleness=1", "learner.tis_cap=2.0", "timeline=true", "checkpoint.every_steps=0",
    ])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        rt = trainer.runtime
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)
        rt.placement.remove()
    spans = timeline.read(cfg.run_dir)
    assert (Path(cfg.run_dir) / "plots" / "timeline.png").exists()
    assert [s["step"] for s in spans if s["who"] == "driver" and s["what"] == "step"] == list(range(1, steps + 1))
    learn = sorted((s for s in spans if s["who"] == "learner 0" and s["what"] == "learn"), key=lambda s: s["t0"])
    gen = sorted((s for s in spans if s["who"] == "rollout 0" and s["what"] == "generate"), key=lambda s: s["t0"])
    syncs = [s for s in spans if s["who"] == "rollout 0" and s["what"] == "sync"]
    assert len(learn) == steps
    assert sorted(s["version"] for s in syncs) == list(range(steps + 1))  # the start, then one per update
    # Step 0 starts two batches at version 0; step k ≥ 1 starts one at version k (the last ones
    # may still be running when the run ends, and are drained with it).
    assert [g["version"] for g in gen][:steps + 1] == [0, 0, *range(1, steps)]
    for k in range(1, steps):
        started_k = next(g for g in gen if g["version"] == k)
        assert started_k["t0"] < learn[k]["t1"]
        assert started_k["t0"] > learn[k - 1]["t1"]  # after the sync to version k
