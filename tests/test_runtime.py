"""The whole actor graph, for real: Ray, HF-engine rollout workers, the reward worker in child
processes, and a 2-rank DeepSpeed ZeRO-2 learner group on gloo, with a tiny Llama model that uses
SmolLM2's real tokenizer. One Ray session serves the module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from rlkit.config import load_config  # noqa: E402

TOY_REWARD = str(Path(__file__).parent / "toy_rewards.py") + ":letter_a"


def tiny_config(tmp_path: Path, model_dir: Path, algorithm: str = "grpo", args: dict | None = None, **over):
    """A run config for the tiny model: 4 prompts × 4 samples, 8 new tokens, 2 learner ranks."""
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}", "data.kind=arithmetic",
        "data.num_train=64", "data.num_eval=8", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]",
        "rollout.max_new_tokens=8", "rollout.threads=1", "learner.threads=1", "learner.num_ranks=2",
        "learner.micro_batch_size=4", "learner.lr=1.0e-3", "train.prompts_per_step=4",
        "train.samples_per_prompt=4", "train.steps=3", "eval.num_problems=0", "progress=false",
        "report_to=[]", f"algorithm.name={algorithm}",
    ]
    overrides += [f"algorithm.args.{k}={v}" for k, v in (args or {}).items()]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlkit.assets import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_grpo_three_steps_changes_weights_and_syncs(ray_session, tmp_path, tiny_model):
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime, SyncError
    from rlkit.trainer import Trainer, model_dir

    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.04})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    # CPU learners and HF engines keep freed memory in their heap (glibc): buffers are not refaulted.
    assert all(ray.get(a.ready.remote())["holds_heap"] for a in rt.learners + rt.rollout)
    rt.sync()
    before = ray.get(rt.learners[0].param_vector.remote())
    timer = StageTimer()
    # Step 0: identical weights on both sides, so the sampler-vs-learner gap is ~0.
    m0 = trainer.step(timer)
    assert m0["gap/kl"] < 1e-4, m0
    assert m0["gap/max_ratio"] < 1.01, m0
    for _ in range(2):
        m = trainer.step(timer)
    after = ray.get(rt.learners[0].param_vector.remote())
    assert not torch.equal(before, after), "the learner's parameters did not change"
    # Both ranks hold the same weights after ZeRO-2 steps.
    other = ray.get(rt.learners[1].param_vector.remote())
    assert torch.equal(after, other)
    assert rt.version == 3
    assert m["sync/bytes"] > 0 and "kl/mean" in m
    # Every step carries the hack monitors over its scored samples (docs/rewards.md "Hack monitors").
    assert {"hack/not_value_frac", "hack/answer_in_prompt_frac", "hack/format_only_frac", "hack/unevaluated_frac",
            "hack/alerts"} <= set(m) and 0.0 <= m["hack/not_value_frac"] <= 1.0
    # One node: syncs went through shared memory; the object-store path must agree with it.
    assert rt.weight_sync.transport.name == "shm"
    rt.sync(transport="object")
    # One more update on the stored batch, then a sync that deliberately skips the only rollout
    # worker: the driver must notice that the engine still holds the previous policy.
    rt.learn(None, {})
    with pytest.raises(SyncError):
        rt.sync(skip=(0,))
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a)
    # The killed learner never closed its shared-memory slots; the driver unlinks them.
    from rlkit.sync import release_shm_segments, shm_segments
    from rlkit.workers.shm_sync import segment_names

    left = [n for n in segment_names(rt.weight_sync.transport.tag) if os.path.exists(f"/dev/shm/{n}")]
    assert left and set(left) <= set(shm_segments())
    assert set(left) <= set(release_shm_segments())
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in left) and not shm_segments()


def test_lora_trains_adapters_and_syncs_only_them(ray_session, tmp_path, tiny_model):
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    cfg = tiny_config(tmp_path, tiny_model, "grpo", None, **{"learner.lora.enabled": "true", "learner.lora.r": "4",
                                                             "learner.lora.alpha": "8"})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    full_bytes = sum(t.numel() * t.element_size() for t in _tiny_weights(tiny_model).values())
    timer = StageTimer()
    metrics = [trainer.step(timer) for _ in range(3)]
    # Only adapters travel: r = 4 on q/k/v/o of every layer is a small fraction of the model.
    assert 0 < metrics[-1]["sync/bytes"] < 0.1 * full_bytes, (metrics[-1]["sync/bytes"], full_bytes)
    # The adapters were trained (B starts at zero), so the merged weights moved off the base.
    state = ray.get(rt.learners[0].full_state.remote(1 << 30))
    names = state["names"]
    deltas = [d for ref in state["refs"] for d in ray.get(ref)]
    assert any(float(d.B.abs().max()) > 0 for d in deltas)
    del state
    # Every adapted weight in the engine equals the learner's merged weight, not only the probes.
    want = ray.get(rt.learners[0].checksum.remote(names))
    got = ray.get(rt.rollout[0].checksum.remote(names))["sums"]
    base = _tiny_weights(tiny_model)
    for n in names:
        assert got[n] == pytest.approx(want[n], rel=1e-5, abs=1e-6), n
    assert any(abs(got[n] - float(base[n].double().sum())) > 1e-4 for n in names)
    # The engine samples from the policy the learner scores: the gap stays ~0 after LoRA syncs.
    assert metrics[-1]["gap/kl"] < 1e-4, metrics[-1]
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a)


def test_zero3_shards_weights_matches_zero2_and_syncs(ray_session, tmp_path, tiny_model):
    """ZeRO-3 on 2 ranks: each rank holds half of the weights, yet an update equals ZeRO-2's on the
    same rollouts, every sync delivers the full weights, and the checkpoint holds the full model."""
    from safetensors.torch import load_file

    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime, SyncError
    from rlkit.trainer import Trainer, model_dir

    first: dict[int, torch.Tensor] = {}
    for stage in (2, 3):
        cfg = tiny_config(tmp_path / f"z{stage}", tiny_model, "grpo", {"beta": 0.04},
                          **{"learner.zero_stage": stage})
        trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
        rt = trainer.runtime
        try:
            rt.sync()
            before = rt.on_learners("param_vector")
            timer = StageTimer()
            m0 = trainer.step(timer)  # same seeds and weights, so the same rollouts at both stages
            assert m0["gap/kl"] < 1e-4, m0
            first[stage] = rt.on_learners("param_vector")
            assert not torch.equal(before, first[stage])
            if stage == 2:
                continue
            elems = ray.get([a.param_elems.remote() for a in rt.learners])
            assert all(e["full"] == before.numel() for e in elems)
            assert all(e["local"] <= e["full"] // 2 + 1024 for e in elems), elems  # a shard, not a copy
            for _ in range(2):
                m = trainer.step(timer)
                assert m["gap/kl"] < 1e-4, m  # the engine samples from the full, synced policy
            assert rt.weight_sync.transport.name == "shm"
            rt.sync(transport="object")  # verified by checksums, like every sync
            rt.learn(None, {})
            with pytest.raises(SyncError):
                rt.sync(skip=(0,))
            rt.sync()
            # The HF checkpoint is the full model, gathered from both shards.
            saved = rt.on_learners("param_vector")
            rt.save(str(tmp_path / "ckpt"), {})
            hf = load_file(str(tmp_path / "ckpt" / "hf" / "model.safetensors"))
            names = rt.on_learners("full_state", 1 << 30)["names"]
            assert sum(hf[n].numel() for n in names) == saved.numel()
            torch.testing.assert_close(torch.cat([hf[n].flatten() for n in names]), saved, rtol=0, atol=0)
            rt.learn(None, {})
            assert not torch.equal(rt.on_learners("param_vector"), saved)
            rt.load(str(tmp_path / "ckpt"))
            torch.testing.assert_close(rt.on_learners("param_vector"), saved, rtol=0, atol=0)
        finally:
            for a in rt.learners + rt.rollout + [rt.reward]:
                ray.kill(a)
    # One GRPO update from the same rollouts: sharded and replicated weights agree up to summation
    # order. Adam's first step moves a weight by about lr·g/(|g| + eps), so where a gradient is near
    # eps a different order shifts it by a fraction of lr (1e-3): the bound is 1 % of lr.
    torch.testing.assert_close(first[3], first[2], rtol=0, atol=1e-5)


def _tiny_weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


ALL_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# grpo_demo and custom_reward_example are GRPO with other data/rewards: their algorithm is covered.
# grpo_gpu asks for GPUs and vLLM: it validates and plans on CPU (test_plan.py), it cannot start here.
CONFIGS = [p for p in ALL_CONFIGS if p.stem not in ("grpo_demo", "custom_reward_example", "grpo_gpu")]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.stem for p in ALL_CONFIGS])
def test_every_shipped_config_validates_and_is_headed_by_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# rlkit train configs/") or first.startswith("# make demo"), first
    cfg = load_config(path)
    assert cfg.train.steps > 0


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    from rlkit.assets import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("teacher") / "model", seed=1)


def config_at_tiny_size(path: Path, tmp_path: Path, model: Path, teacher: Path):
    """A shipped config with only the sizes (and the reward, for a random model) made tiny."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    over = [
        f"run_dir={tmp_path / 'run'}", f"model.path={model}", "rollout.max_new_tokens=8", "rollout.threads=1",
        "learner.threads=1", "learner.num_ranks=2", "learner.micro_batch_size=4", "learner.lr=1.0e-3",
        "train.prompts_per_step=4", "train.samples_per_prompt=4", "eval.num_problems=0", "progress=false",
        "report_to=[]", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]",
    ]
    if raw["data"]["kind"] == "arithmetic":
        over += ["data.num_train=64", "data.num_eval=8"]
    if raw.get("model", {}).get("teacher_path"):
        over.append(f"model.teacher_path={teacher}")
    return load_config(path, over)


