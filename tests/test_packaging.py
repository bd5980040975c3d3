"""The folders algorithms/ and rewards/ install as rlkit.algorithms and rlkit.rewards, never as
generic top-level modules: in the editable install and in a built wheel in a clean venv."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import importlib.util, json, rlkit, rlkit.algorithms, rlkit.rewards; "
         "print(json.dumps({m: importlib.util.find_spec(m).origin for m in "
         "('rlkit', 'rlkit.algorithms', 'rlkit.rewards')} | "
         "{'top_level_algorithms': importlib.util.find_spec('algorithms') is not None, "
         "'top_level_rewards': importlib.util.find_spec('rewards') is not None}))")


def _probe(python: str, cwd: Path) -> dict:
    import json

    out = subprocess.run([python, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editable_install_maps_the_folders(tmp_path):
    found = _probe(sys.executable, tmp_path)  # outside the checkout: only the install can resolve it
    assert Path(found["rlkit.algorithms"]) == ROOT / "algorithms" / "__init__.py"
    assert Path(found["rlkit.rewards"]) == ROOT / "rewards" / "__init__.py"
    assert not found["top_level_algorithms"] and not found["top_level_rewards"]


@pytest.mark.slow
def test_built_wheel_in_a_clean_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("rlkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlkit/algorithms/grpo.py" in names and "rlkit/rewards/math_answer.py" in names
    assert not any(n.startswith(("algorithms/", "rewards/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    # The clean venv gets the wheel only; torch and friends come from this environment's
    # site-packages, appended after the venv's own (so rlkit must resolve from the wheel).
    import sysconfig

    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    found = _probe(py, tmp_path)
    for mod in ("rlkit", "rlkit.algorithms", "rlkit.rewards"):
        assert Path(found[mod]).is_relative_to(site), (mod, found[mod])
    assert not found["top_level_algorithms"] and not found["top_level_rewards"]
