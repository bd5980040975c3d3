"""Same-node weight sync through shared memory: one copy per sync, no serialization.

When learner rank 0 and a rollout worker run on the same node, the learner owns two shared-memory
segments, each large enough for the full weights. A sync copies every parameter into the segment
not in use (slot ``k % 2`` at the ``k``-th sync) with a plain tensor copy; the rollout worker maps
the segment and points its engine's parameters at views into it (no copy), or copies from it when
its engine cannot adopt outside storage. Two slots mean the learner never writes into memory the
engine may still be reading (one-step off-policy generation overlaps learning).

Anything that prevents it (no /dev/shm space, a worker on another node, a LoRA policy whose sync is
already small) leaves the Ray object-store path in charge.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import torch
from torch import Tensor

ALIGN = 64


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def layout(named: list[tuple[str, Tensor]]) -> tuple[list[Entry], int]:
    """Byte layout of the tensors in one segment (each entry 64-byte aligned), and its size."""
    entries, offset = [], 0
    for name, t in named:
        entries.append(Entry(name, offset, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        offset += -(-(t.numel() * t.element_size()) // ALIGN) * ALIGN
    return entries, max(offset, ALIGN)


def views(buf, entries: list[Entry]) -> dict[str, Tensor]:
    """Tensors over a segment's memory, one per entry (shared, not copied)."""
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    out = {}
    for e in entries:
        dtype = getattr(torch, e.dtype)
        nbytes = e.numel * torch.empty((), dtype=dtype).element_size()
        out[e.name] = flat[e.offset: e.offset + nbytes].view(dtype).view(e.shape)
    return out


def segment_names(tag: str) -> list[str]:
    """The two segments of a writer of ``tag``."""
    return [f"rlkit_{tag}_{slot}" for slot in range(2)]


_SEGMENT = re.compile(r"rlkit_([0-9a-f]{8})p(\d+)_[0-9a-f]+_\d")


def _node_key() -> str:
    """This host and pid namespace, hashed: a pid in a tag is only meaningful where both match
    (another container sharing /dev/shm numbers its processes in its own namespace)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return hashlib.sha1(f"{socket.gethostname()}:{ns}".encode()).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    """A fresh tag naming its owner (the driver process, ``pid``) on this node, so that segments a
    killed owner left can be told from live ones (:func:`sweep_stale`)."""
    return f"{_node_key()}p{os.getpid() if pid is None else pid}_{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sweep_stale(root: str = "/dev/shm") -> list[str]:
    """Unlink the segments whose owner was a process of this host and pid namespace that no
    longer exists (a driver killed with SIGKILL runs no exit handler, and its learner died with
    it). Segments of live owners, of other hosts or namespaces, or of an owner whose pid was
    reused, are left alone. Returns the names removed."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    key = _node_key()
    stale = [n for n in names if (m := _SEGMENT.fullmatch(n)) and m[1] == key and not _alive(int(m[2]))]
    return unlink(stale)


def unlink(names: list[str]) -> list[str]:
    """Remove the named segments from this node's shared memory, where they still exist (a learner
    that was killed never closed them: they would hold the weights' RAM twice until reboot).
    Processes that mapped one keep their mapping; the memory goes with the last of them. Returns
    the names removed."""
    removed = []
    for name in names:
        try:
            seg = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            continue
        seg.close()
        try:
            seg.unlink()  # also drops this process's resource-tracker entry
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


class ShmWriter:
    """Learner side: two segments, written alternately."""

    def __init__(self, named: list[tuple[str, Tensor]], tag: str):
        self.entries, self.size = layout(named)
        self.segments = []
        try:
            for name in segment_names(tag):
                self.segments.append(shared_memory.SharedMemory(name=name, create=True, size=self.size))
        except BaseException:
            self.close()
            raise
        self._views = [views(s.buf, self.entries) for s in self.segments]
        self.writes = 0

    @torch.no_grad()
    def write(self, named: list[tuple[str, Tensor]]) -> str:
        """Copy the tensors into the next slot; returns that segment's name."""
        slot = self.writes % 2
        dst = self._views[slot]
        for name, t in named:
            dst[name].copy_(t.detach())
        self.writes += 1
        return self.segments[slot].name

    def close(self) -> None:
        self._views = []
        for s in self.segments:
            try:
                s.close()
            except BufferError:  # a view is still alive: the mapping goes with it
                pass
            try:
                s.unlink()
            except FileNotFoundError:
                pass
        self.segments = []


class ShmReader:
    """Rollout-worker side: maps segments by name, once each."""

    def __init__(self):
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._views: dict[str, dict[str, Tensor]] = {}

    def views(self, segment: str, entries: list[Entry]) -> dict[str, Tensor]:
        if segment not in self._views:
            shm = shared_memory.SharedMemory(name=segment)
            # The learner owns the segment's lifetime; this process must not unlink it at exit.
            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
            self._segments[segment] = shm
            self._views[segment] = views(shm.buf, entries)
        return self._views[segment]
