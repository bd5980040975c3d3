"""Bounded asynchronous RL (docs/async.md): the off-policy corrections by hand, the staleness bound
under randomized timing, N = 0 against the synchronous loop bitwise, and real runs with N = 2."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from rlkit.async_rl import GenerationBuffer, Started, off_policy_weights, split_fresh, staleness_ok
from rlkit.config import ConfigError, load_config

TOY_REWARD = str(Path(__file__).parent / "toy_rewards.py") + ":letter_a"


# ------------------------------------------------------------------ the corrections, by hand
def _case():
    """Two sequences of two tokens. Row 0: π_old = (0.5, 0.2), π_behaviour = (0.25, 0.4), so
    ρ = (2, 0.5) and the sequence ratio is 1. Row 1: one real token, π_old 0.9 vs 0.3, ρ = 3 (the
    padded token's numbers are junk and must not count)."""
    old = torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.7]]))
    beh = torch.log(torch.tensor([[0.25, 0.4], [0.3, 0.01]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return old, beh, mask


def test_token_tis_caps_each_token_ratio():
    # w = min(ρ, 1.5): (2, 0.5) → (1.5, 0.5); 3 → 1.5; the pad gets 0. Two of three tokens capped.
    old, beh, mask = _case()
    w, m = off_policy_weights(old, beh, mask, "token_tis", cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5], [1.5, 0.0]]))
    assert m["is/clipped_frac"] == pytest.approx(2 / 3)
    assert m["is/ratio_mean"] == pytest.approx((2 + 0.5 + 3) / 3)
    assert m["is/ratio_max"] == pytest.approx(3.0)
    assert m["is/masked_frac"] == 0.0
    # Bitwise the learner's historical expression exp(old − sampler).clamp(max=cap) · mask.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mk = (torch.rand(3, 5, generator=g) > 0.3).float()
    assert torch.equal(off_policy_weights(a, b, mk, "token_tis", cap=2.0)[0], torch.exp(a - b).clamp(max=2.0) * mk)


