"""Ray actors of an rlkit run: rollout, reward, learner (and critic inside the learner)."""

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
