"""Rollout worker: a Ray actor that owns one generation engine (vLLM, or the HF engine on transformers' forward).

Several rollout workers share the prompts of a step. Each sample records the policy version of the
weights that produced it. Weight sync arrives as buckets of named tensors (or, for a LoRA policy, of adapters merged here onto
the frozen base weights); after loading them the
worker reports checksums of a fixed set of tensors so the driver can prove the engine has the new
weights (a skipped or partial sync is detected, not silently trained on).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from rlkit.types import Rollout
from rlkit.workers.engine import SamplingConfig


def make_engine(engine: str, model_dir: str, *, dtype: str, threads: int, seed: int, max_model_len: int):
    if engine == "hf":
        from rlkit.workers.hf_engine import HFEngine

        return HFEngine(model_dir, dtype=dtype, threads=threads)
    if engine == "vllm":
        from rlkit.workers.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, dtype=dtype, threads=threads, seed=seed, max_model_len=max_model_len)
    raise ValueError(f"rollout.engine: unknown engine '{engine}'; valid: ['hf', 'vllm']")


class RolloutWorker:
    def __init__(self, model_dir: str, *, engine: str = "hf", dtype: str = "float32", threads: int = 1,
                 seed: int = 0, worker_index: int = 0, max_model_len: int = 1024):
        from rlkit.workers import claim_cpu

        claim_cpu(threads)
        self.engine = make_engine(engine, model_dir, dtype=dtype, threads=threads, seed=seed,
                                  max_model_len=max_model_len)
        self.worker_index = worker_index
        self.model_dir = model_dir
        self._base = None  # frozen base weights, read on the first LoRA sync
        self._shm = None  # shared-memory segments mapped for same-node syncs
        self.version = 0

    def ready(self) -> dict[str, Any]:
        return {"worker": self.worker_index, "pid": os.getpid(), "version": self.version}

    def generate(self, prompts: list[tuple[int, int, list[int]]], n: int, sampling: dict, seed: int) -> list[Rollout]:
        """``prompts``: (group_id, dataset row index, prompt token ids). Returns n rollouts each."""
        cfg = SamplingConfig(**sampling)
        gens = self.engine.generate([p for _, _, p in prompts], n, cfg, seed)
        out = []
        for i, g in enumerate(gens):
            group_id, row, _ = prompts[i // n]
            out.append(Rollout(
                prompt_ids=g.prompt_ids, completion_ids=g.completion_ids, sampler_logp=g.logprobs,
                finish_reason=g.finish_reason, policy_version=self.version, group_id=group_id,
                prompt_index=row,
            ))
        return out

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        return [asdict(g) for g in self.engine.greedy(prompt_ids, max_new_tokens)]

    def load_buckets(self, version: int, buckets: list) -> dict[str, float]:
        """Load weight buckets (each a list of (name, tensor), or an ObjectRef to one)."""
        import ray

        from rlkit.workers.lora_sync import BaseWeights, LoraDelta

        t0 = time.perf_counter()
        nbytes = 0
        for bucket in buckets:
            if isinstance(bucket, ray.ObjectRef):
                bucket = ray.get(bucket)
            deltas = [d for d in bucket if isinstance(d, LoraDelta)]
            if deltas:  # LoRA: adapters only; merge onto the frozen base weights here
                if self._base is None:
                    self._base = BaseWeights(self.model_dir)
                nbytes += sum(d.nbytes for d in deltas)
                bucket = self._base.merge(deltas)
            else:
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            self.engine.load_weights(bucket)
        self.version = version
        return {"seconds": time.perf_counter() - t0, "bytes": float(nbytes)}

    def load_shm(self, version: int, segment: str, entries: list) -> dict[str, float]:
        """Same-node sync: adopt (or copy) the weights the learner wrote into a shared segment."""
        from rlkit.workers.shm_sync import ShmReader

        t0 = time.perf_counter()
        if self._shm is None:
            self._shm = ShmReader()
        views = self._shm.views(segment, entries)
        adopt = getattr(self.engine, "adopt_weights", None)
        if adopt is not None:
            adopt(views)
        else:
            self.engine.load_weights(list(views.items()))
        self.version = version
        return {"seconds": time.perf_counter() - t0,
                "bytes": float(sum(t.numel() * t.element_size() for t in views.values()))}

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def checksum(self, names: list[str]) -> dict[str, Any]:
        return {"version": self.version, "sums": self.engine.tensor_checksum(names)}

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], sampling: dict) -> list[list[float]]:
        return self.engine.score(prompt_ids, completion_ids, SamplingConfig(**sampling))

    def close(self) -> None:
        self.engine.close()
