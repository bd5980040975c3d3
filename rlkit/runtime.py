"""The actor graph of one run: rollout workers, a reward worker and a DeepSpeed learner group.

``Runtime`` starts (or joins) Ray, creates only the actors the algorithm needs, and offers the
driver one method per stage. Nothing here knows how many nodes the cluster has.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch

from rlkit.cluster import init_ray
from rlkit.config import RunConfig, build_reward_config
from rlkit.types import Rollout, TrainBatch
from rlkit.workers.learner import LearnerSpec


class SyncError(RuntimeError):
    """A rollout engine does not hold the weights the learner just sent."""


class Runtime:
    def __init__(self, cfg: RunConfig, model_dir: str, ref_dir: Optional[str] = None,
                 teacher_dir: Optional[str] = None):
        import ray

        from rlkit.placement import Placement
        from rlkit.workers.learner import LearnerRank
        from rlkit.workers.reward import make_reward_actor
        from rlkit.workers.rollout import RolloutWorker

        self.cfg = cfg
        init_ray(cfg)
        self.placement = Placement.create(cfg)
        r, l = cfg.rollout, cfg.learner
        Rollout_ = ray.remote(RolloutWorker)
        self.rollout = [
            Rollout_.options(**self.placement.options("rollout", i)).remote(model_dir, engine=r.engine, dtype=cfg.model.dtype, threads=r.threads,
                            seed=cfg.train.seed + i, worker_index=i)
            for i in range(r.num_workers)
        ]
        self.reward = make_reward_actor(build_reward_config(cfg), **self.placement.options("reward", 0))
        spec = LearnerSpec(
            model_dir=model_dir, algorithm=cfg.algorithm.name, algorithm_args=cfg.algorithm.args,
            dtype=cfg.model.dtype, zero_stage=l.zero_stage, threads=l.threads,
            micro_batch_size=l.micro_batch_size, chunk_size=l.chunk_size, lr=l.lr,
            weight_decay=l.weight_decay, betas=tuple(l.betas), max_grad_norm=l.max_grad_norm,
            lr_schedule=l.lr_schedule, warmup_steps=l.warmup_steps, total_steps=max(1, cfg.train.steps),
            updates_per_step=l.updates_per_step, critic_lr=l.critic_lr, max_response_len=r.max_new_tokens,
            top_p=r.top_p, top_k=r.top_k, temperature=r.temperature, tis_cap=l.tis_cap,
            freeze_embeddings=cfg.model.freeze_embeddings, gradient_checkpointing=cfg.model.gradient_checkpointing, lora=l.lora.model_dump(),
            ref_dir=ref_dir, teacher_dir=teacher_dir, seed=cfg.train.seed,
        )
        # Rank 0's node IP and a free port there, found before any rank blocks in the rendezvous.
        addr, port = self.placement.master_endpoint()
        Learner_ = ray.remote(LearnerRank)
        self.learners = [Learner_.options(**self.placement.options("learner", rank)).remote(
            rank, l.num_ranks, addr, port, spec) for rank in range(l.num_ranks)]
        ray.get([w.ready.remote() for w in self.rollout] + [a.ready.remote() for a in self.learners])
        self.version = 0
        self._probe_names: list[str] = []
        self._transport: Optional[str] = None
        import uuid

        self._shm_tag = uuid.uuid4().hex[:12]
        from rlkit import algorithms

        algo = algorithms.get(cfg.algorithm.name)
        self.unit = 2 if algo.needs(algo.make_config(cfg.algorithm.args)).pairs else 1

    # ------------------------------------------------------------------ stages
    def generate_async(self, prompts: list[tuple[int, int, list[int]]], step: int) -> list:
        """Split a step's prompts over the rollout workers; returns Ray refs."""
        r = self.cfg.rollout
        sampling = dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens)
        n = len(self.rollout)
        shards = [prompts[i::n] for i in range(n)]
        return [w.generate.remote(shard, self.cfg.train.samples_per_prompt, sampling,
                                  seed=self.cfg.train.seed * 1_000_003 + step * 101 + i)
                for i, (w, shard) in enumerate(zip(self.rollout, shards)) if shard]

    def collect(self, refs: list) -> list[Rollout]:
        import ray

        out = [r for part in ray.get(refs) for r in part]
        return sorted(out, key=lambda r: r.group_id)

    def score(self, completions: list[str], prompts: list[str], fields: list[dict], sources: list[str]):
        import ray

        return ray.get(self.reward.score.remote(completions, prompts, fields, sources))

    def shard_rows(self, size: int) -> list[list[int]]:
        """Row indices per learner rank: round-robin over units (a unit is one row, or one
        chosen/rejected pair of adjacent rows for preference algorithms)."""
        n, u = len(self.learners), self.unit
        return [[j * u + k for j in range(i, size // u, n) for k in range(u)] for i in range(n)]

    def shard(self, batch: TrainBatch) -> list[TrainBatch]:
        return [batch.select(rows) for rows in self.shard_rows(batch.size)]

    def side_passes(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Store each rank's shard on it and run the detached passes (π_old, π_ref, teacher)."""
        import ray

        shards = self.shard(batch)
        ray.get([a.set_batch.remote(s) for a, s in zip(self.learners, shards)])
        parts = ray.get([a.side_passes.remote() for a in self.learners])
        rows = self.shard_rows(batch.size)
        out = {}
        for key in parts[0]:
            full = torch.zeros(batch.size, *parts[0][key].shape[1:])
            for idx, p in zip(rows, parts):
                full[idx] = p[key]
            out[key] = full
        return out

    def learn(self, advantages_B_T: Optional[torch.Tensor], controller: dict[str, float],
              returns_B_T: Optional[torch.Tensor] = None) -> dict[str, float]:
        import ray

        n = len(self.learners)
        split = lambda t: [None] * n if t is None else [t[r] for r in self.shard_rows(len(t))]  # noqa: E731
        results = ray.get([a.train.remote(adv, controller, ret) for a, adv, ret
                           in zip(self.learners, split(advantages_B_T), split(returns_B_T))])
        self.version += 1
        return {k: sum(r[k] for r in results) / n for k in results[0]}

    def sync(self, bucket_bytes: int = 64 * 2**20, skip: tuple[int, ...] = (),
             transport: Optional[str] = None) -> dict[str, float]:
        """Send rank 0's full weights to every rollout worker, then prove they arrived.

        Transport: shared memory when every rollout worker shares learner rank 0's node (one copy,
        :mod:`rlkit.workers.shm_sync`), else the Ray object store in buckets of ``bucket_bytes``.
        ``transport`` forces one ("shm" or "object"); LoRA policies always use the object store
        (only their adapters travel)."""
        import ray

        t0 = time.perf_counter()
        if (transport or self._sync_transport()) == "shm":
            state = self.on_learners("shm_state", self._shm_tag)
            ray.get([w.load_shm.remote(self.version, state["segment"], state["entries"])
                     for i, w in enumerate(self.rollout) if i not in skip])
        else:
            state = self.on_learners("full_state", bucket_bytes)
            ray.get([w.load_buckets.remote(self.version, state["refs"])
                     for i, w in enumerate(self.rollout) if i not in skip])
            del state["refs"]  # release the buckets from the object store
        seconds = time.perf_counter() - t0
        nbytes = state["bytes"]
        if not self._probe_names:
            self._probe_names = _probe_names(state["names"])
        self.verify_sync()
        return {"sync/seconds": seconds, "sync/bytes": nbytes, "sync/bytes_per_s": nbytes / max(seconds, 1e-9)}

    def on_learners(self, method: str, *args) -> Any:
        """Learner rank 0's answer to ``method``. Under ZeRO-3 every rank holds a shard of each
        weight, so methods that read full weights run on all ranks together (they gather)."""
        import ray

        ranks = self.learners if self.cfg.learner.zero_stage == 3 else self.learners[:1]
        return ray.get([getattr(a, method).remote(*args) for a in ranks])[0]

    def _sync_transport(self) -> str:
        """"shm" when it can work here (decided once, at the first sync), else "object"."""
        import ray

        if self._transport is None:
            self._transport = "object"
            if self.cfg.rollout.sync_transport == "auto" and not self.cfg.learner.lora.enabled:
                nodes = ray.get([a.node_id.remote() for a in [self.learners[0], *self.rollout]])
                if len(set(nodes)) == 1 and _shm_free_bytes() > 2.2 * self._weight_bytes():
                    self._transport = "shm"
        return self._transport

    def _weight_bytes(self) -> float:
        import ray

        return float(ray.get(self.learners[0].weight_bytes.remote()))

    def verify_sync(self) -> None:
        import ray

        want = self.on_learners("checksum", self._probe_names)
        for i, got in enumerate(ray.get([w.checksum.remote(self._probe_names) for w in self.rollout])):
            if got["version"] != self.version:
                raise SyncError(f"rollout worker {i} holds policy version {got['version']}, learner is at {self.version}")
            for name, value in want.items():
                if not torch.isclose(torch.tensor(got["sums"][name]), torch.tensor(value), rtol=1e-5, atol=1e-6):
                    raise SyncError(f"rollout worker {i}: tensor '{name}' checksum {got['sums'][name]} != learner {value}")

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        import ray

        n = len(self.rollout)
        parts = ray.get([w.greedy.remote(prompt_ids[i::n], max_new_tokens) for i, w in enumerate(self.rollout)])
        out: list[Any] = [None] * len(prompt_ids)
        for i, part in enumerate(parts):
            for j, g in enumerate(part):
                out[i + j * n] = g
        return out

    def save(self, directory: str, client_state: dict) -> None:
        import ray

        ray.get([a.save.remote(directory, client_state) for a in self.learners])

    def load(self, directory: str) -> dict:
        import ray

        states = ray.get([a.load.remote(directory) for a in self.learners])
        return states[0]

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self.learners[0].close_shm.remote(), timeout=30)
        except Exception:  # the learner's own exit releases the segments too
            pass

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


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _probe_names(names: list[str]) -> list[str]:
    """A fixed sample of tensors to checksum after each sync: first, middle and last."""
    if len(names) <= 3:
        return list(names)
    return [names[0], names[len(names) // 2], names[-1]]


