"""The driver's side of weight sync: send learner rank 0's weights to every rollout worker, then
prove that each engine holds every tensor.

A :class:`Transport` moves one version of the weights; :class:`WeightSync` picks one, runs it and
checks the result. The transports (``rollout.sync_transport``; docs/gpu.md):

* ``shm`` (:class:`ShmTransport`): one copy through shared memory, when every rollout worker shares
  learner rank 0's node and nothing is on a GPU;
* ``object`` (:class:`ObjectStoreTransport`): buckets put once in the Ray object store and read by
  every worker, on any node;
* ``collective`` (:class:`CollectiveTransport`): rank 0 broadcasts each bucket over a process group
  of its own with every rollout worker: NCCL when all of them are on CUDA, gloo otherwise (the same
  code; the group is built from a ``TCPStore`` and never touches DeepSpeed's default group);
* ``ipc`` (:class:`IpcTransport`): CUDA IPC handles of rank 0's weights for engines on its GPU,
  which copy device to device, with nothing through the host.

``auto`` picks by placement (:func:`choose_transport`). A transport returns the checksums the
learner took while the bytes were at hand (:mod:`rlkit.workers.weights`); :meth:`WeightSync.verify`
compares them, tensor by tensor, with the engines' own sums after loading, so a skipped sync or a
partial one (any tensor) is caught, whichever transport moved the bytes.

Every wait of a sync is bounded (``timeout_s``, the runtime's step timeout: docs/reliability.md):
a hung engine or learner rank, or a collective peer that never joins, becomes
:class:`rlkit.recovery.StageTimeout` naming the sync stage, not a stalled run.

The wire format of the collective transport, shared by both ends, is at the bottom of this module:
:class:`WireTensor` (a bucket's layout, known to the receivers before the bytes arrive),
:func:`open_store` / :func:`join_group` and :func:`broadcast`.
"""

from __future__ import annotations

import atexit
import datetime
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from rlkit.recovery import StageTimeout, first_death

TRANSPORTS = ("auto", "shm", "object", "collective", "ipc")
"""Values of ``rollout.sync_transport``."""
BACKENDS = ("auto", "gloo", "nccl")
"""Values of ``rollout.sync_backend`` (the collective transport's process group)."""


class SyncError(RuntimeError):
    """A rollout engine does not hold the weights the learner just sent."""


class TransportError(ValueError):
    """A transport was asked for where it cannot work; the message names the config key."""


