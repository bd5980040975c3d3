"""Code reward: run a completion's code against the row's unit tests in the sandbox.

Each test is its own sandboxed process (:func:`rlkit.tools.sandbox.run_python`): the completion's
code, then the test (typically ``assert`` lines), then a line that prints a per-run marker. A test
passes when its process exits 0 *and* printed the marker, so code that exits early
(``sys.exit(0)``, ``os._exit(0)`` before the tests) or prints "all tests passed" does not pass
it. The verdict is never read from what the program says about itself. Limits per test:
``timeout_s`` of wall time (CPU time as well), ``memory_mb``; see docs/tools.md for what the
sandbox does and does not protect against.

``mode="fraction"`` scores the fraction of tests passed, ``"all"`` 1.0 only when every one does.
Dataset field ``tests``: a list of test snippets (or one string, one test). The code is the last
fenced block of the completion (```python … ```), else the whole completion.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal, Optional, Sequence

_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block, else the whole completion.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    """
    blocks = _FENCE_RE.findall(completion)
    return blocks[-1] if blocks else completion


def _as_tests(tests: Any) -> list[str]:
    if isinstance(tests, str):
        return [tests]
    if isinstance(tests, (list, tuple)) and tests and all(isinstance(t, str) for t in tests):
        return list(tests)
    raise ValueError(f"code_tests: field 'tests' must be a non-empty list of strings (or one string), got {tests!r}")


def run_tests(code: str, tests: Sequence[str], *, timeout_s: float = 5.0, memory_mb: int = 256,
              setup: str = "") -> list[str]:
    """The status of each test: ``passed``, ``failed`` (the program ran and exited non-zero, e.g. an
    assertion), ``no_marker`` (exited 0 without reaching the end of the test), or the sandbox's
    ``timeout``, ``memory``, ``output_limit``, ``killed``, ``sandbox_error``.

    >>> run_tests("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
    ['passed', 'failed']
    """
    from rlkit.tools.sandbox import Limits, run_python

    limits = Limits(wall_s=timeout_s, cpu_s=timeout_s, memory_mb=memory_mb)
    out = []
    for test in tests:
        marker = "rlkit-test-reached-end-" + secrets.token_hex(16)
        program = f"{setup}\n{code}\n\n# --- test ---\n{test}\nprint({marker!r})\n"
        res = run_python(program, limits=limits)
        if res.status == "ok":
            out.append("passed" if res.stdout.rstrip().endswith(marker) else "no_marker")
        elif res.status == "error":
            out.append("failed")
        else:
            out.append(res.status)
    return out


def code_tests(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    tests: Sequence[Any],
    mode: Literal["fraction", "all"] = "fraction",
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    setup: str = "",
    **unused_fields: Any,
) -> list[float]:
    """Fraction of the row's ``tests`` the completion's code passes (``mode="all"``: 1.0 or 0.0).

    Runs ``len(tests)`` sandboxed processes per completion, one after another: give the reward
    worker a ``rewards.timeout_s`` above ``batch_size × tests × timeout_s`` or a smaller batch.

    >>> code_tests(["```python\\ndef sq(x):\\n    return x * x\\n```"], tests=[["assert sq(3) == 9", "assert sq(2) == 5"]])
    [0.5]
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"code_tests: mode must be 'fraction' or 'all', got {mode!r}")
    if len(tests) != len(completions):
        raise ValueError(f"code_tests: {len(completions)} completions but {len(tests)} test lists")
    out = []
    for completion, row_tests in zip(completions, tests):
        statuses = run_tests(extract_code(completion), _as_tests(row_tests), timeout_s=timeout_s,
                             memory_mb=memory_mb, setup=setup)
        passed = sum(s == "passed" for s in statuses) / len(statuses)
        out.append(passed if mode == "fraction" else float(passed == 1.0))
    return out
