"""The actor graph of one run: rollout workers, a reward worker and a DeepSpeed learner group.

``Runtime`` starts (or joins) Ray, creates only the actors the algorithm needs, and offers the
driver one method per stage. Nothing here knows how many nodes the cluster has.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from rlkit.cluster import init_ray
from rlkit.config import RunConfig, build_reward_config
from rlkit.groups import generation_seed
from rlkit.recovery import LearnerLost, Supervisor, dead_actor_error
from rlkit.sync import SyncError, WeightSync, on_learners
from rlkit.types import Rollout, TrainBatch
from rlkit.workers.learner import LearnerSpec

__all__ = ["GenerationTask", "Runtime", "SyncError"]


@dataclasses.dataclass
class GenerationTask:
    """One rollout worker's share of a generation batch, kept so it can be redone if the worker dies."""

    worker: int
    prompts: list
    n: int
    sampling: dict
    seed: int
    ref: Any
    version: int = 0
    """The policy version the worker holds when it runs the task (a restarted worker would not)."""


class Runtime:
    """The actors of one run. ``learners=False`` starts only the rollout and reward workers
    (evaluation of a model folder)."""

    def __init__(self, cfg: RunConfig, model_dir: str, *, learners: bool = True):
        import ray

        from rlkit.placement import Placement
        from rlkit.workers.learner import LearnerRank
        from rlkit.workers.reward import make_reward_actor
        from rlkit.workers.rollout import rollout_actor

        self.cfg = cfg
        init_ray(cfg)
        self.placement = Placement.create(cfg)
        r, rc = cfg.rollout, cfg.recovery
        self.supervisor = Supervisor(rc.actor_restarts, rc.min_timeout_s, rc.timeout_factor)
        restarts = {"max_restarts": rc.actor_restarts}  # Ray restarts them; the runtime redoes the call
        if r.partial_rollouts and r.engine != "hf":
            raise ValueError(f"rollout.partial_rollouts swaps weights between the HF engine's decode steps; "
                             f"rollout.engine is {r.engine!r} (set rollout.engine: hf or partial_rollouts: false)")
        self.partial = r.partial_rollouts
        """A sync may land in the middle of a generation (docs/async.md § Partial rollouts)."""
        Rollout_ = rollout_actor(self.partial)
        self.rollout = [
            Rollout_.options(**self.placement.options("rollout", i), **restarts).remote(
                model_dir, engine=r.engine, dtype=cfg.model.dtype, threads=r.threads, seed=cfg.train.seed + i,
                worker_index=i, partial_kv=r.partial_kv, matmul_dtype=r.matmul_dtype,
                hold_freed_memory=r.hold_freed_memory)
            for i in range(r.num_workers)
        ]
        self.reward = make_reward_actor(build_reward_config(cfg), **self.placement.options("reward", 0), **restarts)
        self._learner_args = (ray.remote(LearnerRank), LearnerSpec.from_config(cfg, model_dir)) if learners else None
        self.learners: list = []
        self._start_learners()
        # Start-up loads the engines: bounded like the learners' start, not by the step timeout.
        self.supervisor.get([w.ready.remote() for w in self.rollout], "rollout worker start",
                            timeout_s=max(900.0, self.supervisor.timeout_s()))
        self.version = 0
        self.weight_sync = WeightSync(self.learners, self.rollout, zero_stage=cfg.learner.zero_stage,
                                      lora=cfg.learner.lora.enabled, mode=r.sync_transport, backend=r.sync_backend,
                                      timeout_s=self.supervisor.timeout_s)
        self.unit = 2 if cfg.algorithm_setup.needs.pairs else 1

    def _start_learners(self) -> None:
        """Create the learner group (the list object is kept: the weight sync holds it)."""
        if self._learner_args is None:
            return
        Learner_, spec = self._learner_args
        n = self.cfg.learner.num_ranks
        # Rank 0's node IP and a free port there, found before any rank blocks in the rendezvous.
        addr, port = self.placement.master_endpoint(timeout_s=min(300.0, self.supervisor.timeout_s()))
        self.learners[:] = [Learner_.options(**self.placement.options("learner", rank)).remote(
            rank, n, addr, port, spec) for rank in range(n)]
        # Start-up loads models and joins the process group: not bounded by the step timeout.
        self.supervisor.get_learners([a.ready.remote() for a in self.learners], "learner start",
                                     timeout_s=max(900.0, self.supervisor.timeout_s()))

    def restart_learners(self) -> None:
        """A fresh learner group (after a rank died): the old ranks are killed, new ones load the
        initial weights; the caller restores a checkpoint and syncs."""
        import ray

        for a in self.learners:
            ray.kill(a, no_restart=True)
        self._start_learners()
        self.weight_sync.transport = None  # the shared-memory writer lived in the old rank 0

    # ------------------------------------------------------------------ stages
    def generate_async(self, prompts: list[tuple[int, int, list[int]]], step: int,
                       round_: int = 0) -> list[GenerationTask]:
        """Split a generation batch's prompts (group id, row index, token ids) over the rollout
        workers and start them. Each worker's share of each (step, round) has its own seed."""
        sampling = dataclasses.asdict(self.cfg.rollout.sampling)
        n = len(self.rollout)
        tasks = [GenerationTask(i, prompts[i::n], self.cfg.train.samples_per_prompt, sampling,
                                generation_seed(self.cfg.train.seed, step, round_, i), None)
                 for i in range(n) if prompts[i::n]]
        for t in tasks:
            t.ref, t.version = self._submit(t), self.version
        return tasks

    def _submit(self, t: GenerationTask) -> Any:
        return self.rollout[t.worker].generate.remote(t.prompts, t.n, t.sampling, seed=t.seed)

    def _generated(self, t: GenerationTask, ref: Any) -> list[Rollout]:
        """A task's rollouts; a worker that restarted before running it (its engine back at the
        initial weights) counts as dead. With partial rollouts a sync may land before or during the
        task, so its samples may be newer than the version it was started at, never older."""
        from rlkit.recovery import StaleWorker

        part = self.supervisor.get(ref, "generate")
        if any(r.policy_version < t.version if self.partial else r.policy_version != t.version for r in part):
            raise StaleWorker(f"rollout worker {t.worker} answered with policy version "
                              f"{part[0].policy_version}, expected {t.version}: it restarted")
        return part

    def sample(self, prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
               seed: int) -> list[list[dict]]:
        """``n`` samples per prompt at ``temperature`` (no top-k/top-p), as dicts with
        ``completion_ids`` and ``finish_reason``, in prompt order (evaluation)."""
        sampling = {"temperature": temperature, "max_new_tokens": max_new_tokens}
        k = len(self.rollout)
        shards = [[(j, j, p) for j, p in enumerate(prompt_ids) if j % k == i] for i in range(k)]
        refs = [w.generate.remote(shard, n, sampling, seed=generation_seed(seed, 0, 0, i))
                for i, (w, shard) in enumerate(zip(self.rollout, shards)) if shard]
        out: list[list[dict]] = [[] for _ in prompt_ids]
        for r in (r for part in self.supervisor.get(refs, "evaluation (samples)") for r in part):
            out[r.group_id].append({"completion_ids": r.completion_ids, "finish_reason": r.finish_reason})
        return out

    def collect(self, tasks: list[GenerationTask]) -> list[Rollout]:
        """The rollouts of started tasks, by group. A worker that died is restarted, given the
        current weights and asked again for its share (same prompts, same seed)."""
        out = []
        for t in tasks:
            started = [t.ref]  # the first attempt is the call already in flight

            def run(t: GenerationTask = t, started: list = started) -> list[Rollout]:
                if not started:
                    t.version = self.version
                return self._generated(t, started.pop() if started else self._submit(t))

            part = self.supervisor.call_with_restarts(f"rollout worker {t.worker}", "generate", run,
                                                      lambda t=t: self._revive_rollout(t.worker))
            out.extend(part)
        return sorted(out, key=lambda r: r.group_id)

    def _revive_rollout(self, i: int) -> None:
        """Wait for Ray's restart of rollout worker ``i`` and bring its engine to the current
        version (a sync to it alone, verified on every worker)."""
        self.supervisor.wait_restarted(self.rollout[i].ready.remote, f"rollout worker {i}")
        self.weight_sync.transport = None  # a collective group or mapped segment died with the worker
        if self.learners:
            self.weight_sync.sync(self.version, skip=tuple(j for j in range(len(self.rollout)) if j != i))

    def score(self, completions: list[str], prompts: list[str], fields: list[dict], sources: list[str]):
        """Scores from the reward worker; if it died, it is restarted and the batch re-scored."""
        sup = self.supervisor
        return sup.call_with_restarts(
            "reward worker", "score",
            lambda: sup.get(self.reward.score.remote(completions, prompts, fields, sources), "score"),
            lambda: sup.wait_restarted(self.reward.ready.remote, "the reward worker"))

    def shard_rows(self, size: int) -> list[list[int]]:
        """Row indices per learner rank: round-robin over units (a unit is one row, or one
        chosen/rejected pair of adjacent rows for preference algorithms)."""
        n, u = len(self.learners), self.unit
        return [[j * u + k for j in range(i, size // u, n) for k in range(u)] for i in range(n)]

    def shard(self, batch: TrainBatch) -> list[TrainBatch]:
        return [batch.select(rows) for rows in self.shard_rows(batch.size)]

    def side_passes(self, batch: TrainBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Store each rank's shard on it and run the detached passes (π_old, π_ref, teacher,
        critic). Returns the full-batch tensors the algorithm's advantage reads, and ``kl/mean``
        (k1 of the sampler against π_ref per token) when the reference was scored."""

        shards = self.shard(batch)
        sup = self.supervisor
        sup.get_learners([a.set_batch.remote(s) for a, s in zip(self.learners, shards)], "side passes")
        parts = sup.get_learners([a.side_passes.remote() for a in self.learners], "side passes")
        rows = self.shard_rows(batch.size)
        out = {}
        for key in parts[0]["tensors"]:
            first = parts[0]["tensors"][key]
            full = torch.zeros(batch.size, *first.shape[1:])
            for idx, p in zip(rows, parts):
                full[idx] = p["tensors"][key]
            out[key] = full
        metrics = {}
        if parts[0]["kl"]:
            tokens = sum(p["kl"]["tokens"] for p in parts)
            metrics["kl/mean"] = sum(p["kl"]["sum"] for p in parts) / max(tokens, 1.0)
        return out, metrics

    def learn(self, advantages_B_T: Optional[torch.Tensor], controller: dict[str, float],
              returns_B_T: Optional[torch.Tensor] = None) -> dict[str, float]:
        """One update on the stored shards; each rank receives its own rows of the advantages."""

        n = len(self.learners)
        split = lambda t: [None] * n if t is None else [t[r] for r in self.shard_rows(len(t))]  # noqa: E731
        results = self.supervisor.get_learners([a.train.remote(adv, controller, ret) for a, adv, ret
                           in zip(self.learners, split(advantages_B_T), split(returns_B_T))], "learn")
        self.version += 1
        return {k: sum(r[k] for r in results) / n for k in results[0]}

    def sync(self, bucket_bytes: int = 64 * 2**20, skip: tuple[int, ...] = (),
             transport: Optional[str] = None) -> dict[str, float]:
        """Send the learner's weights to every rollout worker and verify every tensor
        (:class:`rlkit.sync.WeightSync`); ``skip`` leaves workers out (tests), ``transport`` forces
        one of :data:`rlkit.sync.TRANSPORTS`."""
        while True:
            try:
                return self.weight_sync.sync(self.version, bucket_bytes=bucket_bytes, skip=skip, transport=transport)
            except dead_actor_error() as e:
                dead = getattr(e, "actor_id", None)
                ranks = [r for r, a in enumerate(self.learners) if a._actor_id.hex() == dead]
                workers = [i for i, w in enumerate(self.rollout) if w._actor_id.hex() == dead]
                if ranks or not workers:
                    raise LearnerLost(ranks[0] if ranks else -1, "weight sync") from None
                self.supervisor.died(f"rollout worker {workers[0]}", "weight sync")
                self.supervisor.wait_restarted(self.rollout[workers[0]].ready.remote, f"rollout worker {workers[0]}")
                self.weight_sync.transport = None

    def on_learners(self, method: str, *args) -> Any:
        return on_learners(self.learners, self.cfg.learner.zero_stage, method, *args)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        """One greedy completion per prompt, in prompt order; a worker that does not answer within
        the step timeout is :class:`rlkit.recovery.StageTimeout` naming the evaluation."""
        n = len(self.rollout)
        parts = self.supervisor.get([w.greedy.remote(prompt_ids[i::n], max_new_tokens)
                                     for i, w in enumerate(self.rollout)], "evaluation (greedy)")
        out: list[Any] = [None] * len(prompt_ids)
        for i, part in enumerate(parts):
            for j, g in enumerate(part):
                out[i + j * n] = g
        return out

    def save(self, directory: str, client_state: dict) -> None:

        self.supervisor.get_learners([a.save.remote(directory, client_state) for a in self.learners], "checkpoint")

    def load(self, directory: str) -> dict:

        states = self.supervisor.get_learners([a.load.remote(directory) for a in self.learners], "resume")
        return states[0]

    def drain_spans(self) -> list[dict]:
        """Every rollout worker's and learner rank's spans since the last call (:mod:`rlkit.timeline`);
        an actor that does not answer within the step timeout is left out."""
        import ray

        out = []
        for a in self.rollout + self.learners:
            try:
                out.extend(ray.get(a.drain_spans.remote(), timeout=self.supervisor.timeout_s()))
            except Exception:  # a dead or stuck actor's spans are lost; the run's results are not
                pass
        return out

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([a.close_shm.remote() for a in self.learners[:1]], timeout=30)
        except Exception:  # a dead learner: its segments are unlinked below
            pass
        from rlkit.sync import release_shm_segments

        release_shm_segments()  # what a killed learner left in this node's shared memory

        for w in self.rollout:
            try:
                ray.get(w.close.remote(), timeout=30)
            except Exception:  # the process is going away anyway; nothing to save here
                pass
        try:
            ray.get(self.reward.close.remote(), timeout=30)
        except Exception:
            pass
        self.placement.remove()
        ray.shutdown()