def _three_steps(cfg) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        rt.sync()
        before = ray.get(rt.learners[0].param_vector.remote())
        timer = StageTimer()
        metrics = [trainer.step(timer) for _ in range(3)]
        after = ray.get(rt.learners[1].param_vector.remote())
    finally:
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)
    return before, after, metrics


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_trains_three_steps(ray_session, tmp_path, tiny_model, teacher_model, path):
    """Each algorithm's config, at tiny size, through the whole actor graph (2 DeepSpeed ranks)."""
    cfg = config_at_tiny_size(path, tmp_path, tiny_model, teacher_model)
    before, after, metrics = _three_steps(cfg)
    assert not torch.equal(before, after), f"{path.name}: the learner's parameters did not change"
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics), metrics


def test_tiny_model_learns_the_toy_task(ray_session, tmp_path, tiny_model):
    """GRPO raises the toy reward (fraction of 'a' characters) of a random tiny model.

    Margin: the mean reward of the last 3 steps must exceed that of the first 3 by at least 0.03
    absolute and by 40 %. A random model with SmolLM2's 49k-token vocabulary starts near 0.064 (the
    share of 'a' among its tokens' characters) and its step-to-step spread before learning is about
    0.005, so +0.03 is about six times the noise; with fixed seeds the run is deterministic (measured:
    0.064 → 0.111 over 12 steps), so the test fails only if learning breaks.
    """
    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0, "loss_agg_mode": "token-mean"},
                      **{"learner.num_ranks": 1, "train.samples_per_prompt": 8, "rollout.max_new_tokens": 12,
                         "learner.lr": 1.0e-2, "learner.micro_batch_size": 16})
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        rt.sync()
        timer = StageTimer()
        rewards = [trainer.step(timer)["reward/mean"] for _ in range(12)]
    finally:
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.03 and last >= 1.4 * first, rewards


