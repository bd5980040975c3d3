"""Run untrusted Python (a model's code, a tool's arguments) in a separate, limited process.

Each run gets a fresh process in a fresh temporary working directory, never a reused interpreter
(a reused one would carry one sample's state into the next). What limits it (docs/tools.md says
plainly what this does and does not protect against):

* **time**: wall-clock (``wall_s``, the whole process tree is killed) and CPU (``cpu_s``, RLIMIT_CPU);
* **memory**: RLIMIT_AS of ``memory_mb``;
* **processes**: RLIMIT_NPROC of ``processes`` once the program runs as an unprivileged user, and,
  with a PID namespace, everything it started dies with it (fork bombs included);
* **files**: RLIMIT_FSIZE of ``file_mb`` (stdout and stderr are files too, so a print loop ends
  there), RLIMIT_NOFILE of ``open_files``, and only ``output_kb`` of each stream is read back;
* **environment**: scrubbed: ``PATH``, ``HOME``/``TMPDIR`` (the working directory), ``LANG`` and
  nothing else, so no API key or token of the parent reaches the program;
* **network**: none, when the machine allows a network namespace (``isolation`` says which
  mode ran: ``namespaces+nobody`` as root, ``user-namespace`` for an unprivileged user whose kernel
  allows user namespaces, ``rlimits-only`` otherwise, where the network is **not** blocked).

:func:`run_python` returns a :class:`SandboxResult` with a status: ``ok`` (exit 0), ``error``
(non-zero exit), ``timeout`` (wall or CPU time), ``memory`` (MemoryError or the memory limit),
``output_limit`` (the file-size limit), ``killed`` (another signal), ``sandbox_error`` (it could
not be started). :class:`SandboxPool` runs many at once with a queue bound and a rate limit.
Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed", "sandbox_error")
_INIT = str(Path(__file__).with_name("_sandbox_init.py"))
NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    """Per-run limits (see the module docstring)."""

    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    processes: int = 32
    file_mb: int = 16
    open_files: int = 64
    output_kb: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {value!r}")


@dataclass
class SandboxResult:
    status: str
    returncode: Optional[int]
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    isolation: str = ""
    files: dict = field(default_factory=dict)
    """Files the program left in its working directory that were asked for (``collect``)."""


def _candidates() -> list[str]:
    seen, out = set(), []
    for c in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if c and os.path.isfile(c) and os.path.realpath(c) not in seen:
            seen.add(os.path.realpath(c))
            out.append(c)
    return out


@lru_cache(maxsize=1)
def isolation_mode() -> tuple[str, tuple[str, ...], str]:
    """The strongest isolation this machine allows: (mode, command prefix, interpreter the program
    runs with). As root the program runs as ``nobody``, so the interpreter must be one that user can
    execute (a virtual environment under a private home is not; the system ``python3`` is)."""
    unshare = shutil.which("unshare")
    modes = []
    if unshare and os.geteuid() == 0:
        modes.append(("namespaces+nobody", (unshare, "--fork", "--pid", "--net", "--mount", "--mount-proc",
                                            "--kill-child")))
    if unshare and os.geteuid() != 0:
        modes.append(("user-namespace", (unshare, "--user", "--map-root-user", "--fork", "--pid", "--net",
                                         "--mount", "--mount-proc", "--kill-child")))
    modes.append(("rlimits-only", ()))
    for mode, prefix in modes:
        for python in _candidates():
            if _probe(prefix, python):
                return mode, prefix, python
    return "rlimits-only", (), sys.executable  # as root with no interpreter nobody can run: stays root


@lru_cache(maxsize=16)
def _probe(prefix: tuple[str, ...], python: str) -> bool:
    """Whether a run with this prefix and interpreter works (as ``nobody`` when we are root)."""
    work = Path(tempfile.mkdtemp(prefix="rlkit-sbx-probe-"))
    try:
        (work / "main.py").write_text("print('ok')\n")
        if os.geteuid() == 0:
            for p in (work, work / "main.py"):
                os.chown(p, NOBODY, NOBODY)
        cmd = [*prefix, sys.executable, "-I", "-B", _INIT, str(work), json.dumps(asdict(Limits())), "main.py", python]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, cwd=str(work))
        return out.returncode == 0 and out.stdout.strip() == "ok"
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _status(returncode: Optional[int], stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode is None or (returncode == 127 and "sandbox: could not start the program" in stderr):
        return "sandbox_error"
    signum = returncode - 128 if returncode > 128 else (-returncode if returncode < 0 else 0)
    if signum == signal.SIGXCPU:  # the CPU limit's soft signal (its hard SIGKILL comes a second later)
        return "timeout"
    if signum == signal.SIGXFSZ or "File too large" in stderr:  # Python ignores SIGXFSZ: writes fail with EFBIG
        return "output_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    if signum:
        return "killed"
    return "error"


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def run_python(code: str, *, files: Optional[dict[str, str]] = None, stdin: str = "",
               limits: Limits = Limits(), collect: tuple[str, ...] = ()) -> SandboxResult:
    """Run ``code`` as ``main.py`` with ``files`` beside it, under ``limits``; see the module docstring.

    >>> run_python("print(6 * 7)").stdout.strip(), run_python("raise SystemExit(3)").status
    ('42', 'error')
    """
    mode, prefix, python = isolation_mode()
    work = Path(tempfile.mkdtemp(prefix="rlkit-sbx-"))
    host = Path(tempfile.mkdtemp(prefix="rlkit-sbx-io-"))  # our side: the program cannot write here
    t0 = time.perf_counter()
    try:
        for name, text in {**(files or {}), "main.py": code}.items():
            target = (work / name).resolve()
            if work.resolve() not in target.parents:
                raise ValueError(f"sandbox file {name!r} is outside the working directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        if mode == "namespaces+nobody":
            for p in [work, *work.rglob("*")]:
                os.chown(p, NOBODY, NOBODY)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        spec = {**asdict(limits), "private_tmp": mode == "namespaces+nobody",
                "drop_to_nobody": _probe(prefix, python)}  # False only in the last-resort fallback
        cmd = [*prefix, sys.executable, "-I", "-B", _INIT, str(work), json.dumps(spec), "main.py", python]
        (host / "stdin").write_text(stdin, encoding="utf-8")
        with open(host / "stdin", "rb") as fin, open(host / "out", "wb") as fout, open(host / "err", "wb") as ferr:
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, env=env, cwd=str(work),
                                        start_new_session=True)
            except OSError as e:
                return SandboxResult("sandbox_error", None, "", str(e), time.perf_counter() - t0, mode)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_tree(proc)
        cap = limits.output_kb << 10
        stdout, stderr = _read(host / "out", cap), _read(host / "err", cap)
        got = {name: _read(work / name, cap) for name in collect if (work / name).is_file()}
        status = _status(proc.returncode, stderr, timed_out)
        return SandboxResult(status, proc.returncode, stdout, stderr, time.perf_counter() - t0, mode, got)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(host, ignore_errors=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (with a PID namespace, its init's death ends the rest)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class QueueFull(RuntimeError):
    """More runs were submitted than the pool's queue holds."""


