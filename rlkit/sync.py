"""The driver's side of weight sync: send learner rank 0's weights to every rollout worker, then
prove that each engine holds every tensor.

A :class:`Transport` moves one version of the weights; :class:`WeightSync` picks one, runs it and
checks the result. Two transports exist on CPU: shared memory (:class:`ShmTransport`, one copy,
when every rollout worker shares learner rank 0's node) and the Ray object store
(:class:`ObjectStoreTransport`, buckets put once and read by every worker, across nodes). A
transport returns the checksums the learner took while the bytes were at hand
(:mod:`rlkit.workers.weights`); :meth:`WeightSync.verify` compares them, tensor by tensor, with the
engines' own sums after loading, so a skipped sync or a partial one (any tensor) is caught.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Optional, Protocol, Sequence

import torch


class SyncError(RuntimeError):
    """A rollout engine does not hold the weights the learner just sent."""


def on_learners(learners: Sequence[Any], zero_stage: int, method: str, *args: Any) -> Any:
    """Learner rank 0's answer to ``method``. Under ZeRO-3 every rank holds a shard of each
    weight, so methods that read full weights run on all ranks together (they gather)."""
    import ray

    ranks = learners if zero_stage == 3 else learners[:1]
    return ray.get([getattr(a, method).remote(*args) for a in ranks])[0]


class Transport(Protocol):
    name: str

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        """Deliver the learner's current weights as ``version`` to ``targets`` (rollout actors);
        returns ``names``, ``bytes`` and ``sums`` (the learner's checksum of each tensor)."""


class ShmTransport:
    """Same node: rank 0 writes the weights into a shared-memory slot once; each worker maps it
    (:mod:`rlkit.workers.shm_sync`)."""

    name = "shm"

    def __init__(self, learners: Sequence[Any], zero_stage: int):
        self.learners, self.zero_stage = learners, zero_stage
        self.tag = uuid.uuid4().hex[:12]

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        import ray

        state = on_learners(self.learners, self.zero_stage, "shm_state", self.tag)
        ray.get([w.load_shm.remote(version, state["segment"], state["entries"]) for w in targets])
        return state


class ObjectStoreTransport:
    """Any node: rank 0 puts the weights (or LoRA adapters) into the object store in buckets of
    ``bucket_bytes``; every worker reads the same objects."""

    name = "object"

    def __init__(self, learners: Sequence[Any], zero_stage: int, bucket_bytes: int = 64 * 2**20):
        self.learners, self.zero_stage, self.bucket_bytes = learners, zero_stage, bucket_bytes

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        import ray

        state = on_learners(self.learners, self.zero_stage, "full_state", self.bucket_bytes)
        ray.get([w.load_buckets.remote(version, state["refs"]) for w in targets])
        del state["refs"]  # release the buckets from the object store
        return state


class WeightSync:
    """Chooses a transport once (at the first sync), sends, and verifies every tensor."""

    def __init__(self, learners: Sequence[Any], rollout: Sequence[Any], *, zero_stage: int, lora: bool,
                 mode: str = "auto"):
        self.learners, self.rollout = learners, rollout
        self.zero_stage, self.lora, self.mode = zero_stage, lora, mode
        self.transport: Optional[Transport] = None

    def sync(self, version: int, *, bucket_bytes: int = 64 * 2**20, skip: tuple[int, ...] = (),
             transport: Optional[str] = None) -> dict[str, float]:
        """Send the learner's weights as ``version`` to every rollout worker not in ``skip``, then
        verify all of them. ``transport`` forces one ("shm" or "object") for this sync."""
        chosen = self._choose() if transport is None else self._make(transport)
        if isinstance(chosen, ObjectStoreTransport):
            chosen.bucket_bytes = bucket_bytes
        t0 = time.perf_counter()
        state = chosen.send(version, [w for i, w in enumerate(self.rollout) if i not in skip])
        seconds = time.perf_counter() - t0
        self.verify(version, state["sums"])
        nbytes = state["bytes"]
        return {"sync/seconds": seconds, "sync/bytes": nbytes, "sync/bytes_per_s": nbytes / max(seconds, 1e-9)}

    def verify(self, version: int, want: dict[str, float]) -> None:
        """Every rollout worker holds ``version`` and, for every tensor sent, the learner's sum."""
        import ray

        names = list(want)
        for i, got in enumerate(ray.get([w.checksum.remote(names) for w in self.rollout])):
            if got["version"] != version:
                raise SyncError(f"rollout worker {i} holds policy version {got['version']}, learner is at {version}")
            bad = [n for n in names if not _close(got["sums"].get(n), want[n])]
            if bad:
                n = bad[0]
                raise SyncError(f"rollout worker {i}: {len(bad)} of {len(names)} tensors differ from the learner's, "
                                f"first '{n}': checksum {got['sums'].get(n)} != learner {want[n]}")

    def _choose(self) -> Transport:
        """Shared memory when it can work here (decided once), else the object store."""
        import ray

        if self.transport is None:
            name = "object"
            if self.mode == "auto" and not self.lora:
                nodes = ray.get([a.node_id.remote() for a in [self.learners[0], *self.rollout]])
                weight_bytes = float(ray.get(self.learners[0].weight_bytes.remote()))
                if len(set(nodes)) == 1 and shm_free_bytes() > 2.2 * weight_bytes:
                    name = "shm"
            self.transport = self._make(name)
        return self.transport

    def _make(self, name: str) -> Transport:
        if self.transport is not None and self.transport.name == name:
            return self.transport
        if name == "shm":
            return ShmTransport(self.learners, self.zero_stage)
        if name == "object":
            return ObjectStoreTransport(self.learners, self.zero_stage)
        raise ValueError(f"unknown sync transport {name!r}; valid: ['shm', 'object']")


def _close(got: Optional[float], want: float) -> bool:
    return got is not None and bool(torch.isclose(torch.tensor(got, dtype=torch.float64),
                                                  torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6))


def shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize
