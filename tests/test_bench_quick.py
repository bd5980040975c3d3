"""The benchmark harness at tiny sizes: the --quick modes run end to end and write well-formed JSON,
and bench/report.py renders docs from it. No timing is asserted (the machine is shared and noisy);
the checks are on structure, on counts that must agree between the two sides of a comparison, and
on the arithmetic of the helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def _strict_json(path: Path) -> dict:
    """Parse refusing NaN/Infinity, which json.dumps writes but other readers reject."""
    def bad(token):
        raise ValueError(f"{path}: non-finite number {token}")

    return json.loads(path.read_text(), parse_constant=bad)


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], env=common.bench_env(2),
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _is_summary(s: dict, n_min: int = 1) -> bool:
    return s["n"] >= n_min and s["min"] <= s["median"] <= s["max"] and len(s["values"]) == s["n"]


# ---------------------------------------------------------------------------------------------- helpers


def test_summary_and_ratio_bounds():
    s = common.summary([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert common.summary([])["median"] is None
    # ratio of summaries: median/median, and conservative extremes num.min/den.max, num.max/den.min
    r = common.ratio_summary(common.summary([1.0, 2.0, 3.0]), common.summary([4.0, 8.0]))
    assert r["median"] == pytest.approx(2.0 / 6.0)
    assert (r["min"], r["max"]) == (pytest.approx(1.0 / 8.0), pytest.approx(3.0 / 4.0))
    assert common.fmt(common.summary([1.0, 2.0, 4.0]), ".1f") == "2.0 (1.0–4.0)"
    assert common.fmt(None) == "—"


def test_step_flops_counts():
    # P = 1e6: 2·P·(10 prefill + 5 generated) + 6·P·15 trained + 2·P·15 extra = 30e6 + 90e6 + 30e6
    assert common.step_flops(10**6, generated=5, prefill=10, trained=15, extra_forward=15) == pytest.approx(150e6)


def test_min_flops_counts():
    """The minimal bound by hand: body 2·P_body per position, LM head 2·D·V where a distribution is
    needed, attention 4·a·keys per layer; prompts once per group, the last token of a sequence never
    fed forward; learning 3× generation."""
    from e2e_bench import min_flops

    V, D, a, L = 40, 8, 4, 2
    shape = {"params": 10_000 + V * D, "hidden": D, "vocab": V, "layers": L, "attn": a, "tied": True}
    body, head = 2 * 10_000, 2 * D * V
    seqs = [("A", 3, 2), ("A", 3, 1), ("B", 2, 3)]
    prompt_a = body * 3 + 4 * a * L * (1 + 2 + 3) + head  # queries see 1, 2, 3 keys
    prompt_b = body * 2 + 4 * a * L * (1 + 2) + head
    seq_a1 = (body + head) + 4 * a * L * 4  # one fed token, at position 4
    seq_b = 2 * (body + head) + 4 * a * L * (3 + 4)
    want = prompt_a + prompt_b + seq_a1 + seq_b  # the 1-token completion feeds nothing
    got = min_flops(shape, seqs)
    assert got == {"generate": pytest.approx(want), "learn": pytest.approx(3 * want), "step": pytest.approx(4 * want)}
    untied = min_flops({**shape, "params": shape["params"] + V * D, "tied": False}, seqs)
    assert untied["step"] == pytest.approx(got["step"])  # the second V × D matrix is a lookup: no FLOPs


def test_matmul_probe_and_machine():
    m = common.matmul_gflops(n=128, repeats=3, threads=1)
    assert m["size"] == 128 and m["threads"] == 1 and _is_summary(m, 3) and m["min"] > 0
    desc = common.machine()
    assert desc["cores"] >= 1 and desc["torch"] and desc["date"][:2] == "20"


def test_param_count_matches_torch(tiny_llama_dir):
    from e2e_bench import param_count
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    # tied embeddings: parameters() yields the shared matrix once, as the file stores it once
    assert param_count(tiny_llama_dir) == sum(p.numel() for p in model.parameters())


def test_report_without_results_says_not_measured(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    _run("report.py", "--results", str(tmp_path / "none"), "--doc", str(doc), timeout=120)
    text = doc.read_text()
    for name in ("e2e", "kl", "sync", "engine", "scaling", "rewards", "levers"):
        assert f"bench/out/{name}.json" in text, name
    assert text.count("not measured") >= 7


# ---------------------------------------------------------------------------------------------- quick harness


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    """One run of each --quick harness into a shared results folder."""
    out = tmp_path_factory.mktemp("bench-out")
    _run("e2e_bench.py", "--quick", "--out", str(out))
    _run("sync_bench.py", "--quick", "--out", str(out))
    _run("scaling_bench.py", "--quick", "--multipliers", "1,2", "--out", str(out))
    return out


@pytest.mark.bench
def test_e2e_quick_json(quick_out):
    doc = _strict_json(quick_out / "e2e.json")
    assert doc["bench"] == "e2e" and doc["schema"] == common.SCHEMA and doc["args"]["quick"]
    sides = {r["side"]: r for r in doc["results"]}
    assert set(sides) == {"trl", "rlkit", "rlkit-overlap", "rlkit-bf16mm"}
    trl, rl = sides["trl"], sides["rlkit"]
    assert trl["ok"] and rl["ok"], (trl.get("error"), rl.get("error"))
    for r in (trl, rl):
        assert len(r["steps"]) == 2 and _is_summary(r["step_s"]) and r["params"] == trl["params"]
        for s in r["steps"]:
            # 4 prompts × 4 samples, at most 8 new tokens each
            assert 16 <= s["generated_tokens"] <= 16 * 8
            assert s["trained_tokens"] == s["prefill_tokens"] + s["generated_tokens"]
            # nominal FLOPs: TRL executes them all; rlkit skips repeated prompts and finished rows, so its
            # fraction may pass 1 (docs/benchmarks.md § 1)
            assert 0 < s["roofline_frac"] and (r is rl or s["roofline_frac"] < 1)
            m = s["min_flops"]
            assert m["learn"] == pytest.approx(3 * m["generate"]) and m["step"] == pytest.approx(4 * m["generate"])
            # the bound skips repeated prompts: under the nominal count, above the completions' body FLOPs
            assert 2 * (r["params"] - 128 * 49152) * (s["generated_tokens"] - 16) < m["step"] < s["flops"]
            assert all(0 < s["min_frac"][k] < 1 for k in ("generate", "learn", "step"))
        assert all(_is_summary(r["min_frac"][k]) for k in ("generate", "learn", "step"))
    assert doc["targets"] == {"step_ratio_max": 0.3, "min_frac_min": {"generate": 0.6, "learn": 0.7, "step": 0.6}}
    # the same prompts on both sides: same chat-templated prompt lengths over the run
    assert trl["prompt_tokens_mean"] == pytest.approx(rl["prompt_tokens_mean"])
    assert "rlkit/trl" in doc["ratios"] and doc["ratios"]["rlkit/trl"]["step_s"]["median"] > 0
    ov = sides["rlkit-overlap"]
    assert ov["ok"] and isinstance(ov["overlap_effective"], bool)
    bf = sides["rlkit-bf16mm"]  # bf16 rollout matmuls: a sampler/learner gap, and a small one
    assert bf["ok"] and 0 < bf["gap_kl"]["median"] < 0.05 and "rlkit-bf16mm/trl" in doc["ratios"]


@pytest.mark.bench
def test_sync_quick_json(quick_out):
    doc = _strict_json(quick_out / "sync.json")
    assert doc["bench"] == "sync" and doc["bytes"] > 20 * 2**20  # the tiny model is ~26 MB in fp32
    by: dict[str, list] = {}
    for r in doc["buckets"]:
        by.setdefault(r["transport"], []).append(r)
        assert r["bytes"] == doc["bytes"] and _is_summary(r["bytes_per_s"], 3)
        assert r["breakdown"]["bytes"] == doc["bytes"] and r["breakdown"]["buckets"] >= 1
    # object store and collective per bucket size; shared memory where learner and engine share a node
    assert set(by) - {"shm"} == {"object", "collective"} and len(by.get("shm", [])) <= 1
    for transport in ("object", "collective"):
        assert [r["bucket_mib"] for r in by[transport]] == [1.0, 4.0, 64.0], transport
    assert _is_summary(doc["memcpy"], 6)
    assert by["object"][0]["breakdown"]["buckets"] > by["object"][-1]["breakdown"]["buckets"]


@pytest.mark.bench
def test_scaling_quick_json_and_report(quick_out, tmp_path):
    doc = _strict_json(quick_out / "scaling.json")
    pts = doc["points"]
    assert [(p["kind"], p["prompts"], p["rollout_workers"]) for p in pts] == [
        ("tokens", 2, 1), ("tokens", 4, 1), ("workers", 2, 2)]
    assert all(p["ok"] for p in pts), [p.get("error") for p in pts]
    assert pts[0]["efficiency"] == pytest.approx(1.0)
    assert pts[1]["trained_tokens"]["median"] > 1.5 * pts[0]["trained_tokens"]["median"]
    assert math.isfinite(pts[1]["efficiency"])
    md = tmp_path / "docs" / "benchmarks.md"
    _run("report.py", "--results", str(quick_out), "--doc", str(md), timeout=120)
    text = md.read_text()
    assert "quick mode" in text and "rlkit/trl" in text
    assert "min-bound fraction: learning" in text and "nominal FLOP fraction" in text
    assert "| rlkit learning: fraction of the minimal-FLOP bound | ≥ 0.7 |" in text and "| ≤ 0.3 |" in text
    for png in ("e2e_stages.png", "scaling_tokens.png", "scaling_workers.png"):
        assert (md.parent / "img" / png).read_bytes()[:4] == b"\x89PNG", png


@pytest.mark.bench
def test_levers_quick_json_and_report(tmp_path):
    """Each lever's before and after timed in one process; the report renders them."""
    out = tmp_path / "out"
    _run("levers.py", "--quick", "--out", str(out))
    doc = _strict_json(out / "levers.json")
    assert doc["bench"] == "levers" and doc["args"]["quick"]
    assert set(doc["levers"]) == {"engine_gqa", "engine_fused", "cache_compaction", "sampling_draw", "shared_prefix",
                                  "bf16_matmul", "learner_tree", "tree_kernel", "logits_buffer", "one_rank_reduce",
                                  "freed_memory_generate", "freed_memory_learn"}
    for name, r in doc["levers"].items():
        assert _is_summary(r["before_s"], 1) and _is_summary(r["after_s"], 1), name
        if name != "cache_compaction" or r["compactions"]:  # no early EOS: nothing to compact
            assert r["before_s"]["median"] > 0 and r["after_s"]["median"] > 0, name
    assert doc["levers"]["learner_tree"]["rows"] == 64
    # Per process: three timed generations and two timed updates.
    assert doc["levers"]["freed_memory_generate"]["before_s"]["n"] == 3
    assert doc["levers"]["freed_memory_learn"]["faults_after"]["n"] == 2
    md = tmp_path / "docs" / "benchmarks.md"
    _run("report.py", "--results", str(out), "--doc", str(md), timeout=120)
    text = md.read_text()
    assert "## 7. Levers" in text and "tree attention" in text and "fused decode step" in text
    assert "tree-attention kernel" in text and "one-rank gradient reduce" in text
    assert "chunk logits buffer" in text and "share the prompt's KV" in text and "bf16 decoder matmuls" in text and "sampling tail" in text
    assert "freed memory held" in text and "Minor page faults per learner update" in text
    assert "Minor page faults per generation" in text
    assert "quick mode" in text
