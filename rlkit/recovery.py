"""What the runtime does when an actor dies or hangs (docs/reliability.md).

Rollout and reward actors are restarted by Ray (``max_restarts``); the runtime notices the failed
call, waits for the new process, brings it up to date (a rollout engine gets the current weights,
verified) and redoes the call, so a step completes with exactly its own prompts. Each actor may die
``recovery.actor_restarts`` times; one more death is :class:`ActorLost`. A learner rank cannot
rejoin a DeepSpeed step, so its death is :class:`LearnerLost`, which the driver answers by
restarting the learner group from the last checkpoint. Every wait on an actor during a step has a
timeout (:meth:`Supervisor.timeout_s`), so a hung actor is :class:`StageTimeout`, not a stalled run.

The driver's side: :class:`StopSignals` turns SIGTERM/SIGUSR1 into "checkpoint after this step",
then :class:`Preempted` exits with code 75; :func:`check_finite` names a non-finite tensor before
the learner sees it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch


class ActorLost(RuntimeError):
    """An actor died more often than ``recovery.actor_restarts`` allows."""


class LearnerLost(RuntimeError):
    """A learner rank died; the learner group must restart from a checkpoint."""

    def __init__(self, rank: int, stage: str):
        super().__init__(f"learner rank {rank} died during {stage}")
        self.rank, self.stage = rank, stage


class StaleWorker(RuntimeError):
    """A rollout worker answered from an older policy version than it was given: it was restarted
    (with the initial weights) between the sync and the call."""


class StageTimeout(RuntimeError):
    """A wait on an actor outlived the step's timeout."""


def dead_actor_error() -> tuple[type, ...]:
    """The exceptions of a call on a dead (or restarting, or lost-node) actor."""
    import ray.exceptions as rex

    return tuple(e for e in (getattr(rex, "RayActorError", None), getattr(rex, "ActorDiedError", None),
                             getattr(rex, "ActorUnavailableError", None)) if e is not None)


def restarted_actor_error() -> tuple[type, ...]:
    """A dead actor, or one that came back without its state."""
    return (*dead_actor_error(), StaleWorker)


class Supervisor:
    """Death counts per actor, and the timeout of waits during a step."""

    def __init__(self, restarts: int, min_timeout_s: float, factor: float):
        self.restarts, self.min_timeout_s, self.factor = restarts, min_timeout_s, factor
        self.deaths: Counter[str] = Counter()
        self.slowest_step_s = 0.0
        self.recovered: list[dict[str, Any]] = []
        """One entry per survived death: actor, stage, seconds to recover."""

    def timeout_s(self) -> float:
        return max(self.min_timeout_s, self.factor * self.slowest_step_s)

    def record_step(self, seconds: float) -> None:
        self.slowest_step_s = max(self.slowest_step_s, seconds)

    def died(self, name: str, stage: str) -> None:
        """Count a death of ``name``; raise :class:`ActorLost` past the bound."""
        self.deaths[name] += 1
        if self.deaths[name] > self.restarts:
            raise ActorLost(f"{name} died {self.deaths[name]} times (during {stage}); recovery.actor_restarts = "
                            f"{self.restarts}")

    def get(self, refs: Any, stage: str, timeout_s: Optional[float] = None) -> Any:
        """``ray.get`` with the step timeout (or ``timeout_s``); a timeout names the stage."""
        import ray

        timeout_s = timeout_s or self.timeout_s()
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StageTimeout(f"{stage}: no answer within {timeout_s:.0f} s (recovery.min_timeout_s / "
                               f"timeout_factor × the slowest step); an actor is hung") from None

    def wait_restarted(self, ping: Callable[[], Any], name: str) -> Any:
        """Call ``ping`` (an actor method's ``.remote()``) until the restarted actor answers; calls
        made while Ray is still restarting it fail as unavailable and are repeated."""
        import time

        import ray.exceptions as rex

        deadline = time.monotonic() + self.timeout_s()
        while True:
            try:
                return self.get(ping(), f"restart of {name}")
            except rex.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise StageTimeout(f"{name} did not come back within {self.timeout_s():.0f} s") from None
                time.sleep(0.2)
            except rex.ActorDiedError:
                raise ActorLost(f"{name} died and Ray did not restart it") from None

    def get_learners(self, refs: Sequence[Any], stage: str, timeout_s: Optional[float] = None) -> list:
        """Every learner rank's answer; a dead rank is :class:`LearnerLost` naming it. When a rank
        fails, the others are given :data:`DEATH_GRACE_S` more to report a death: when one rank dies
        the others fail in their collectives (a gloo or NCCL error), and the death, not the symptom,
        is what the driver answers; a rank that is merely stuck in a collective its failed peer left
        (e.g. a barrier after a failed write) is not waited for."""
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(self.get(ref, stage, timeout_s))
            except dead_actor_error():
                raise LearnerLost(rank, stage) from None
            except Exception as error:
                dead = first_death(refs[rank + 1:])
                if dead is not None:
                    raise LearnerLost(rank + 1 + dead, stage) from None
                raise error
        return out

    def call_with_restarts(self, name: str, stage: str, call: Callable[[], Any],
                           revive: Callable[[], None]) -> Any:
        """``call()`` (which waits for the actor); when the actor died or came back without its
        state, count it, ``revive`` it and call again."""
        import time

        while True:
            try:
                return call()
            except restarted_actor_error():
                t0 = time.perf_counter()
                self.died(name, stage)
                revive()
                self.recovered.append({"actor": name, "stage": stage, "seconds": time.perf_counter() - t0})


