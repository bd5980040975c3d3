"""Rollout worker: a Ray actor that owns one generation engine (vLLM, or the HF engine on transformers' forward).

Several rollout workers share the prompts of a step. Each sample records the policy version of the
weights that produced it. Weight sync arrives as buckets of named tensors (or, for a LoRA policy, of adapters merged here onto
the frozen base weights); after loading them the
worker reports checksums of a fixed set of tensors so the driver can prove the engine has the new
weights (a skipped or partial sync is detected, not silently trained on).

Each transport of :mod:`rlkit.sync` has its receiving method here: ``load_buckets`` (object
store), ``load_shm`` (shared memory), ``collective_join`` / ``collective_recv`` (the broadcast
group; an engine that exposes ``named_weights`` receives straight into its matching parameters)
and ``load_ipc`` (CUDA IPC handles).

Partial rollouts (``rollout.partial_rollouts``, docs/async.md): :func:`rollout_actor` makes the
actor threaded, with the sync methods in a concurrency group of their own (Ray's concurrency
groups: one thread for generation, scoring and greedy decoding in submission order, one for
syncs), so a sync runs while a generation is in flight. Every load happens inside the engine's
``swapping(version)`` block (:class:`rlkit.workers.hf_engine.WeightGate`): between two decode
steps, never inside a forward, and the worker's version changes together with the weights, so
the checksum that follows answers the new version's weights. Each token of a sample records the
version that produced it (``Rollout.token_versions``); ``policy_version`` is the oldest.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any, Iterator

from rlkit.timeline import Spans
from rlkit.types import Rollout
from rlkit.workers.engine import SamplingConfig


def make_engine(engine: str, model_dir: str, *, dtype: str, threads: int, seed: int, max_model_len: int,
                tensor_parallel_size: int | None = None, matmul_dtype: str = "auto"):
    """The worker's engine on this process's device: CUDA when Ray gave it a GPU, else CPU.

    ``dtype`` "auto" resolves here (:meth:`rlkit.config.ModelConfig.resolved_dtype`: bf16 on GPU,
    fp32 on CPU). ``tensor_parallel_size`` (vLLM only) defaults to ``RLKIT_TENSOR_PARALLEL_SIZE``,
    which :meth:`rlkit.placement.Placement.options` sets from ``rollout.tensor_parallel_size``.
    """
    import os

    import torch

    from rlkit.config import ModelConfig
    from rlkit.placement import TP_ENV, VLLM_EXTRA, vllm_installed

    on_gpu = torch.cuda.is_available()
    dtype = ModelConfig(dtype=dtype).resolved_dtype(on_gpu)
    tp = tensor_parallel_size or int(os.environ.get(TP_ENV, "1"))
    if engine == "hf":
        if tp > 1:
            raise ValueError(f"rollout.tensor_parallel_size: {tp} needs rollout.engine: vllm")
        from rlkit.workers.hf_engine import HFEngine

        return HFEngine(model_dir, dtype=dtype, threads=threads, device="cuda" if on_gpu else "cpu",
                        matmul_dtype=matmul_dtype)
    if engine == "vllm":
        if matmul_dtype != "auto":
            raise ValueError(f"rollout.matmul_dtype: {matmul_dtype} applies to rollout.engine: hf")
        if not vllm_installed():
            raise ImportError(f"rollout.engine: vllm is not installed; {VLLM_EXTRA}, or set rollout.engine: hf")
        from rlkit.workers.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, dtype=dtype, threads=threads, seed=seed, max_model_len=max_model_len,
                          tensor_parallel_size=tp)
    raise ValueError(f"rollout.engine: unknown engine '{engine}'; valid: ['hf', 'vllm']")


SYNC_METHODS = ("ready", "load_buckets", "load_shm", "load_ipc", "collective_join", "collective_recv",
                "sync_place", "node_id", "checksum", "hold_generation", "drain_spans")
"""Methods that run in the ``sync`` concurrency group of a partial-rollout worker (beside a generation)."""


class RolloutWorker:
    def __init__(self, model_dir: str, *, engine: str = "hf", dtype: str = "float32", threads: int = 1,
                 seed: int = 0, worker_index: int = 0, max_model_len: int = 1024, partial_kv: str = "keep",
                 matmul_dtype: str = "auto", hold_freed_memory: bool = True):
        import torch

        from rlkit.workers import claim_cpu, hold_freed_memory as hold

        claim_cpu(threads)
        # Before the engine allocates: a CPU HF engine reuses its decode buffers instead of refaulting them.
        self.holds_heap = hold_freed_memory and engine == "hf" and not torch.cuda.is_available() and hold()
        self.engine = make_engine(engine, model_dir, dtype=dtype, threads=threads, seed=seed,
                                  max_model_len=max_model_len, matmul_dtype=matmul_dtype)
        if hasattr(self.engine, "on_swap"):
            self.engine.on_swap = partial_kv
        self.worker_index = worker_index
        self.model_dir = model_dir
        self._base = None  # frozen base weights, read on the first LoRA sync
        self._shm = None  # shared-memory segments mapped for same-node syncs
        self.version = 0
        self.spans = Spans(f"rollout {worker_index}")

    @contextmanager
    def _swapping(self, version: int) -> Iterator[None]:
        """Load weights inside this block: no forward of the engine runs meanwhile (partial
        rollouts), and the worker holds ``version`` once it ends."""
        swapping = getattr(self.engine, "swapping", None)
        with swapping(version) if swapping is not None else nullcontext(), self.spans("sync", version=version):
            yield
            self.version = version

    def ready(self) -> dict[str, Any]:
        return {"worker": self.worker_index, "pid": os.getpid(), "version": self.version, "holds_heap": self.holds_heap}

    def generate(self, prompts: list[tuple[int, int, list[int]]], n: int, sampling: dict, seed: int) -> list[Rollout]:
        """``prompts``: (group_id, dataset row index, prompt token ids). Returns n rollouts each."""
        cfg = SamplingConfig(**sampling)
        with self.spans("generate", version=self.version, samples=len(prompts) * n):
            gens = self.engine.generate([p for _, _, p in prompts], n, cfg, seed)
        out = []
        for i, g in enumerate(gens):
            group_id, row, _ = prompts[i // n]
            # An engine without per-token versions (vLLM) runs every sample on one version: no sync
            # lands in the middle of its generation (partial rollouts need the HF engine).
            versions = list(getattr(g, "versions", None) or [self.version] * len(g.completion_ids))
            out.append(Rollout(
                prompt_ids=g.prompt_ids, completion_ids=g.completion_ids, sampler_logp=g.logprobs,
                finish_reason=g.finish_reason, policy_version=min(versions, default=self.version),
                group_id=group_id, prompt_index=row, token_versions=versions,
            ))
        return out

    def hold_generation(self, steps: int, skip: int = 0) -> None:
        """Tests: the generation after ``skip`` others waits after ``steps`` decode steps for the
        next sync, which waits for it to get there (:meth:`rlkit.workers.hf_engine.HFEngine.hold_after`)."""
        self.engine.hold_after(steps, skip)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        with self.spans("eval", version=self.version):
            return [asdict(g) for g in self.engine.greedy(prompt_ids, max_new_tokens)]

    def drain_spans(self) -> list[dict[str, Any]]:
        """What this worker did since the last call, as wall-clock spans (:mod:`rlkit.timeline`)."""
        return self.spans.drain()

    def load_buckets(self, version: int, buckets: list) -> dict[str, float]:
        """Load weight buckets (each a list of (name, tensor), or an ObjectRef to one)."""
        import ray

        t0 = time.perf_counter()
        nbytes = 0
        with self._swapping(version):
            for bucket in buckets:
                if isinstance(bucket, ray.ObjectRef):
                    bucket = ray.get(bucket)
                nbytes += self._load_items(bucket)
        return {"seconds": time.perf_counter() - t0, "bytes": float(nbytes)}

    def _load_items(self, bucket: list) -> int:
        """Load one bucket of sync items, (name, tensor) pairs or LoRA deltas; returns its bytes."""
        from rlkit.workers.lora_sync import BaseWeights, LoraDelta

        deltas = [d for d in bucket if isinstance(d, LoraDelta)]
        if deltas:  # LoRA: adapters only; merge onto the frozen base weights here
            if self._base is None:
                self._base = BaseWeights(self.model_dir)
            self.engine.load_weights(self._base.merge(deltas))
            return sum(d.nbytes for d in deltas)
        self.engine.load_weights(bucket)
        return sum(t.numel() * t.element_size() for _, t in bucket)

    # ---------------------------------------------------------------- collective and IPC syncs
    def sync_place(self) -> dict[str, Any]:
        """This worker's node, engine device and GPU (:class:`rlkit.sync.Placed`)."""
        import torch

        from rlkit.workers.weights import device_place

        return device_place(torch.device(getattr(self.engine, "device", "cpu")))

    def collective_join(self, host: str, port: int, tag: str, rank: int, world: int, backend: str) -> None:
        """Join the sync group ``tag`` (blocks until learner rank 0 and every worker have joined)."""
        from rlkit.sync import join_group

        self._group = join_group(host, port, tag, rank, world, backend)

    def collective_recv(self, tag: str, version: int, layout: list, discard: bool = False) -> dict[str, float]:
        """Receive one sync from the group's broadcasts, bucket by bucket as ``layout`` says.

        A full weight whose engine parameter has its shape, dtype and device (and is contiguous) is
        received in place; anything else (another dtype, a LoRA factor, an engine without
        ``named_weights``) into a buffer, then loaded. ``discard``: join every broadcast, keep
        nothing (a worker left out of this sync; the group needs every member)."""
        from rlkit.sync import broadcast

        t0 = time.perf_counter()
        group = getattr(self, "_group", None)
        if group is None or group.tag != tag:
            raise RuntimeError(f"rollout worker {self.worker_index}: not in sync group {tag}")
        device = group.device
        named = getattr(self.engine, "named_weights", None)
        params = named() if named is not None and not discard else {}
        nbytes = 0
        # Received in place into the engine's parameters: no forward may run until all have arrived.
        with nullcontext() if discard else self._swapping(version):
            for bucket in layout:
                bufs = [_recv_target(params.get(w.name), w, device) for w in bucket]
                broadcast(group, bufs)
                nbytes += sum(w.nbytes for w in bucket)
                if discard:
                    continue
                in_place = [w.name for w, b in zip(bucket, bufs) if b is params.get(w.name)]
                if in_place:
                    self.engine.weights_updated(in_place)
                staged = [(w, b) for w, b in zip(bucket, bufs) if b is not params.get(w.name)]
                if staged:
                    self._load_items(_items(staged))
        return {"seconds": time.perf_counter() - t0, "bytes": float(nbytes)}

    def load_ipc(self, version: int, buckets: list) -> dict[str, float]:
        """Same-GPU sync: open each CUDA IPC handle of learner rank 0's weights and copy from it
        (device to device); the learner's memory is released with the handle."""
        t0 = time.perf_counter()
        nbytes = 0
        with self._swapping(version):
            for bucket in buckets:
                named = [(name, rebuild(*args)) for name, (rebuild, args) in bucket]
                self.engine.load_weights(named)
                nbytes += sum(t.numel() * t.element_size() for _, t in named)
                del named
        return {"seconds": time.perf_counter() - t0, "bytes": float(nbytes)}

    def load_shm(self, version: int, segment: str, entries: list) -> dict[str, float]:
        """Same-node sync: adopt (or copy) the weights the learner wrote into a shared segment."""
        from rlkit.workers.shm_sync import ShmReader

        t0 = time.perf_counter()
        if self._shm is None:
            self._shm = ShmReader()
        views = self._shm.views(segment, entries)
        adopt = getattr(self.engine, "adopt_weights", None)
        with self._swapping(version):
            if adopt is not None:
                adopt(views)
            else:
                self.engine.load_weights(list(views.items()))
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


