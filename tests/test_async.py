"""Bounded asynchronous RL (docs/async.md): the off-policy corrections by hand, the staleness bound
under randomized timing (with and without partial rollouts), N = 0 against the synchronous loop
bitwise, real runs with N = 1 and 2, a sync landing mid-generation, and resume with a buffer."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from rlkit.async_rl import (GenerationBuffer, Started, off_policy_weights, oldest_version, split_fresh, staleness_ok,
                             token_version_metrics)
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
    def __init__(self, version: int, token_versions=None):
        self.policy_version = version
        self.token_versions = token_versions


class _Group:
    def __init__(self, version: int, size: int = 2):
        self.rollouts = [_Sample(version) for _ in range(size)]


def test_staleness_is_the_oldest_tokens_and_token_metrics_count_older_tokens():
    """A partial rollout is as stale as its oldest token: at version 5 with N = 2 a sample whose
    tokens came from versions 2, 3, 3 is dropped (with its group) although most tokens are fresh
    enough; one from 3, 4, 5 is kept. The token metrics by hand on a 2 × 4 batch."""
    fresh = _Sample(3, [3, 4, 5])
    old = _Sample(2, [2, 3, 3])
    assert oldest_version(fresh) == 3 and oldest_version(old) == 2 and oldest_version(_Sample(4)) == 4
    g_fresh, g_old = _Group(0), _Group(0)
    g_fresh.rollouts, g_old.rollouts = [fresh, _Sample(4, [4, 4])], [_Sample(5, [5]), old]
    keep, dropped = split_fresh([g_fresh, g_old], 5, 2)
    assert keep == [g_fresh] and dropped == 2
    # Learner at 5: row 0 has tokens from 5, 4, 4 (one pad); row 1 from 5, 5, 5, 5.
    stale = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    m = token_version_metrics(stale, mask)
    assert m == pytest.approx({"rollout/token_staleness_mean": 2 / 7, "rollout/old_token_frac": 2 / 7,
                               "rollout/partial_frac": 0.5})


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


def _simulate_partial(n: int, seed: int, steps: int = 40) -> dict:
    """The loop with partial rollouts, token by token: each worker decodes its FIFO of generations
    one token at a time (random durations) and a sync does not queue behind them: it lands at the
    end of the decode step in flight when it arrives, and every later token records the new
    version. The driver waits for the batch it takes (its clock moves to that batch's end), learns
    for a random time, syncs (waiting for every worker to apply it), as the real collector does."""
    rng = random.Random(seed)
    workers = 2
    queues: list[list[int]] = [[] for _ in range(workers)]  # generation ids, FIFO
    current: list = [None] * workers  # [id, tokens left, versions so far]
    held = [0] * workers
    free_at = [0.0] * workers  # when the worker's decode step in flight ends
    clock, version, counter = 0.0, 0, 0
    buffer = GenerationBuffer(n)
    results: dict[int, list[list[int]]] = {}
    carry: list = []
    seen = {"max_staleness": 0, "max_buffered": 0, "dropped": 0, "trained": 0, "partial": 0}

    def decode_one(w: int) -> bool:
        """Start the worker's next decode step (at ``free_at``); False when it has nothing to do."""
        if current[w] is None:
            if not queues[w]:
                return False
            current[w] = [queues[w].pop(0), rng.randint(1, 8), []]
        current[w][2].append(held[w])  # the token is computed by the weights held when it starts
        current[w][1] -= 1
        free_at[w] += rng.uniform(0.02, 0.4)
        if current[w][1] == 0:
            results.setdefault(current[w][0], []).append(current[w][2])
            current[w] = None
        return True

    def run_until(w: int, t: float) -> None:
        """Every decode step that starts before ``t``."""
        while free_at[w] < t and decode_one(w):
            pass
        free_at[w] = max(free_at[w], t) if current[w] is None and not queues[w] else free_at[w]

    def start() -> Started:
        nonlocal counter
        counter += 1
        for w in range(workers):
            run_until(w, clock)
            queues[w].append(counter)
        return Started([], counter, version)

    def wait(batch: Started) -> list[list[int]]:
        nonlocal clock
        for w in range(workers):
            while len([1 for k in queues[w] if k == batch.tasks]) or (current[w] and current[w][0] == batch.tasks):
                decode_one(w)
            clock = max(clock, free_at[w])
        return results[batch.tasks]

    for _ in range(steps):
        buffer.top_up(version, start)
        seen["max_buffered"] = max(seen["max_buffered"], len(buffer))
        kept, dropped = split_fresh(carry, version, n)
        for _round in range(1 + (rng.random() < 0.3)):
            b = buffer.take() or start()
            made = wait(b)
            for vs in made:
                assert vs == sorted(vs) and b.version <= vs[0] and vs[-1] <= version
                seen["partial"] += len(set(vs)) > 1
            group = _Group(0)
            group.rollouts = [_Sample(min(vs), vs) for vs in made]
            fresh, d = split_fresh([group], version, n)
            kept += fresh
            dropped += d
        trained, carry = kept[:1], kept[1:]
        for g in trained:
            for r in g.rollouts:
                assert staleness_ok(version, min(r.token_versions), n)
                seen["max_staleness"] = max(seen["max_staleness"], version - min(r.token_versions))
        seen["dropped"] += dropped
        seen["trained"] += len(trained)
        clock += rng.uniform(0.1, 3.0)  # learn: the workers keep decoding meanwhile
        version += 1
        for w in range(workers):  # the sync lands after the decode step in flight on each worker
            run_until(w, clock)
            free_at[w] = max(free_at[w], clock) + 0.01
            held[w] = version
        clock = max(free_at)
    return seen


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_partial_rollouts_staleness_bound_holds_under_random_timing(n):
    """Partial rollouts over 50 random schedules per N: every sample's token versions never
    decrease, start no earlier than its batch's version and end no later than the learner's; no
    trained sample's oldest token is older than N versions; the bound is reached. Syncs do land
    mid-generation for N ≥ 1 (samples with several versions) and never for N = 0, where each
    batch is finished before the learner steps (the synchronous loop)."""
    worst, partial = 0, 0
    for seed in range(50):
        seen = _simulate_partial(n, seed)
        assert seen["max_buffered"] <= n + 1
        assert seen["max_staleness"] <= n
        assert seen["trained"] == 40
        worst = max(worst, seen["max_staleness"])
        partial += seen["partial"]
    assert worst == n
    assert (partial > 0) == (n > 0)


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


def _steps(trainer, steps: int) -> list[dict]:
    """``steps`` trainer steps and their metrics."""
    from rlkit.metrics import StageTimer

    timer = StageTimer()
    metrics = []
    for _ in range(steps):
        metrics.append(trainer.step(timer))
        trainer.state.step += 1  # as Trainer._train_step does: the step picks the generation seeds
    return metrics


def _kill(rt) -> None:
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a)