def test_seq_is_caps_the_product_of_ratios_in_log_space():
    # Row 0: 2 · 0.5 = 1 (under the cap 2) on both tokens; row 1: 3 → 2 on its one token.
    old, beh, mask = _case()
    w, m = off_policy_weights(old, beh, mask, "seq_is", cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    assert m["is/seq_log_ratio_mean"] == pytest.approx(math.log(3) / 2)
    assert m["is/seq_log_ratio_max"] == pytest.approx(math.log(3))
    assert m["is/clipped_frac"] == pytest.approx(1 / 3)
    # 400 tokens each with ρ = e: the product e^400 overflows float32, the capped weight does not.
    long_old, long_beh = torch.ones(1, 400), torch.zeros(1, 400)
    w, _ = off_policy_weights(long_old, long_beh, torch.ones(1, 400), "seq_is", cap=5.0)
    assert torch.isfinite(w).all() and torch.allclose(w, torch.full((1, 400), 5.0))


def test_token_mask_drops_tokens_outside_the_bounds():
    # Bounds [0.6, 2.5]: ρ = 2 kept, 0.5 dropped, 3 dropped; 2 of 3 tokens masked.
    old, beh, mask = _case()
    w, m = off_policy_weights(old, beh, mask, "token_mask", low=0.6, high=2.5)
    assert torch.equal(w, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert m["is/masked_frac"] == pytest.approx(2 / 3)
    # No upper bound: only 0.5 < 0.6 goes.
    w, _ = off_policy_weights(old, beh, mask, "token_mask", low=0.6)
    assert torch.equal(w, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_seq_mask_drops_whole_sequences_outside_the_bounds():
    # Bounds [0.6, 2.5]: row 0's product 1 is kept (although its token 0.5 is out), row 1's 3 is not.
    old, beh, mask = _case()
    w, m = off_policy_weights(old, beh, mask, "seq_mask", low=0.6, high=2.5)
    assert torch.equal(w, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert m["is/masked_frac"] == pytest.approx(1 / 3)


def _cfg(*over: str):
    return load_config(None, ["report_to=[]", "progress=false", *over])


def test_config_refuses_corrections_that_would_do_nothing_or_be_wrong():
    _cfg("learner.is_correction=seq_is", "learner.tis_cap=2.0")
    _cfg("learner.is_correction=token_mask", "learner.is_low=0.5", "learner.is_high=2.0")
    _cfg("algorithm.name=pmd_mean", "learner.is_correction=seq_mask", "learner.is_high=2.0")
    bad = {"seq_is needs a cap": ["learner.is_correction=seq_is"],
           "a mask needs a bound": ["learner.is_correction=token_mask"],
           "bounds only for masks": ["learner.tis_cap=2.0", "learner.is_high=3.0"],
           "a cap only for scaling": ["learner.is_correction=seq_mask", "learner.is_high=2.0", "learner.tis_cap=2"],
           "inverted bounds": ["learner.is_correction=seq_mask", "learner.is_low=2.0", "learner.is_high=1.0"],
           "non-linear loss": ["algorithm.name=pmd_mean", "learner.is_correction=seq_is", "learner.tis_cap=2.0"],
           "overlap and staleness": ["rollout.max_staleness=2", "rollout.overlap=true"]}
    for why, over in bad.items():
        with pytest.raises(ConfigError):
            _cfg(*over)
            pytest.fail(why)


# ------------------------------------------------------------------ the bound, with random timing
class _Sample:
    def __init__(self, version: int):
        self.policy_version = version


class _Group:
    def __init__(self, version: int, size: int = 2):
        self.rollouts = [_Sample(version) for _ in range(size)]


def _simulate(n: int, seed: int, steps: int = 40) -> dict:
    """A discrete-event model of the asynchronous loop on plain objects: rollout workers are FIFO
    queues (a Ray actor's call order) of generations with random durations and syncs; the driver
    uses the real GenerationBuffer and split_fresh, learns for a random time, then syncs (which
    waits on each worker behind the generations queued before it). Each generation records the
    version its worker held when it ran; a filter takes a random extra batch, and its surplus
    groups are carried to the next step."""
    rng = random.Random(seed)
    workers = 2
    queues = [[] for _ in range(workers)]  # pending (kind, payload)
    held = [0] * workers  # the version each worker's engine holds
    busy_until = [0.0] * workers
    clock, version, counter = 0.0, 0, 0
    buffer = GenerationBuffer(n)
    results: dict[int, list[int]] = {}
    carry: list = []
    seen = {"max_staleness": 0, "max_buffered": 0, "dropped": 0, "trained": 0}

    def run_worker(w: int, until: float) -> None:
        """Run worker w's queue in order up to time ``until`` (inf: drain it)."""
        while queues[w] and busy_until[w] <= until:
            kind, payload = queues[w].pop(0)
            if kind == "gen":
                results.setdefault(payload, []).append(held[w])
                busy_until[w] += rng.uniform(0.1, 3.0)
            else:
                held[w] = payload
                busy_until[w] += 0.01

    def start() -> Started:
        nonlocal counter
        counter += 1
        for w in range(workers):
            busy_until[w] = max(busy_until[w], clock)
            queues[w].append(("gen", counter))
        return Started([], counter, version)

    def wait(batch: Started) -> list[int]:
        for w in range(workers):
            if any(k == "gen" and p == batch.tasks for k, p in queues[w]):
                run_worker(w, math.inf)
        return results[batch.tasks]

    for _ in range(steps):
        buffer.top_up(version, start)
        seen["max_buffered"] = max(seen["max_buffered"], len(buffer))
        kept, dropped = split_fresh(carry, version, n)
        for _round in range(1 + (rng.random() < 0.3)):  # a filter sometimes draws one more batch
            b = buffer.take() or start()
            made_by = wait(b)
            assert made_by == [b.version] * workers, "a batch ran with weights other than its version"
            fresh, d = split_fresh([_Group(v) for v in made_by], version, n)
            kept += fresh
            dropped += d
        trained, carry = kept[:1], kept[1:]
        for g in trained:
            for r in g.rollouts:
                assert staleness_ok(version, r.policy_version, n)
                seen["max_staleness"] = max(seen["max_staleness"], version - r.policy_version)
        seen["dropped"] += dropped
        seen["trained"] += len(trained)
        # Learn: the workers keep generating meanwhile.
        clock += rng.uniform(0.1, 3.0)
        for w in range(workers):
            run_worker(w, clock)
        version += 1
        # Sync: queued behind each worker's pending generations; the driver waits for it.
        for w in range(workers):
            queues[w].append(("sync", version))
            run_worker(w, math.inf)
            clock = max(clock, busy_until[w])
        assert held == [version] * workers
    return seen


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_staleness_bound_holds_under_random_timing(n):
    """Over 50 random schedules per N: no trained sample is older than N versions, the buffer never
    holds more than N + 1 batches, every batch is generated by exactly the version it records, and
    the bound is reached (the loop really runs ahead)."""
    worst = 0
    for seed in range(50):
        seen = _simulate(n, seed)
        assert seen["max_buffered"] <= n + 1
        assert seen["max_staleness"] <= n
        assert seen["trained"] == 40
        worst = max(worst, seen["max_staleness"])
    assert worst == n


# ------------------------------------------------------------------ real runs
ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")


def tiny_config(tmp_path: Path, model_dir: Path, **over):
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}", "data.kind=arithmetic",
        "data.num_train=64", "data.num_eval=8", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]",
        "rollout.max_new_tokens=8", "rollout.threads=1", "learner.threads=1", "learner.num_ranks=1",
        "learner.micro_batch_size=8", "learner.lr=1.0e-3", "train.prompts_per_step=4",
        "train.samples_per_prompt=4", "train.steps=3", "eval.num_problems=0", "progress=false",
        "report_to=[]", "algorithm.name=grpo", "algorithm.args.beta=0.0",
    ]
    return load_config(None, overrides + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlkit.assets import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _run(cfg, steps: int, collector_n=None):
    """``steps`` trainer steps on a fresh actor graph; the learner's final weights and the metrics.
    ``collector_n`` drives the asynchronous collector with that N whatever the config says."""
    from rlkit.async_rl import AsyncCollector
    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        if collector_n is not None:
            trainer._async = AsyncCollector(trainer, collector_n)
        rt.sync()
        timer = StageTimer()
        metrics = []
        for _ in range(steps):
            metrics.append(trainer.step(timer))
            trainer.state.step += 1  # as Trainer._train_step does: the step picks the generation seeds
        return ray.get(rt.learners[0].param_vector.remote()), metrics, trainer
    finally:
        for a in rt.learners + rt.rollout + [rt.reward]:
            ray.kill(a)


def test_n0_collector_equals_the_synchronous_loop_bitwise(ray_session, tmp_path, tiny_model):
    """The asynchronous collector with N = 0 (buffer of one batch) trains exactly the synchronous
    loop's samples: after three steps the learner's weights are bitwise equal."""
    sync_w, sync_m, _ = _run(tiny_config(tmp_path / "a", tiny_model), 3)
    async_w, async_m, _ = _run(tiny_config(tmp_path / "b", tiny_model), 3, collector_n=0)
    assert torch.equal(sync_w, async_w)
    assert [m["reward/mean"] for m in sync_m] == [m["reward/mean"] for m in async_m]
    assert all(m["rollout/staleness_mean"] == 0.0 for m in async_m)


def test_n2_run_respects_the_bound_and_saves_the_sampler_before_the_buffer(ray_session, tmp_path, tiny_model):
    """rollout.max_staleness = 2 with real actors: steps 0, 1 train on version 0's samples
    (staleness 0, 1), from step 2 on every sample is exactly 2 versions old; nothing is dropped;
    the buffer holds N batches between steps, and a checkpoint resumes the sampler from before them."""
    cfg = tiny_config(tmp_path, tiny_model, **{"rollout.max_staleness": 2, "learner.tis_cap": 2.0})
    _, metrics, trainer = _run(cfg, 5)
    assert [m["async/max_staleness"] for m in metrics] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert [m["rollout/staleness_mean"] for m in metrics] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert all(m["async/dropped_stale"] == 0.0 for m in metrics)
    assert [m["async/started"] for m in metrics] == [3.0, 1.0, 1.0, 1.0, 1.0]
    assert all(m["async/buffered"] == 2.0 for m in metrics)
    assert all("is/ratio_mean" in m and m["is/ratio_max"] > 0 for m in metrics)
    assert trainer.runtime.version == 5
    # Five batches trained, two started ahead: a checkpoint's sampler is the one after five draws.
    from rlkit.data import PromptSampler

    s = PromptSampler(trainer.train_rows, cfg.train.prompts_per_step, cfg.train.seed)
    for _ in range(5):
        s.next_batch()
    assert trainer._sampler_before_pending == s.state_dict()


def test_n1_token_mask_drops_stale_tokens_in_the_learner(ray_session, tmp_path, tiny_model):
    """rollout.max_staleness = 1 with token_mask in a narrow band [0.999, 1.001]: at step 0 the
    samples are on-policy (ratio 1 up to float noise), nothing is masked; from step 1 the samples
    are one version old after an lr 1e-2 update, so tokens leave the band and are masked (measured:
    0.0, 1.0, 0.99 of the tokens)."""
    cfg = tiny_config(tmp_path, tiny_model, **{
        "rollout.max_staleness": 1, "learner.is_correction": "token_mask", "learner.is_low": 0.999,
        "learner.is_high": 1.001, "learner.lr": 1.0e-2})
    _, metrics, _ = _run(cfg, 3)
    assert [m["rollout/staleness_mean"] for m in metrics] == [0.0, 1.0, 1.0]
    assert metrics[0]["is/masked_frac"] == 0.0
    assert all(m["is/masked_frac"] > 0.5 for m in metrics[1:]), [m["is/masked_frac"] for m in metrics]


@pytest.mark.slow
def test_n2_learns_the_toy_task(ray_session, tmp_path, tiny_model):
    """GRPO with rollout.max_staleness = 2 (token-level TIS, cap 2) raises the toy reward (fraction
    of 'a' characters) of a random tiny model: the last 3 steps' mean reward beats the first 3
    steps' by ≥ 0.03 and by 40 % (the margins of tests/test_runtime.py's toy-task test).

    Its settings differ from that test's: each step has its own generation seed here (the trainer's
    step counter advances), and with distinct seeds lr 1e-2 barely moves the reward in 16 steps
    even synchronously (measured: 0.067 → 0.073), so the learning rate is 1e-1. With fixed seeds
    the run is deterministic (measured: 0.067, 0.067, 0.062 (version 0's samples), then up to 0.4
    by step 8 and flat after); the first two steps train on version 0's samples, so any learning
    shows from step 3 on.
    """
    cfg = tiny_config(tmp_path, tiny_model, **{
        "rollout.max_staleness": 2, "learner.tis_cap": 2.0, "train.samples_per_prompt": 8,
        "rollout.max_new_tokens": 12, "learner.lr": 1.0e-1, "learner.micro_batch_size": 16,
        "algorithm.args.loss_agg_mode": "token-mean"})
    _, metrics, _ = _run(cfg, 12)
    rewards = [m["reward/mean"] for m in metrics]
    assert [m["async/max_staleness"] for m in metrics][2:] == [2.0] * 10
    assert all(m["async/dropped_stale"] == 0.0 for m in metrics)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.03 and last >= 1.4 * first, rewards