def rollout_actor(partial: bool):
    """The Ray actor class of a rollout worker. ``partial`` (``rollout.partial_rollouts``): a
    threaded actor whose :data:`SYNC_METHODS` run in a concurrency group of their own, one thread,
    beside the default group's one thread (generate, greedy, score: in submission order); otherwise
    the plain actor, whose calls run one at a time in submission order."""
    import ray

    if not partial:
        return ray.remote(RolloutWorker)

    def in_sync_group(name: str):
        def method(self, *args, **kwargs):
            return getattr(RolloutWorker, name)(self, *args, **kwargs)

        method.__name__ = name
        method.__doc__ = getattr(RolloutWorker, name).__doc__
        return ray.method(concurrency_group="sync")(method)

    PartialRolloutWorker = type("PartialRolloutWorker", (RolloutWorker,),
                                {name: in_sync_group(name) for name in SYNC_METHODS})
    return ray.remote(concurrency_groups={"sync": 1})(PartialRolloutWorker)


def _recv_target(param: Any, w: Any, device: Any) -> Any:
    """The engine's own parameter when a full weight can be received into it as is, else a buffer."""
    import torch

    if (param is not None and w.part == "weight" and tuple(param.shape) == tuple(w.shape)
            and param.dtype == w.torch_dtype and param.device == device and param.is_contiguous()):
        return param
    return torch.empty(w.shape, dtype=w.torch_dtype, device=device)


def _items(staged: list) -> list:
    """Received buffers as sync items: (name, tensor) pairs, or LoRA deltas from their A and B."""
    from rlkit.workers.lora_sync import LoraDelta

    items, factors = [], {}
    for w, t in staged:
        if w.part == "weight":
            items.append((w.name, t))
        else:
            factors.setdefault(w.name, {})[w.part] = (w, t)
    for name, f in factors.items():
        (wa, a), (_, b) = f["lora_A"], f["lora_B"]
        items.append(LoraDelta(name, a, b, wa.scaling, wa.fan_in_fan_out))
    return items
