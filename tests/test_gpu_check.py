"""``make gpu-check`` in its dry mode: every section of bench/gpu_check.py runs on CPU through its
twin (Triton under the interpreter, a world-of-one learner over gloo, the HF engine on CPU, the
shared-memory transport in place of CUDA IPC) and the report says what it could not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # ~45 s on 2 cores


def test_dry_gpu_check_runs_every_section_on_cpu(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["dry"] and r["device"] == "cpu"
    s = r["sections"]
    assert set(s) == {"triton", "fused_bf16", "model", "learner", "hf_engine", "ipc"}
    assert all(sec["ok"] for sec in s.values()), {k: v.get("error") for k, v in s.items()}
    # The Triton kernels ran under the interpreter and agree with the torch path.
    assert s["triton"]["interpreter"] is True
    fp32 = s["triton"]["shapes"][0]["fp32"]["max_abs_diff"]
    assert max(fp32.values()) < 1e-4, fp32
    assert s["fused_bf16"]["max_abs_diff"]["logp"] < 0.05
    # One real update applied by DeepSpeed on CPU; the engine's log-probs are the learner's.
    run = s["learner"]["runs"]["cpu"]
    assert run["device"] == "cpu" and run["dtype"] == "float32" and run["update_norm"] > 0 and run["skipped"] == 0
    assert s["hf_engine"]["float32"]["logp_gap_max"] < 1e-4 and s["hf_engine"]["float32"]["tokens"] > 0
    # The shared-memory twin of IPC moved every weight, verified by checksums.
    assert s["ipc"]["transport"] == "shm" and s["ipc"]["checksums_match"] and s["ipc"]["bytes"] > 0
    assert {"nccl_two_gpus", "vllm_cuda"} <= set(r["not_run"])