DEATH_GRACE_S = 15.0
"""After one learner rank fails, how long the others may take to report that one of them died."""


def first_death(refs: Sequence[Any]) -> Optional[int]:
    """Index of the first call in ``refs`` whose actor died, waiting at most :data:`DEATH_GRACE_S`
    for them (calls still running then are not waited for); None when none did."""
    import ray

    refs = list(refs)
    if not refs:
        return None
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=DEATH_GRACE_S)
    for i, ref in enumerate(refs):
        if ref in done:
            try:
                ray.get(ref)
            except dead_actor_error():
                return i
            except Exception:  # noqa: BLE001 - only a death is reported here
                pass
    return None

REQUEUE_EXIT = 75
"""Exit code of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL): requeue it."""


class Preempted(SystemExit):
    """Raised by :meth:`rlkit.trainer.Trainer.fit` after a stop signal, once the checkpoint is written; the
    process exits with :data:`REQUEUE_EXIT`."""

    def __init__(self, signum: int, step: int, path: Any):
        super().__init__(REQUEUE_EXIT)
        self.signum, self.step, self.path = signum, step, path
        print(f"rlkit: {signal.Signals(signum).name} received; stopped after step {step} with checkpoint {path}; "
              f"resume with --resume auto (exit code {REQUEUE_EXIT})", file=sys.stderr, flush=True)


class StopSignals:
    """While active, the named signals only set ``received`` (the loop stops after its step);
    the previous handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self, names: list[str]):
        self.signals = [getattr(signal, n) for n in names]
        self.received: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_finite(step: int, rollouts, **tensors) -> None:
    """Raise, naming the tensor and the first bad row (its prompt), when a per-row tensor
    holds NaN or inf; ``None`` tensors are skipped."""
    for name, t in tensors.items():
        if t is None:
            continue
        bad = ~torch.isfinite(t)
        if bad.any():
            row = int(bad.reshape(t.shape[0], -1).any(-1).nonzero()[0, 0])
            r = rollouts[row]
            raise ValueError(f"step {step}: non-finite {name} in row {row} (prompt row {r.prompt_index}, group "
                             f"{r.group_id}); caught before the learner")