def _run(cfg, steps: int, collector_n=None):
    """``steps`` trainer steps on a fresh actor graph; the learner's final weights and the metrics.
    ``collector_n`` drives the asynchronous collector with that N whatever the config says."""
    from rlkit.async_rl import AsyncCollector
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        if collector_n is not None:
            trainer._async = AsyncCollector(trainer, collector_n)
        rt.sync()
        metrics = _steps(trainer, steps)
        return ray.get(rt.learners[0].param_vector.remote()), metrics, trainer
    finally:
        _kill(rt)


def test_n0_collector_equals_the_synchronous_loop_bitwise(ray_session, tmp_path, tiny_model):
    """The asynchronous collector with N = 0 (buffer of one batch) trains exactly the synchronous
    loop's samples: after three steps the learner's weights are bitwise equal, also with partial
    rollouts on (threaded rollout actors; with N = 0 no sync ever meets a generation in flight)."""
    sync_w, sync_m, _ = _run(tiny_config(tmp_path / "a", tiny_model), 3)
    async_w, async_m, _ = _run(tiny_config(tmp_path / "b", tiny_model), 3, collector_n=0)
    partial_w, partial_m, _ = _run(tiny_config(tmp_path / "c", tiny_model, **{"rollout.partial_rollouts": True}), 3,
                                   collector_n=0)
    assert torch.equal(sync_w, async_w) and torch.equal(sync_w, partial_w)
    assert [m["reward/mean"] for m in sync_m] == [m["reward/mean"] for m in async_m] == [
        m["reward/mean"] for m in partial_m]
    assert all(m["rollout/staleness_mean"] == 0.0 for m in async_m + partial_m)
    assert all(m["rollout/old_token_frac"] == 0.0 and m["rollout/partial_frac"] == 0.0 for m in partial_m)


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


