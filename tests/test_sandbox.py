"""The sandboxed executor and the code_tests reward, attacked for real (docs/tools.md).

Every case runs a real process under the real limits; nothing is simulated. Cases that need the
namespaces (no network, a PID namespace) skip where the machine allows only rlimits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rlkit.rewards import RewardConfig
from rlkit.rewards.code_tests import code_tests, extract_code, run_tests
from rlkit.tools.sandbox import Limits, QueueFull, SandboxPool, isolation_mode, run_python
from rlkit.workers.reward import RewardWorker

LIMITS = Limits(wall_s=3, cpu_s=2, memory_mb=256, processes=16)
ISOLATED = isolation_mode()[0] != "rlimits-only"
needs_namespaces = pytest.mark.skipif(not ISOLATED, reason="this machine allows no namespaces (rlimits-only)")


def test_a_plain_program_runs_in_a_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("RLKIT_TEST_SECRET", "hunter2")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(open('data.txt').read())",
                   files={"data.txt": "given"}, limits=LIMITS)
    assert r.status == "ok", r
    assert "RLKIT_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout and "given" in r.stdout
    assert run_python("import sys; sys.exit(4)", limits=LIMITS).returncode == 4


@pytest.mark.parametrize("name,code,status", [
    ("infinite loop", "while True:\n    pass", "timeout"),
    ("sleeping forever", "import time\ntime.sleep(600)", "timeout"),
    ("huge allocation", "x = bytearray(8 << 30)", "memory"),
    ("print loop", "while True:\n    print('x' * 4096)", "output_limit"),
    # With namespaces the parent is out of reach (not permitted); with rlimits only, the parent is
    # the sandbox's own first process, and killing it ends just this run.
    ("killing the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "error" if ISOLATED else None),
    ("killing everything it can", "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')", None),
])
def test_each_attack_is_contained_with_a_named_status(name, code, status):
    t0 = time.perf_counter()
    r = run_python(code, limits=LIMITS)
    assert time.perf_counter() - t0 < LIMITS.wall_s + 15, name
    if status is not None:
        assert r.status == status, (name, r)
    assert os.getpid() and Path("/proc/self").exists()  # this test process is still here


@needs_namespaces
def test_a_fork_bomb_ends_with_the_run_and_leaves_no_process():
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", limits=LIMITS)
    assert r.status == "timeout", r
    time.sleep(0.5)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) == 65534]
    assert not left, f"{len(left)} processes of the sandbox user survived"


def _uid(proc: Path) -> int:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


@needs_namespaces
def test_no_network_no_writes_outside_and_no_view_of_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKIT_TEST_SECRET", "hunter2")
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", limits=LIMITS)
    assert r.status == "error" and "unreachable" in r.stderr.lower(), r
    target = tmp_path / "written_by_sandbox"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", limits=LIMITS)
    assert not target.exists(), r
    host_tmp = Path("/tmp/rlkit_sandbox_escape_probe")
    r = run_python(f"open({str(host_tmp)!r}, 'w').write('x')\nprint('wrote')", limits=LIMITS)
    assert r.status == "ok" and not host_tmp.exists(), "a write to /tmp reached the host's /tmp"
    r = run_python("import os\nprint(os.listdir('/proc'))\nprint(open('/proc/1/environ').read())", limits=LIMITS)
    assert "hunter2" not in r.stdout and str(os.getpid()) not in r.stdout.split("\n")[0], r


def test_the_pool_bounds_its_queue_and_its_start_rate():
    pool = SandboxPool(2, max_queue=3, rate_per_s=5.0, limits=LIMITS)
    try:
        t0 = time.perf_counter()
        results = pool.map([f"print({i})" for i in range(3)])
        assert [r.stdout.strip() for r in results] == ["0", "1", "2"]
        assert time.perf_counter() - t0 >= 0.35  # three starts at 5/s: at least two gaps of 0.2 s
        slow = [pool.submit("import time\ntime.sleep(1.5)") for _ in range(2)]
        time.sleep(0.6)  # both picked up by the two workers
        slow += [pool.submit("pass") for _ in range(3)]  # the queue's three places
        with pytest.raises(QueueFull, match="queue full"):
            pool.submit("pass")
        assert all(f.result().status == "ok" for f in slow)
        assert pool.counts["ok"] >= 8
    finally:
        pool.close()


# ----------------------------------------------------------------------------- code_tests

SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
ADVERSARIAL = [
    # (case, completion, score, statuses)
    ("correct", SOLUTION, 1.0, ["passed", "passed"]),
    ("wrong", "def add(a, b):\n    return a - b", 0.0, ["failed", "failed"]),
    ("half right", "def add(a, b):\n    return 3 if a == 1 else a - b", 0.5, ["passed", "failed"]),
    ("infinite loop", "def add(a, b):\n    while True:\n        pass", 0.0, ["timeout", "timeout"]),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", 0.0,
     ["timeout", "timeout"]),
    ("huge allocation", "x = bytearray(8 << 30)\ndef add(a, b):\n    return a + b", 0.0, ["memory", "memory"]),
    ("fake success print", "print('all tests passed')\nimport sys\nsys.exit(0)", 0.0, ["no_marker", "no_marker"]),
    ("early os._exit", "import os\nos._exit(0)", 0.0, ["no_marker", "no_marker"]),
    ("reads secrets", "import os\nassert 'RLKIT_TEST_SECRET' in os.environ\ndef add(a, b):\n    return a + b", 0.0,
     ["failed", "failed"]),
    ("writes outside", "open('/work/rlkit_code_tests_probe', 'w').write('x')\ndef add(a, b):\n    return a + b", 0.0,
     ["failed", "failed"]),
    ("kills its parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return a + b",
     0.0, ["failed", "failed"]),
    ("network", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\ndef add(a, b):\n    return a + b",
     0.0, ["failed", "failed"]),
]


@needs_namespaces
@pytest.mark.parametrize("case,completion,score,statuses", ADVERSARIAL, ids=[c[0] for c in ADVERSARIAL])
def test_code_tests_adversarial_case(case, completion, score, statuses, monitorable_env):
    assert run_tests(extract_code(completion), TESTS, timeout_s=2.0, memory_mb=256) == statuses
    assert code_tests([completion], tests=[TESTS], timeout_s=2.0)[0] == score
    assert not Path("/work/rlkit_code_tests_probe").exists()


@pytest.fixture
def monitorable_env(monkeypatch):
    monkeypatch.setenv("RLKIT_TEST_SECRET", "hunter2")


@needs_namespaces
def test_code_tests_through_the_reward_worker_costs_no_sample_its_score(monkeypatch):
    """One batch holding every attack: each sample gets its own score and the honest ones keep 1.0."""
    monkeypatch.setenv("RLKIT_TEST_SECRET", "hunter2")
    cases = ADVERSARIAL[:8]
    w = RewardWorker(RewardConfig(rewards=[{"name": "code_tests", "kwargs": {"timeout_s": 2.0, "mode": "all"}}],
                                  timeout_s=300, num_procs=2, batch_size=4))
    try:
        res = w.score([c[1] for c in cases], [""] * len(cases), fields=[{"tests": TESTS} for _ in cases],
                      data_sources=None)
    finally:
        w.close()
    assert res.status == ["ok"] * len(cases), res.errors
    assert res.scores == [1.0 if c[2] == 1.0 else 0.0 for c in cases]


def test_code_tests_rejects_a_row_without_tests():
    with pytest.raises(ValueError, match="field 'tests'"):
        code_tests(["x = 1"], tests=[[]])
