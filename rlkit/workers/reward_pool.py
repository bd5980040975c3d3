"""A pool of reusable child processes that run reward functions under hard limits.

Limits are enforced from outside the reward code, never with ``signal.alarm`` or threads (which
fail inside Ray worker threads, verl PR#5635):

* time: the parent waits at most ``timeout_s`` for a call's answer, then SIGKILLs the child's
  process group and starts a new child;
* memory: each child sets ``RLIMIT_AS`` to its size after imports + ``memory_mb``, so an unbounded
  allocation raises ``MemoryError`` in the child (and the child is replaced);
* crashes (``os.abort()``, segfaults, the OOM killer) are seen on the child's sentinel.

Children come from a ``forkserver`` that has math-verify and sympy preloaded, so a replacement
starts in tens of milliseconds. Each call carries many samples; when a call times out, crashes or
raises, its samples are retried one at a time so the status lands on the sample that caused it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
import types
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

from rlkit.rewards.registry import RewardOutputError, RewardSignatureError, call_reward, check_output, resolve

_PRELOAD = ["rlkit.rewards.registry", "rlkit.rewards._preload"]
_START_TIMEOUT_S = 120.0


@dataclass
class Task:
    """One call into a child: reward component ``comp`` on the samples ``idx``."""

    comp: int
    idx: list[int]
    completions: list[str]
    prompts: list[str]
    fields: dict[str, list]


@dataclass
class Outcome:
    """Per-sample (status, value, message) for a finished task."""

    task: Task
    results: list[tuple[str, Optional[float], str]]


# ----------------------------------------------------------------------------- child side


def _address_space_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child_main(conn: Connection, specs: list[tuple[str, dict]], memory_mb: int) -> None:
    """Child loop: load the rewards, set the memory limit, then answer tasks until told to stop."""
    try:
        os.setsid()  # own process group: a kill also reaches anything the reward code started
    except OSError:
        pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        rewards = [resolve(target, kwargs) for target, kwargs in specs]
        for r in rewards:
            warm = getattr(r.fn, "warmup", None)
            if callable(warm):
                warm()
        import resource

        limit = _address_space_bytes() + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except BaseException as e:  # report start-up failures (bad import, bad signature) to the parent
        conn.send(("startup_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        conn.send(_run_task(msg, rewards, specs))


def _run_task(task: Task, rewards: list, specs: list[tuple[str, dict]]) -> tuple:
    reward = rewards[task.comp]
    n = len(task.completions)
    try:
        out = call_reward(reward, task.completions, task.prompts, task.fields, specs[task.comp][1])
        return ("done", check_output(out, n, reward.label))
    except RewardOutputError as e:
        return ("invalid", str(e))
    except RewardSignatureError as e:  # e.g. a required field missing from the data: already names the reward
        return ("error", str(e))
    except MemoryError:
        return ("memory", f"reward {reward.label} raised MemoryError (memory limit)")
    except BaseException as e:  # noqa: BLE001  every failure of user code becomes a counted status
        return ("error", _describe(e, reward.label))


def _describe(e: BaseException, label: str) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    text = str(e)
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"reward {label} raised {type(e).__name__}: {text}{where}"


# ----------------------------------------------------------------------------- parent side


@dataclass
class _Child:
    proc: Any
    conn: Connection
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    task: Optional[Task] = None
    deadline: float = 0.0


class RewardPool:
    """``num_procs`` persistent children; :meth:`run` executes tasks with per-call deadlines."""

    def __init__(self, specs: list[tuple[str, dict]], labels: list[str], num_procs: int, memory_mb: int):
        self.specs = specs
        self.labels = labels
        self.memory_mb = memory_mb
        self._ctx = mp.get_context("forkserver")
        try:
            self._ctx.set_forkserver_preload(_PRELOAD)
        except Exception:  # the forkserver of this process may already run: preload is only a speed-up
            pass
        self.respawns = 0
        self.retried = 0
        """Samples re-run one at a time after their batch failed (cost signal: batch too slow for timeout_s?)."""
        self._children = [self._start() for _ in range(num_procs)]
        for ch in self._children:
            self._await_ready(ch)

    # -- child lifecycle

    def _start(self) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_child_main, args=(child_conn, self.specs, self.memory_mb), name="rlkit-reward", daemon=True
        )
        _start_without_main(proc)
        child_conn.close()
        return _Child(proc, parent_conn)

    def _await_ready(self, ch: _Child) -> None:
        if not ch.conn.poll(_START_TIMEOUT_S):
            self._kill(ch)
            raise RuntimeError(f"reward child did not start within {_START_TIMEOUT_S:.0f} s")
        self._on_ready_msg(ch)

    def _on_ready_msg(self, ch: _Child) -> None:
        try:
            kind, payload = ch.conn.recv()
        except EOFError:
            code = ch.proc.exitcode
            self._kill(ch)
            raise RuntimeError(f"reward child died while starting (exit code {code})") from None
        if kind != "ready":
            self._kill(ch)
            raise RuntimeError(f"reward child failed to start: {payload}")
        ch.ready = True

    def _kill(self, ch: _Child) -> None:
        try:
            os.killpg(ch.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            if ch.proc.is_alive():
                ch.proc.kill()
        ch.proc.join(timeout=10)
        ch.conn.close()

    def _replace(self, i: int) -> None:
        self._kill(self._children[i])
        self._children[i] = self._start()
        self.respawns += 1

    # -- running tasks

    def run(self, tasks: list[Task], timeout_s: float, max_consecutive_timeouts: int) -> list[Outcome]:
        """Run every task; failed multi-sample tasks are split and retried one sample at a time."""
        for i, ch in enumerate(self._children):
            if ch.task is not None:  # left over from a call interrupted by an exception: its answer is stale
                ch.task = None
                self._replace(i)
        pending: deque[Task] = deque(tasks)
        done: list[Outcome] = []
        self._streak = [0] * len(self.specs)  # consecutive single-sample timeouts per component
        self._gave_up: set[int] = set()
        while pending or any(ch.task is not None for ch in self._children):
            self._dispatch(pending, timeout_s)
            self._wait_any()
            for i, ch in enumerate(self._children):
                outcome = self._collect(i, ch)
                if outcome is not None:
                    self._settle(*outcome, pending, done, max_consecutive_timeouts)
        return done

    def _dispatch(self, pending: deque, timeout_s: float) -> None:
        for ch in self._children:
            if ch.ready and ch.task is None and pending:
                task = pending.popleft()
                ch.conn.send(task)
                ch.task, ch.deadline = task, time.monotonic() + timeout_s

    def _wait_any(self) -> None:
        busy = [ch for ch in self._children if ch.task is not None or not ch.ready]
        if not busy:
            return
        now = time.monotonic()
        deadlines = [ch.deadline for ch in busy if ch.task is not None]
        deadlines += [ch.started + _START_TIMEOUT_S for ch in busy if not ch.ready]
        handles = [ch.conn for ch in busy] + [ch.proc.sentinel for ch in busy]
        wait(handles, timeout=max(0.0, min(deadlines) - now))

    def _collect(self, i: int, ch: _Child) -> Optional[tuple[Task, str, Any]]:
        """A finished task of child ``i`` as (task, kind, payload), replacing the child if it failed."""
        if not ch.ready:
            if ch.conn.poll():
                self._on_ready_msg(ch)  # raises if the child reported a start-up error
            elif not ch.proc.is_alive() or time.monotonic() > ch.started + _START_TIMEOUT_S:
                self._kill(ch)
                raise RuntimeError(f"reward child failed to start (exit code {ch.proc.exitcode})")
            return None
        if ch.task is None:
            return None
        task = ch.task
        if ch.conn.poll():
            try:
                kind, payload = ch.conn.recv()
            except (EOFError, OSError):
                kind, payload = "crash", self._death_message(ch, task)
        elif not ch.proc.is_alive():
            kind, payload = "crash", self._death_message(ch, task)
        elif time.monotonic() >= ch.deadline:
            kind, payload = "timeout", f"reward {self.labels[task.comp]} exceeded its time limit (child killed)"
        else:
            return None
        ch.task = None
        if kind in ("crash", "timeout", "memory"):
            self._replace(i)
        return task, kind, payload

    def _death_message(self, ch: _Child, task: Task) -> str:
        ch.proc.join(timeout=5)
        code = ch.proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"reward {self.labels[task.comp]} crashed its process ({how})"

    def _settle(self, task: Task, kind: str, payload: Any, pending: deque, done: list, max_streak: int) -> None:
        n = len(task.idx)
        if kind == "done":
            if n == 1:
                self._streak[task.comp] = 0
            done.append(Outcome(task, payload))
            return
        if task.comp in self._gave_up and kind == "timeout":
            done.append(Outcome(task, [("timeout", None, self._gave_up_msg(task.comp, max_streak))] * n))
            return
        if n > 1:  # pin the failure on the sample(s) that caused it
            self.retried += n
            for j in range(n - 1, -1, -1):
                pending.appendleft(_single(task, j))
            return
        status = {"timeout": "timeout", "invalid": "invalid"}.get(kind, "error")
        done.append(Outcome(task, [(status, None, payload)]))
        if status != "timeout":
            return
        self._streak[task.comp] += 1
        if self._streak[task.comp] >= max_streak:
            self._give_up(task.comp, pending, done, max_streak)

    def _gave_up_msg(self, comp: int, max_streak: int) -> str:
        return f"reward {self.labels[comp]} not run: {max_streak} timeouts in a row in this call"

    def _give_up(self, comp: int, pending: deque, done: list, max_streak: int) -> None:
        """Mark a component's remaining samples in this call as timeouts without running them."""
        self._gave_up.add(comp)
        msg = self._gave_up_msg(comp, max_streak)
        keep = deque()
        for t in pending:
            if t.comp == comp:
                done.append(Outcome(t, [("timeout", None, msg)] * len(t.idx)))
            else:
                keep.append(t)
        pending.clear()
        pending.extend(keep)

    def close(self) -> None:
        for ch in self._children:
            try:
                if ch.ready and ch.task is None:
                    ch.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for ch in self._children:
            ch.proc.join(timeout=2)
            if ch.proc.is_alive():
                self._kill(ch)
            else:
                ch.conn.close()
        self._children = []


def _start_without_main(proc: Any) -> None:
    """Start a forkserver child without re-running the launching script's ``__main__``.

    Spawn-style children re-import ``__main__`` (by path or module name). Reward children never
    need it, and re-running it would import e.g. torch in every child, or start a second run in a
    script without an ``if __name__ == "__main__"`` guard. ``get_preparation_data`` only records a
    main module that has ``__spec__`` or ``__file__``, so a bare stand-in is swapped in for the
    duration of ``start()`` (single-threaded here: the worker's methods run one at a time).
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        sys.modules["__main__"] = main


def _single(task: Task, j: int) -> Task:
    return Task(
        comp=task.comp,
        idx=[task.idx[j]],
        completions=[task.completions[j]],
        prompts=[task.prompts[j]],
        fields={k: [v[j]] for k, v in task.fields.items()},
    )