def test_partial_rollout_sync_mid_generation_versions_and_is_weights(ray_session, tmp_path, tiny_model):
    """rollout.max_staleness = 1 with partial rollouts (KV recomputed after a swap). Step 0 trains
    batch 0 while batch 1 generates; the step's sync (to version 1) is made to land exactly before
    batch 1's decode step 4 (the engine's test rendezvous). Batch 1's tokens 0-3 then record version
    0, the rest version 1, and the behaviour log-probs of the latter are version 1's teacher-forced
    log-probs. Step 1 trains batch 1 at version 1 with token_mask in the band [0.9999, 1.0001]: the
    learner masks the version-0 tokens (ratio π_1/π_0) and none of the version-1 ones (ratio 1 up
    to float noise), so its masked fraction is the fraction of old tokens (measured: the old tokens'
    |log ratio| ≥ 5e-3, the new ones' engine-vs-engine gap ≤ 1e-6: both far from the band's 1e-4)."""
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    cfg = tiny_config(tmp_path, tiny_model, **{
        "rollout.max_staleness": 1, "rollout.partial_rollouts": True, "rollout.partial_kv": "recompute",
        "rollout.max_new_tokens": 10, "learner.is_correction": "token_mask", "learner.is_low": 0.9999,
        "learner.is_high": 1.0001, "learner.lr": 1.0e-2, "learner.micro_batch_size": 16})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        taken, scored_v1 = [], []
        collect, side_passes = rt.collect, rt.side_passes

        def spy_collect(tasks):
            taken.append(collect(tasks))
            return taken[-1]

        def spy_side_passes(batch):
            if len(taken) == 2:  # step 1, before its learn and sync: the engine holds version 1
                rs = taken[1]
                scored_v1.extend(ray.get(rt.rollout[0].score.remote(
                    [r.prompt_ids for r in rs], [r.completion_ids for r in rs], dataclasses.asdict(cfg.rollout.sampling))))
            return side_passes(batch)

        rt.collect, rt.side_passes = spy_collect, spy_side_passes
        rt.sync()
        ray.get(rt.rollout[0].hold_generation.remote(4, 1))  # the second generation: batch 1
        metrics = _steps(trainer, 2)
        batch1 = taken[1]
        assert any(len(r.completion_ids) > 4 for r in batch1)
        for r in batch1:
            k = len(r.completion_ids)
            assert r.token_versions == [0] * min(k, 4) + [1] * max(k - 4, 0) and r.policy_version == 0
        for r in taken[0]:
            assert r.token_versions == [0] * len(r.completion_ids)
        # Behaviour log-probs per token: version 1's from token 4 on, not version 1's before it.
        gap = [abs(a - b) for r, s in zip(batch1, scored_v1) for a, b in zip(r.sampler_logp[:4], s[:4])]
        assert max(gap) > 1e-3
        for r, s in zip(batch1, scored_v1):
            torch.testing.assert_close(torch.tensor(r.sampler_logp[4:]), torch.tensor(s[4:]), atol=1e-4, rtol=0)
        tokens = sum(len(r.completion_ids) for r in batch1)
        old = sum(min(len(r.completion_ids), 4) for r in batch1)
        m0, m1 = metrics
        assert m0["rollout/old_token_frac"] == 0.0 and m0["is/masked_frac"] == 0.0
        assert m1["async/max_staleness"] == 1.0 and m1["rollout/staleness_mean"] == 1.0
        assert m1["rollout/old_token_frac"] == pytest.approx(old / tokens)
        assert m1["rollout/partial_frac"] == pytest.approx(sum(len(r.completion_ids) > 4 for r in batch1) / len(batch1))
        assert m1["async/dropped_stale"] == 0.0
        assert m1["is/masked_frac"] == pytest.approx(old / tokens)
    finally:
        _kill(rt)


def test_partial_rollouts_n2_bound_and_resume_regenerates_the_buffer(ray_session, tmp_path, tiny_model):
    """rollout.max_staleness = 2 with partial rollouts and real actors, whatever the timing: every
    trained token is at most 2 versions old, every sample's versions never decrease and start no
    earlier than its batch, nothing is dropped. A checkpoint taken with two batches in the buffer
    (in flight or done) records the sampler from before them; a trainer resumed from it on the same
    actors redraws exactly those prompts, regenerates them with the same seeds at the checkpoint's
    version (staleness 0 at its first step) and trains on."""
    from rlkit import checkpoint
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    cfg = tiny_config(tmp_path, tiny_model, **{"rollout.max_staleness": 2, "rollout.partial_rollouts": True,
                                               "learner.tis_cap": 2.0, "rollout.max_new_tokens": 12})
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    rt = trainer.runtime
    try:
        taken, collect = [], rt.collect

        def spy_collect(tasks):
            taken.append((rt.version, tasks[0].version, collect(tasks)))
            return taken[-1][2]

        rt.collect = spy_collect
        rt.sync()
        metrics = _steps(trainer, 4)
        for now, started, rollouts in taken:
            for r in rollouts:
                vs = r.token_versions
                assert vs == sorted(vs) and started <= vs[0] == r.policy_version and vs[-1] <= now
                assert now - vs[0] <= 2
        assert all(m["async/max_staleness"] <= 2.0 and m["async/dropped_stale"] == 0.0 for m in metrics)
        assert [m["async/max_staleness"] for m in metrics][:3] == [0.0, 1.0, 2.0]
        assert all(0.0 <= m["rollout/old_token_frac"] <= 1.0 for m in metrics)

        buffered = [b.rows for b in trainer._async.buffer._q]
        assert len(buffered) == 2
        ckpt = trainer.save()
        resumed = Trainer(cfg, runtime=rt)
        resumed._restore(ckpt)
        assert resumed.state.step == 4 and rt.version == 4
        assert checkpoint.load_trainer_state(ckpt)["sampler"] == trainer._sampler_before_pending
        taken.clear()
        after = _steps(resumed, 1)
        # The first batch after resume is the oldest buffered batch's prompts, regenerated at version 4.
        assert [r.index for r in resumed._async.buffer._q[0].rows] == [r.index for r in buffered[1]]
        now, started, rollouts = taken[-1]
        assert sorted({r.prompt_index for r in rollouts}) == sorted(r.index for r in buffered[0])
        assert started == 4 and after[0]["async/max_staleness"] == 0.0 and rt.version == 5
    finally:
        _kill(rt)
