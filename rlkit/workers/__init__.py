"""Ray actors of an rlkit run: rollout, reward, learner (and critic inside the learner)."""

import ctypes
import os


def claim_cpu(threads: int) -> None:
    """Set this actor's torch threads and undo Ray's lowered worker priority where allowed.

    Ray starts worker processes with a raised nice value; every rlkit actor is on the critical path
    of a step, so each runs at normal priority when the user may set it (root or CAP_SYS_NICE).
    """
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError):
        pass  # an unprivileged user keeps Ray's niceness; nothing else changes


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_AT = 2**31 - 1


def hold_freed_memory() -> bool:
    """Keep memory this process frees in its own heap instead of handing it back to the kernel.

    glibc's malloc serves a block above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
    and unmaps it on free, and trims the heap's free top above the trim threshold. A CPU learner
    frees and reallocates about 2 GB per step (chunk logits, activations, the embedding gradient,
    gradients), so every step faulted those pages in again: ~550 000 minor faults and ~4 s of
    system time per e2e step, more where the hypervisor takes each fault back too. With mmap off
    (``M_MMAP_MAX`` 0) and the trim threshold at 2 GiB, freed blocks are reused once the heap has
    settled: 1–27 faults per step after the first (docs/benchmarks.md, Levers). The heap stays at
    the step's peak instead of shrinking between steps. Returns False (and changes nothing) where
    the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))