def wait(refs: Any, what: str, timeout_s: Optional[float] = None) -> Any:
    """``ray.get(refs)`` bounded by ``timeout_s`` (None: unbounded); a timeout is
    :class:`StageTimeout` naming ``what``."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise StageTimeout(f"weight sync ({what}): no answer within {timeout_s:.0f} s (recovery.min_timeout_s / "
                           f"timeout_factor × the slowest step); an engine or learner rank is hung") from None


def on_learners(learners: Sequence[Any], zero_stage: int, method: str, *args: Any,
                timeout_s: Optional[float] = None) -> Any:
    """Learner rank 0's answer to ``method``. Under ZeRO-3 every rank holds a shard of each
    weight, so methods that read full weights run on all ranks together (they gather)."""
    ranks = learners if zero_stage == 3 else learners[:1]
    return wait([getattr(a, method).remote(*args) for a in ranks], f"learner {method}", timeout_s)[0]


class Transport(Protocol):
    name: str
    timeout_s: Optional[float]
    """Bound of each wait of :meth:`send` (set by :class:`WeightSync` before every sync)."""

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        """Deliver the learner's current weights as ``version`` to ``targets`` (rollout actors);
        returns ``names``, ``bytes`` and ``sums`` (the learner's checksum of each tensor)."""


_SHM_SEGMENTS: list[str] = []
"""Names of the shared-memory segments this process's :class:`ShmTransport` s had the learner create."""


def shm_segments() -> list[str]:
    return list(_SHM_SEGMENTS)


def release_shm_segments() -> list[str]:
    """Unlink every segment this process's transports named that is still on this node (the
    learner closes its own on a clean shutdown; one that was killed cannot). Runs from
    ``Runtime.shutdown`` and at this process's exit. Returns the names removed."""
    from rlkit.workers.shm_sync import unlink

    names = list(_SHM_SEGMENTS)
    _SHM_SEGMENTS.clear()
    return unlink(names)


class ShmTransport:
    """Same node: rank 0 writes the weights into a shared-memory slot once; each worker maps it
    (:mod:`rlkit.workers.shm_sync`). The driver keeps the segments' names and unlinks what a
    killed learner left (:func:`release_shm_segments`); the names carry the driver's pid, so a
    later driver on the node unlinks what a killed driver left (``shm_sync.sweep_stale``)."""

    name = "shm"
    timeout_s: Optional[float] = None

    def __init__(self, learners: Sequence[Any], zero_stage: int):
        from rlkit.workers.shm_sync import owner_tag, segment_names, sweep_stale

        self.learners, self.zero_stage = learners, zero_stage
        sweep_stale()  # what a killed driver of this node left
        self.tag = owner_tag()
        if not _SHM_SEGMENTS:
            atexit.register(release_shm_segments)
        _SHM_SEGMENTS.extend(segment_names(self.tag))

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        state = on_learners(self.learners, self.zero_stage, "shm_state", self.tag, timeout_s=self.timeout_s)
        wait([w.load_shm.remote(version, state["segment"], state["entries"]) for w in targets],
             "engines load shm", self.timeout_s)
        return state


class ObjectStoreTransport:
    """Any node: rank 0 puts the weights (or LoRA adapters) into the object store in buckets of
    ``bucket_bytes``; every worker reads the same objects."""

    name = "object"
    timeout_s: Optional[float] = None

    def __init__(self, learners: Sequence[Any], zero_stage: int, bucket_bytes: int = 64 * 2**20):
        self.learners, self.zero_stage, self.bucket_bytes = learners, zero_stage, bucket_bytes

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        state = on_learners(self.learners, self.zero_stage, "full_state", self.bucket_bytes, timeout_s=self.timeout_s)
        wait([w.load_buckets.remote(version, state["refs"]) for w in targets], "engines load buckets", self.timeout_s)
        del state["refs"]  # release the buckets from the object store
        return state


class CollectiveTransport:
    """Any placement: learner rank 0 broadcasts the sync buckets over a process group of its own
    with every rollout worker (rank 0 = learner rank 0, rank i + 1 = rollout worker i).

    The group is built once, at the first sync, from a ``TCPStore`` that rank 0 hosts
    (:func:`open_store`, :func:`join_group`): NCCL when rank 0 and every engine are on CUDA, gloo
    otherwise (``backend``). Each sync the receivers first get the buckets' layout
    (:class:`WireTensor`, no bytes), then every tensor of a bucket is broadcast; an engine whose
    parameter matches receives straight into it, others receive into a buffer and load it. Under
    ZeRO-3 every learner rank gathers the bucket's group while rank 0 sends it. A worker left out of
    a sync (``targets``) still joins every broadcast, the group needs all of its members, but
    discards the bytes and keeps its version: the check then catches it like any skipped sync.
    """

    name = "collective"
    timeout_s: Optional[float] = None

    def __init__(self, learners: Sequence[Any], zero_stage: int, rollout: Sequence[Any], backend: str = "gloo",
                 bucket_bytes: int = 64 * 2**20):
        self.learners, self.zero_stage, self.rollout = learners, zero_stage, rollout
        self.backend, self.bucket_bytes = backend, bucket_bytes
        self.tag: Optional[str] = None

    def _open(self) -> str:
        tag = f"rlkit_sync_{uuid.uuid4().hex[:12]}"
        world = 1 + len(self.rollout)
        host, port = wait(self.learners[0].collective_open.remote(tag, world, self.backend), "open group",
                          self.timeout_s)
        # Every member blocks in the group's rendezvous until all have joined: start them together.
        wait([self.learners[0].collective_join.remote(tag)] +
             [w.collective_join.remote(host, port, tag, i + 1, world, self.backend)
              for i, w in enumerate(self.rollout)], "join group", self.timeout_s)
        return tag

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        if self.tag is None:
            self.tag = self._open()
        layout = wait(self.learners[0].sync_layout.remote(self.bucket_bytes), "layout", self.timeout_s)
        ranks = self.learners if self.zero_stage == 3 else self.learners[:1]
        sends = [a.collective_send.remote(self.tag, self.bucket_bytes) for a in ranks]
        recvs = [w.collective_recv.remote(self.tag, version, layout, all(w is not t for t in targets))
                 for w in self.rollout]
        try:
            return wait(sends + recvs, "broadcast", self.timeout_s)[0]
        except Exception as err:
            self.tag = None  # a member failed mid-broadcast: the next sync builds a new group
            dead = first_death(sends)  # a learner rank that died makes the engines fail in the broadcast
            if dead is not None:
                wait(sends[dead], "broadcast")  # raises the rank's dead-actor error
            raise err


class IpcTransport:
    """Rollout engines on learner rank 0's GPU: rank 0 hands out CUDA IPC handles of its weights
    (``torch.multiprocessing`` reductions, bucket by bucket) and each engine copies device to device
    from them; nothing passes through host memory. ZeRO ≤ 2 only (rank 0 holds the full weights)."""

    name = "ipc"
    timeout_s: Optional[float] = None

    def __init__(self, learners: Sequence[Any], bucket_bytes: int = 64 * 2**20):
        self.learners, self.bucket_bytes = learners, bucket_bytes

    def send(self, version: int, targets: Sequence[Any]) -> dict[str, Any]:
        state = wait(self.learners[0].ipc_state.remote(self.bucket_bytes), "learner ipc_state", self.timeout_s)
        wait([w.load_ipc.remote(version, state["buckets"]) for w in targets], "engines load ipc", self.timeout_s)
        del state["buckets"]
        return state


@dataclass(frozen=True)
class Placed:
    """Where an actor of the sync runs: its Ray node, its device and, on CUDA, the GPU's UUID
    (device indices differ between processes that see different ``CUDA_VISIBLE_DEVICES``)."""

    node: str
    device: str
    gpu: Optional[str] = None


def choose_transport(learner: Placed, workers: Sequence[Placed], *, lora: bool, zero_stage: int,
                     shm_room: bool = True) -> str:
    """The ``auto`` transport: IPC when every engine is on learner rank 0's GPU (full weights
    only, ZeRO ≤ 2); the collective over NCCL when GPUs are involved; shared memory when all are
    CPU processes of one node with room in /dev/shm (full weights only); the collective over gloo
    across nodes; else the object store (LoRA adapters on one CPU node, or no room in /dev/shm)."""
    on_gpu = learner.device == "cuda" or any(w.device == "cuda" for w in workers)
    if on_gpu:
        same_gpu = learner.device == "cuda" and all(w.gpu == learner.gpu for w in workers)
        return "ipc" if same_gpu and not lora and zero_stage != 3 else "collective"
    if all(w.node == learner.node for w in workers):
        return "shm" if shm_room and not lora else "object"
    return "collective"


def transport_error(name: str, learner: Placed, workers: Sequence[Placed], *, lora: bool, zero_stage: int,
                    backend: str = "auto") -> Optional[str]:
    """Why ``rollout.sync_transport: name`` (or ``rollout.sync_backend: backend``) cannot work on
    this placement, or None when it can."""
    key = f"rollout.sync_transport: {name}"
    on_cuda = learner.device == "cuda" and all(w.device == "cuda" for w in workers)
    if name == "shm":
        if lora:
            return f"{key} sends full weights; a LoRA policy sends adapters (use collective or object)"
        if learner.device != "cpu" or any(w.device != "cpu" for w in workers):
            return f"{key} needs the learner and every engine on CPU (use ipc or collective on GPUs)"
        if any(w.node != learner.node for w in workers):
            return f"{key} needs every rollout worker on learner rank 0's node (use collective or object)"
    if name == "ipc":
        if any(w.node != learner.node for w in workers):
            return f"{key}: CUDA IPC cannot cross nodes; rollout workers run on other nodes (use collective)"
        if learner.device != "cuda" or any(w.gpu != learner.gpu for w in workers):
            return f"{key} needs every engine on learner rank 0's GPU (use collective)"
        if lora or zero_stage == 3:
            return f"{key} shares rank 0's full weights: not with LoRA or ZeRO-3 (use collective)"
    if name == "collective" and backend == "nccl" and not on_cuda:
        return "rollout.sync_backend: nccl needs learner rank 0 and every engine on CUDA (use gloo or auto)"
    return None


def collective_backend(learner: Placed, workers: Sequence[Placed], backend: str = "auto") -> str:
    """NCCL when rank 0 and every engine are on CUDA, gloo otherwise (or as configured)."""
    if backend != "auto":
        return backend
    on_cuda = learner.device == "cuda" and all(w.device == "cuda" for w in workers)
    return "nccl" if on_cuda else "gloo"


class WeightSync:
    """Chooses a transport once (at the first sync), sends, and verifies every tensor. Each wait
    is bounded by ``timeout_s()`` seconds (None: unbounded)."""

    def __init__(self, learners: Sequence[Any], rollout: Sequence[Any], *, zero_stage: int, lora: bool,
                 mode: str = "auto", backend: str = "auto", timeout_s: Optional[Callable[[], float]] = None):
        if mode not in TRANSPORTS:
            raise TransportError(f"rollout.sync_transport: unknown transport {mode!r}; valid: {list(TRANSPORTS)}")
        self.learners, self.rollout = learners, rollout
        self.zero_stage, self.lora, self.mode, self.backend = zero_stage, lora, mode, backend
        self.timeout_s = timeout_s or (lambda: None)
        self._made: dict[str, Transport] = {}
        self.transport = None

    @property
    def transport(self) -> Optional[Transport]:
        """The transport of every sync that forces none (chosen at the first sync)."""
        return self._transport

    @transport.setter
    def transport(self, value: Optional[Transport]) -> None:
        # None (e.g. after the learner group restarted) drops every made transport: their groups
        # and shared-memory writers belonged to the old ranks.
        if value is None:
            self._made = {}
        self._transport = value

    def sync(self, version: int, *, bucket_bytes: int = 64 * 2**20, skip: tuple[int, ...] = (),
             transport: Optional[str] = None) -> dict[str, float]:
        """Send the learner's weights as ``version`` to every rollout worker not in ``skip``, then
        verify all of them. ``transport`` forces one of :data:`TRANSPORTS` for this sync."""
        chosen = self._choose() if transport is None else self._make(transport)
        if hasattr(chosen, "bucket_bytes"):
            chosen.bucket_bytes = bucket_bytes
        chosen.timeout_s = self.timeout_s()
        t0 = time.perf_counter()
        state = chosen.send(version, [w for i, w in enumerate(self.rollout) if i not in skip])
        seconds = time.perf_counter() - t0
        self.verify(version, state["sums"])
        nbytes = state["bytes"]
        return {"sync/seconds": seconds, "sync/bytes": nbytes, "sync/bytes_per_s": nbytes / max(seconds, 1e-9)}

    def verify(self, version: int, want: dict[str, float]) -> None:
        """Every rollout worker holds ``version`` and, for every tensor sent, the learner's sum."""
        names = list(want)
        for i, got in enumerate(wait([w.checksum.remote(names) for w in self.rollout], "verify", self.timeout_s())):
            if got["version"] != version:
                raise SyncError(f"rollout worker {i} holds policy version {got['version']}, learner is at {version}")
            bad = [n for n in names if not _close(got["sums"].get(n), want[n])]
            if bad:
                n = bad[0]
                raise SyncError(f"rollout worker {i}: {len(bad)} of {len(names)} tensors differ from the learner's, "
                                f"first '{n}': checksum {got['sums'].get(n)} != learner {want[n]}")

    def placement(self) -> tuple[Placed, list[Placed]]:
        """Where learner rank 0 and each rollout worker run (asked once per transport choice)."""
        places = wait([a.sync_place.remote() for a in [self.learners[0], *self.rollout]], "placement", self.timeout_s())
        return Placed(**places[0]), [Placed(**p) for p in places[1:]]

    def _choose(self) -> Transport:
        """The configured transport, or the automatic one (decided once)."""
        if self.transport is None:
            learner, workers = self.placement()
            name = self.mode
            if name == "auto":
                room = True
                if learner.device == "cpu" and all(w.node == learner.node for w in workers) and not self.lora:
                    room = shm_free_bytes() > 2.2 * float(wait(self.learners[0].weight_bytes.remote(), "weight bytes",
                                                              self.timeout_s()))
                name = choose_transport(learner, workers, lora=self.lora, zero_stage=self.zero_stage, shm_room=room)
            self.transport = self._make(name, (learner, workers))
        return self.transport

    def _make(self, name: str, placed: Optional[tuple[Placed, list[Placed]]] = None) -> Transport:
        """The transport ``name``, made once: a collective group or a shared-memory writer is kept
        for every later sync that forces the same transport."""
        if self.transport is not None and self.transport.name == name:
            return self.transport
        if name not in self._made:
            self._made[name] = self._new(name, placed)
        return self._made[name]

    def _new(self, name: str, placed: Optional[tuple[Placed, list[Placed]]]) -> Transport:
        if name not in TRANSPORTS[1:]:
            raise TransportError(f"unknown sync transport {name!r}; valid: {list(TRANSPORTS[1:])}")
        learner, workers = placed or self.placement()
        why = transport_error(name, learner, workers, lora=self.lora, zero_stage=self.zero_stage, backend=self.backend)
        if why:
            raise TransportError(why)
        if name == "shm":
            return ShmTransport(self.learners, self.zero_stage)
        if name == "object":
            return ObjectStoreTransport(self.learners, self.zero_stage)
        if name == "ipc":
            return IpcTransport(self.learners)
        return CollectiveTransport(self.learners, self.zero_stage, self.rollout,
                                   collective_backend(learner, workers, self.backend))


def _close(got: Optional[float], want: float) -> bool:
    return got is not None and bool(torch.isclose(torch.tensor(got, dtype=torch.float64),
                                                  torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6))


def shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------------- the collective's wire
@dataclass(frozen=True)
class WireTensor:
    """One tensor of a broadcast bucket, as the receivers learn it before the bytes arrive.

    ``part`` is "weight" for a full weight under its HF name, or "lora_A" / "lora_B" for the factors
    of the LoRA adapter of weight ``name`` (``scaling``, ``fan_in_fan_out`` as in
    :class:`rlkit.workers.lora_sync.LoraDelta`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    part: str = "weight"
    scaling: float = 1.0
    fan_in_fan_out: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


GROUP_TIMEOUT = datetime.timedelta(minutes=30)
"""How long a member waits in the rendezvous or a broadcast (a sync may wait for a rollout
worker to finish generating)."""


def open_store(host: str) -> Any:
    """The rendezvous store of a sync group, hosted by learner rank 0 on a free port of ``host``."""
    import torch.distributed as dist

    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)


@dataclass
class SyncGroup:
    """A member's handle on a sync group: the process group, the store connection it was built
    from (kept open for the group's lifetime) and the device its tensors live on."""

    process_group: Any
    store: Any
    backend: str
    tag: str

    @property
    def device(self) -> torch.device:
        """The current CUDA device for NCCL, host memory for gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def join_group(host: str, port: int, tag: str, rank: int, world: int, backend: str, store: Any = None) -> SyncGroup:
    """Join the sync group ``tag`` as ``rank`` of ``world``: a ``ProcessGroupGloo`` or
    ``ProcessGroupNCCL`` built directly on the store (``torch.distributed``'s default group, the
    learners' DeepSpeed group, is neither used nor changed). Blocks until every member has joined."""
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore(host, port, is_master=False, timeout=GROUP_TIMEOUT)
    prefixed = dist.PrefixStore(tag, store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = GROUP_TIMEOUT
        pg = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
    elif backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = GROUP_TIMEOUT
        # Bound to this node's Ray address, which the other nodes reach (the hostname may not resolve).
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_node_ip())]
        pg = dist.ProcessGroupGloo(prefixed, rank, world, opts)
    else:
        raise TransportError(f"rollout.sync_backend: unknown backend {backend!r}; valid: {list(BACKENDS)}")
    return SyncGroup(pg, store, backend, tag)


def broadcast(group: SyncGroup, tensors: Sequence[torch.Tensor], root: int = 0) -> None:
    """Broadcast ``tensors`` from ``root`` into the same-shaped tensors of every other member, in
    order, as raw bytes (any dtype, bf16 included, on either backend). All are issued before any is
    awaited, so a bucket's transfers overlap. Every tensor must be contiguous and on ``group.device``."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = root
    works = [group.process_group.broadcast([t.reshape(-1).view(torch.uint8)], opts) for t in tensors if t.numel()]
    for w in works:
        w.wait()


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except (ImportError, RuntimeError, AttributeError):  # outside Ray (bench/gpu_check.py's plain processes)
        return "127.0.0.1"
