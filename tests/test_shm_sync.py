"""Shared-memory sync segments left by a killed driver are swept by the next one on the node."""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import shared_memory

import pytest

from rlkit.workers.shm_sync import owner_tag, segment_names, sweep_stale, unlink

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


def _create(names):
    for n in names:
        seg = shared_memory.SharedMemory(name=n, create=True, size=4096)
        seg.close()


def test_sweep_unlinks_only_segments_of_dead_owners_of_this_node():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = segment_names(owner_tag(dead.pid))
    mine = segment_names(owner_tag())
    other_node = segment_names(f"00000000p{dead.pid}_0123abcd")  # same dead pid, another host/namespace
    assert not owner_tag().startswith("00000000p")
    unrelated = ["rlkit_notatag_0"]
    _create(gone + mine + other_node + unrelated)
    try:
        removed = sweep_stale()
        assert set(gone) <= set(removed)
        assert not set(removed) & set(mine + other_node + unrelated)
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in gone)
        assert all(os.path.exists(f"/dev/shm/{n}") for n in mine + other_node + unrelated)
    finally:
        unlink(gone + mine + other_node + unrelated)
