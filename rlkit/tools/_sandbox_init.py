"""The first process of a sandbox (its PID 1 when it has a PID namespace): set limits, drop
privileges, run the program in a child, report how the child ended as the exit status.

    python -I _sandbox_init.py WORKDIR LIMITS_JSON PROGRAM INTERPRETER

Runs with the standard library only. The program runs in a forked child, not here: a namespace's
PID 1 ignores signals it has no handler for (``os.kill(1, SIGKILL)`` from inside would be
ignored), and when this process exits the kernel kills everything left in the namespace, fork
bombs included. Exit status: the child's exit code, or 128 + signal number when a signal ended it.
"""

import json
import os
import resource
import sys

NOBODY = 65534


def _limit(which: int, value: int, hard: int = 0) -> None:
    try:
        resource.setrlimit(which, (value, max(value, hard)))
    except (ValueError, OSError):
        pass  # a hard limit already lower than ours stays


def _private_tmp(workdir: str) -> None:
    """In a mount namespace of our own, as root: fresh, private tmpfs over the world-writable
    directories, so what the program writes there is gone with it; the working directory is bound
    back at its own path."""
    import subprocess

    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=False, capture_output=True)

    mount("--make-rprivate", "/")
    keep = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            mount("-t", "tmpfs", "-o", "size=64m,mode=1777,nosuid,nodev", "tmpfs", d)
    if not os.path.isdir(workdir):
        os.makedirs(workdir)
        mount("--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{keep}", workdir)  # not the path: it is hidden
    os.close(keep)


def _child(workdir: str, limits: dict, program: str, interpreter: str) -> None:
    if limits.get("private_tmp") and os.getuid() == 0:
        _private_tmp(workdir)
    os.chdir(workdir)
    _limit(resource.RLIMIT_CORE, 0)
    cpu = max(1, int(limits["cpu_s"] + 0.999))
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    _limit(resource.RLIMIT_AS, limits["memory_mb"] << 20)
    _limit(resource.RLIMIT_FSIZE, limits["file_mb"] << 20)
    _limit(resource.RLIMIT_NOFILE, limits["open_files"])
    if os.getuid() == 0 and limits.get("drop_to_nobody", True):
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError:
            pass  # a user namespace that maps only one uid: stay its root, which is the caller
    # After setuid: RLIMIT_NPROC counts the processes of the (unprivileged) user.
    _limit(resource.RLIMIT_NPROC, limits["processes"])
    os.execv(interpreter, [interpreter, "-I", "-B", program])


def main() -> int:
    workdir, limits, program, interpreter = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    pid = os.fork()
    if pid == 0:
        try:
            _child(workdir, limits, program, interpreter)
        except BaseException as e:  # noqa: BLE001 - the program could not be started
            os.write(2, f"sandbox: could not start the program: {e!r}\n".encode())
        os._exit(127)
    while True:
        try:
            waited, status = os.waitpid(-1, 0)  # reap orphans too: this may be the namespace's init
        except ChildProcessError:
            return 127
        if waited == pid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