def test_overlap_generates_next_step_during_learning(ray_session, tmp_path, tiny_model):
    """rollout.overlap: step k+1's samples come from the weights before step k's update (staleness 1)."""
    cfg = tiny_config(tmp_path, tiny_model, "grpo", {"beta": 0.0}, **{"rollout.overlap": True})
    before, after, metrics = _three_steps(cfg)
    assert not torch.equal(before, after)
    assert metrics[0]["rollout/staleness_mean"] == 0.0
    assert [m["rollout/staleness_mean"] for m in metrics[1:]] == [1.0, 1.0]


def test_sync_check_catches_one_corrupted_middle_tensor(ray_session, tmp_path, tiny_model):
    """The post-sync check covers every tensor: a single weight that differs in one element, in the
    middle of the model and not among the first, middle or last names, is reported by name."""
    from rlkit.runtime import Runtime, SyncError
    from rlkit.trainer import model_dir

    cfg = tiny_config(tmp_path, tiny_model, "grpo", None, **{"learner.num_ranks": 1})
    rt = Runtime(cfg, model_dir(cfg))
    try:
        rt.sync()
        state = ray.get(rt.learners[0].full_state.remote(1 << 30))
        names = state["names"]
        assert set(state["sums"]) == set(names) and len(names) > 6  # a checksum for every tensor sent
        target = names[len(names) // 2 + 1]
        weight = dict(t for ref in state["refs"] for t in ray.get(ref))[target].clone()
        weight.view(-1)[weight.numel() // 2] += 0.5
        ray.get(rt.rollout[0].load_buckets.remote(rt.version, [[(target, weight)]]))
        with pytest.raises(SyncError, match=f"1 of {len(names)} tensors differ.*'{target}'"):
            rt.weight_sync.verify(rt.version, state["sums"])
        rt.sync(transport="object")  # a full sync repairs it, and verifies
    finally:
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)


def test_group_filter_policy_is_honoured_exactly(ray_session, tmp_path, tiny_model):
    """DAPO declares "draw up to max_num_gen_batches, then raise": with every group tied it draws
    exactly that many batches and stops with the counts. PMD-mean declares "one batch, train on
    what is left": its short steps train and log filter/short_groups."""
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    const = str(Path(__file__).parent / "data" / "const_rewards.py") + ":zero"
    cfg = tiny_config(tmp_path / "dapo", tiny_model, "dapo", {"max_num_gen_batches": 3},
                      **{"learner.num_ranks": 1, "rewards.rewards": f"[{{name: '{const}'}}]"})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        with pytest.raises(RuntimeError, match=r"kept 0/4 prompt groups after 3 generation batches"):
            trainer.step(StageTimer())
        assert trainer.sampler.state_dict()["position"] == 3 * 4  # exactly three batches drawn
        assert rt.version == 0  # nothing was trained on
    finally:
        _kill(rt)

    cfg = tiny_config(tmp_path / "pmd", tiny_model, "pmd_mean", {"reward_ub": 0.07},
                      **{"learner.num_ranks": 1, "train.samples_per_prompt": 8})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    try:
        trainer.runtime.sync()
        metrics = [trainer.step(StageTimer()) for _ in range(2)]
        assert trainer.sampler.state_dict()["position"] == 2 * 4  # one batch per step, never more
        assert all(m["filter/rounds"] == 1.0 for m in metrics)
        assert any(m["filter/short_groups"] > 0 for m in metrics), metrics
        assert trainer.runtime.version == 2  # short steps still train
    finally:
        _kill(trainer.runtime)


def test_on_policy_pairs_draw_more_batches_when_every_group_ties(ray_session, tmp_path, tiny_model):
    """f-DPO on sampled groups: a group whose completions all scored the same gives no pair, so a
    step draws further batches (up to trainer.PAIR_ROUNDS) and, with every group tied, stops with
    a message that says so, having trained nothing."""
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import PAIR_ROUNDS, Trainer, model_dir

    const = str(Path(__file__).parent / "data" / "const_rewards.py") + ":zero"
    cfg = tiny_config(tmp_path, tiny_model, "fdpo", **{"learner.num_ranks": 1,
                                                       "rewards.rewards": f"[{{name: '{const}'}}]"})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        with pytest.raises(RuntimeError, match=rf"no preference pair in {PAIR_ROUNDS} generation batches of 4 "
                                               r"prompts: in every group all completions scored the same"):
            trainer.step(StageTimer())
        assert trainer.sampler.state_dict()["position"] == PAIR_ROUNDS * 4
        assert rt.version == 0
    finally:
        _kill(rt)


def _kill(rt) -> None:
    """End a runtime's actors but keep the module's Ray session."""
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a)
    rt.placement.remove()