class SandboxPool:
    """Runs sandboxed programs ``num_workers`` at a time, at most ``rate_per_s`` starts per second,
    with at most ``max_queue`` waiting; :meth:`submit` returns a future of a :class:`SandboxResult`.

    The workers are threads that each wait on one sandbox process; the isolation is the process's.
    To spread runs over nodes, place one pool per node in a Ray actor (:func:`make_sandbox_actor`).
    """

    def __init__(self, num_workers: int = 2, *, max_queue: int = 256, rate_per_s: float = 0.0,
                 limits: Limits = Limits()):
        if num_workers < 1 or max_queue < 1 or rate_per_s < 0:
            raise ValueError("SandboxPool: num_workers and max_queue must be >= 1, rate_per_s >= 0")
        self.limits, self.max_queue, self.rate_per_s = limits, max_queue, rate_per_s
        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="sandbox")
        self._lock = threading.Lock()
        self._waiting = 0
        self._next_start = 0.0
        self.counts: dict[str, int] = {s: 0 for s in STATUSES}

    def submit(self, code: str, **kwargs) -> Future:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"sandbox queue full ({self.max_queue} runs waiting); raise max_queue or num_workers")
            self._waiting += 1
        return self._executor.submit(self._run, code, kwargs)

    def _run(self, code: str, kwargs: dict) -> SandboxResult:
        with self._lock:
            self._waiting -= 1
            if self.rate_per_s:
                now = time.monotonic()
                start = max(now, self._next_start)
                self._next_start = start + 1.0 / self.rate_per_s
            else:
                start = 0.0
        if start:
            time.sleep(max(0.0, start - time.monotonic()))
        result = run_python(code, limits=kwargs.pop("limits", self.limits), **kwargs)
        with self._lock:
            self.counts[result.status] += 1
        return result

    def map(self, codes: list[str], **kwargs) -> list[SandboxResult]:
        return [f.result() for f in [self.submit(c, **kwargs) for c in codes]]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def make_sandbox_actor(num_workers: int = 2, **pool_kwargs):
    """A Ray actor holding a :class:`SandboxPool` (``.run.remote(code, **kw)`` → SandboxResult)."""
    import ray

    @ray.remote(num_cpus=0)
    class SandboxActor:
        def __init__(self) -> None:
            self.pool = SandboxPool(num_workers, **pool_kwargs)

        def run(self, code: str, **kwargs) -> SandboxResult:
            return self.pool.submit(code, **kwargs).result()

        def counts(self) -> dict[str, int]:
            return dict(self.pool.counts)

    return SandboxActor.remote()
