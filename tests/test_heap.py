"""``rlkit.workers.hold_freed_memory``: freed blocks are reused, not faulted in again.

Counted in minor page faults (deterministic), each case in a fresh process: a step-like round
(tensors of 64 and 21 MiB written, then freed) is repeated 24 times. Under glibc's defaults every
round faults its pages in again (the blocks are above the largest mmap threshold, so free unmaps
them); with freed memory held the heap grows until the round fits in its free space (aligned
requests do not fit the exact hole a same-size block left; 3 to 7 rounds here, depending on where
the heap starts) and from then on a round faults nothing: the last six are checked.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

_CHILD = """
import resource, torch
from rlkit.workers import hold_freed_memory
if {hold}:
    assert hold_freed_memory()
n = 64 * 2**20 // 4
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(n), torch.ones(n // 3)
    del x, y
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refaults(hold: bool) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(hold=hold)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()[-6:]]  # the last six rounds


def test_freed_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    default = _refaults(False)
    held = _refaults(True)
    assert min(default) > pages // 2, f"malloc's defaults should refault the 64 MiB block: {default} faults"
    assert sum(held) < pages // 50, f"held freed memory still refaulted: {held} faults ({pages} pages per block)"
