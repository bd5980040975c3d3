"""Regenerate ``docs/benchmarks.md`` (and its charts in ``docs/img/``) from ``bench/out/*.json``.

    .venv/bin/python bench/report.py                                   # render what is in bench/out/
    .venv/bin/python bench/report.py --collect kl,rewards,engine       # first run those benches, then render
    .venv/bin/python bench/report.py --collect kl,rewards,engine --quick

Inputs (each optional; a missing one is reported as "not measured"): ``e2e.json``
(bench/e2e_bench.py), ``sync.json`` (bench/sync_bench.py), ``scaling.json``
(bench/scaling_bench.py), and ``kl.json``, ``rewards.json``, ``engine.json``, which ``--collect``
writes by running bench/kl_bench.py (its per-variant child mode, whose output is JSON),
bench/reward_bench.py (its printed samples/s lines) and bench/engine_bench.py (its ``--out``
file) as subprocesses, ``--repeats`` times each. Every figure is shown as median (min–max) over
repeats; results from ``--quick`` runs are labelled as such.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, summary  # noqa: E402

NAMES = ("e2e", "kl", "sync", "engine", "scaling", "rewards", "levers")
NOT_MEASURED = "_not measured_ (no `bench/out/{name}.json`; run `{cmd}`)"
COMMANDS = {"e2e": "make bench-e2e", "sync": "make bench-sync", "scaling": "make bench-scaling",
            "kl": "make bench-collect", "rewards": "make bench-collect", "engine": "make bench-collect",
            "levers": "make bench-levers"}


# ----------------------------------------------------------------------------------------------
# Collectors for the benches that print rather than write JSON
# ----------------------------------------------------------------------------------------------


def _kl_sizes(quick: bool, headline_only: bool = False) -> list[tuple[int, int, int]]:
    """(N, D, V): the headline size first, then the growth in N and in V."""
    if quick:
        sizes = [(512, 576, 8192), (256, 576, 8192), (512, 576, 4096)]
    else:
        sizes = [(4096, 576, 49152), (1024, 576, 49152), (2048, 576, 49152), (4096, 576, 16384), (4096, 576, 8192)]
    return sizes[:1] if headline_only else sizes


def collect_kl(args: argparse.Namespace) -> dict[str, Any]:
    """Each (variant, size) in a fresh process, ``--repeats`` times: seconds and peak extra bytes."""
    rows = []
    for n, d, v in _kl_sizes(args.quick, args.kl_headline_only):
        for variant in ("naive", "trl", "fused", "fused-rc"):
            child = ["--child", variant, "--n", str(n), "--d", str(d), "--v", str(v), "--threads", str(args.threads)]
            good = [r for r in (_last_json(common.run_script("kl_bench.py", child, args.threads))
                                for _ in range(args.repeats)) if r is not None]
            rows.append({"variant": variant, "n": n, "d": d, "v": v, "ok": bool(good),
                         "seconds": summary(r["seconds"] for r in good),
                         "peak_extra_bytes": summary(r["peak_extra"] for r in good)})
            print(f"[kl] N={n} V={v} {variant}: {fmt(rows[-1]['seconds'])} s", flush=True)
    return {"rows": rows, "headline": {"n": _kl_sizes(args.quick)[0][0], "v": _kl_sizes(args.quick)[0][2]}}


def _last_json(run: tuple[Optional[int], str, str]) -> Optional[dict]:
    """kl_bench's child prints one JSON object as the last line of its stdout."""
    rc, out, _ = run
    lines = out.strip().splitlines()
    if rc != 0 or not lines:
        return None
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return None


REWARD_LINE = re.compile(r"^(\w+)\s*:\s*(\d+) samples in ([\d.]+) s = \s*([\d.]+) samples/s")


def collect_rewards(args: argparse.Namespace) -> dict[str, Any]:
    """reward_bench.py ``--repeats`` times; samples/s per workload parsed from its output lines."""
    per: dict[str, list[float]] = {}
    extra = ["--prompts", "16"] if args.quick else []
    for _ in range(args.repeats):
        _, out, _ = common.run_script("reward_bench.py", extra, 1)
        for line in out.splitlines():
            m = REWARD_LINE.match(line.strip())
            if m:
                per.setdefault(m.group(1), []).append(float(m.group(4)))
    return {"workloads": {k: summary(v) for k, v in per.items()}, "prompts": 16 if args.quick else 512}


def collect_engine(args: argparse.Namespace) -> dict[str, Any]:
    """engine_bench.py through its ``--out`` file; vLLM only where ``.venv-vllm`` exists."""
    import subprocess

    vllm_py = common.ROOT / ".venv-vllm" / "bin" / "python"
    engines = args.engines if args.engines != "auto" else ("vllm,hf" if vllm_py.exists() else "hf")
    py = str(vllm_py) if "vllm" in engines.split(",") else sys.executable
    out = common.OUT_DIR / "engine-rows.json"
    cmd = [py, str(common.BENCH_DIR / "engine_bench.py"), "--engines", engines, "--repeats", str(max(2, args.repeats)),
           "--threads", str(args.threads), "--out", str(out)] + (["--model", "tiny", "--new-tokens", "8"]
                                                                   if args.quick else [])
    proc = subprocess.run(cmd, env=common.bench_env(args.threads), capture_output=True, text=True)
    if proc.returncode or not out.exists():
        return {"rows": [], "error": (proc.stdout + proc.stderr)[-2000:]}
    rows = json.loads(out.read_text())
    for r in rows:
        r["tokens_per_s"] = summary(x["tokens_per_s"] for x in r["runs"])
    return {"rows": rows}


COLLECTORS = {"kl": collect_kl, "rewards": collect_rewards, "engine": collect_engine}


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def load(out_dir: Path) -> dict[str, Optional[dict]]:
    docs = {}
    for name in NAMES:
        p = out_dir / f"{name}.json"
        try:
            docs[name] = json.loads(p.read_text()) if p.exists() else None
        except json.JSONDecodeError:
            docs[name] = None
    return docs


def _provenance(doc: dict) -> str:
    quick = " — **quick mode (tiny sizes), not the headline workload**" if doc.get("args", {}).get("quick") else ""
    load_avg = doc.get("machine", {}).get("loadavg_1_5_15")
    return f"_Measured {doc['machine']['date']}, load average {load_avg}{quick}._"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def section_machine(docs: dict) -> list[str]:
    doc = next((d for d in docs.values() if d and "machine" in d), None)
    if doc is None:
        return ["## Machine", "", "_No results yet._", ""]
    m = doc["machine"]
    rows = [["CPU", f"{m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable)"], ["RAM", f"{m['ram_gib']} GiB"],
            ["software", f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
                         f"trl {m['trl']}, deepspeed {m['deepspeed']}, ray {m['ray']}"],
            ["OS", m["os"]]]
    dates = [f"{n}: {d['machine']['date']}" for n, d in docs.items() if d]
    return ["## Machine", "", *_table(["", ""], rows), "", "Result dates: " + "; ".join(dates) + ".", ""]


def _status(value: Optional[float], target: float, le: bool, doc: Optional[dict] = None) -> str:
    """met / not met; quick-mode (tiny-size) results are shown but not judged."""
    if value is None:
        return "not measured"
    if doc and doc.get("args", {}).get("quick"):
        return "quick run: not judged"
    return "met" if (value <= target if le else value >= target) else "not met"


# Targets of the end-to-end step (bench/e2e_bench.py): rlkit's step time over TRL's, and the fractions of
# the minimal-FLOP bound at the measured matmul rate; read from e2e.json when it records them.
E2E_STEP_RATIO = 0.3
E2E_MIN_FRAC = {"generate": 0.6, "learn": 0.7, "step": 0.6}
PHASE = {"generate": "generation", "learn": "learning", "step": "step"}


SIDE_LABEL = {"rlkit-bf16mm": "rlkit-bf16mm (bf16 rollout matmuls, fp32 learning)"}


def _e2e_targets(e2e: Optional[dict]) -> tuple[float, dict[str, float]]:
    t = (e2e or {}).get("targets", {})
    return t.get("step_ratio_max", E2E_STEP_RATIO), {**E2E_MIN_FRAC, **t.get("min_frac_min", {})}


def section_targets(docs: dict) -> list[str]:
    rows = []
    e2e = docs.get("e2e")
    ratio_max, min_frac = _e2e_targets(e2e)
    for side in ("rlkit", "rlkit-overlap", "rlkit-bf16mm"):
        rat = (e2e or {}).get("ratios", {}).get(f"{side}/trl", {}).get("step_s", {})
        label = SIDE_LABEL.get(side, side)
        rows.append([f"{label} / TRL step time", f"≤ {ratio_max}", fmt(rat, ".3f"),
                     _status(rat.get("median"), ratio_max, True, e2e)])
    rl = next((r for r in (e2e or {}).get("results", []) if r.get("side") == "rlkit" and r.get("ok")), {})
    for phase, target in min_frac.items():
        mf = rl.get("min_frac", {}).get(phase, {})
        rows.append([f"rlkit {PHASE[phase]}: fraction of the minimal-FLOP bound", f"≥ {target}", fmt(mf, ".3f"),
                     _status(mf.get("median"), target, False, e2e)])
    kt, km = _kl_ratios(docs.get("kl"))
    rows.append(["KL fused / TRL peak memory", "≤ 0.1", _f(km, ".3f"), _status(km, 0.1, True, docs.get("kl"))])
    rows.append(["KL fused / TRL time", "≤ 1.0", _f(kt, ".3f"), _status(kt, 1.0, True, docs.get("kl"))])
    best = _best_sync(docs.get("sync"))
    sv = best["ratio_vs_memcpy"] if best else {}
    rows.append(["weight sync / memcpy bytes/s (best bucket)", "≥ 0.5", fmt(sv, ".3f"),
                 _status(sv.get("median"), 0.5, False, docs.get("sync"))])
    eff = _max_eff(docs.get("scaling"))
    rows.append(["scaling: step-time growth ÷ token growth (worst)", "≤ 1.0", _f(eff, ".3f"),
                 _status(eff, 1.0, True, docs.get("scaling"))])
    quick = [n for n, d in docs.items() if d and d.get("args", {}).get("quick")]
    note = [f"_Quick-mode (tiny-size) results in this table: {', '.join(quick)}; targets are judged on the "
            "full workloads._", ""] if quick else []
    return ["## Targets", "", *_table(["measure", "target", "measured", "status"], rows), "", *note]


def _f(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _kl_ratios(kl: Optional[dict]) -> tuple[Optional[float], Optional[float]]:
    if not kl:
        return None, None
    h = kl["headline"]
    at = {r["variant"]: r for r in kl["rows"] if r["n"] == h["n"] and r["v"] == h["v"] and r["ok"]}
    if "fused" not in at or "trl" not in at:
        return None, None
    t = at["fused"]["seconds"]["median"] / at["trl"]["seconds"]["median"]
    den = at["trl"]["peak_extra_bytes"]["median"]
    return t, (at["fused"]["peak_extra_bytes"]["median"] / den if den else None)


def _best_sync(sync: Optional[dict]) -> Optional[dict]:
    if not sync or not sync.get("buckets"):
        return None
    return max(sync["buckets"], key=lambda r: r["ratio_vs_memcpy"]["median"] or 0)


def _max_eff(sc: Optional[dict]) -> Optional[float]:
    effs = [p["efficiency"] for p in (sc or {}).get("points", []) if "efficiency" in p and p["multiplier"] > 1]
    return max(effs) if effs else None


def section_e2e(doc: Optional[dict]) -> list[str]:
    out = ["## 1. End-to-end GRPO step: rlkit vs TRL", ""]
    if not doc:
        return out + [NOT_MEASURED.format(name="e2e", cmd=COMMANDS["e2e"]), ""]
    w = doc["workload"]
    ratio_max, min_frac = _e2e_targets(doc)
    out += [f"{w['model']}, {w['prompts']} prompts × {w['samples']} samples, {w['new_tokens']} new tokens, "
            f"{w['steps']} steps per side, {w['threads']} threads per side (OMP and torch), each side in its own "
            f"process, back to back. Step 1 (warm-up) is shown apart; the other columns are median (min–max) over "
            f"steps 2..{w['steps']}. FLOP fractions divide a FLOP count by (seconds × the fp32 2048² matmul rate "
            f"measured in the same process: {fmt(doc['matmul_gflops'], '.0f')} GFLOP/s in the parent).",
            "",
            "- **Minimal bound** (`min_flops` in bench/e2e_bench.py): what any correct implementation of the "
            "step must execute. Each distinct prompt is prefilled once per group, each generated token but the "
            "last of its sequence is fed forward; per position 2 FLOPs per parameter outside the embedding and "
            "LM-head matrices, the LM head (2·D·V) only where a distribution is needed, attention as it is; "
            "learning needs the same positions forward and backward (3×). Columns: generation over generation "
            "seconds, learning over learning seconds (rlkit: its `learn` and `reference` stages; TRL: the step "
            "less generation and scoring), step over step seconds. Targets for rlkit: "
            + ", ".join(f"{PHASE[k]} ≥ {v}" for k, v in min_frac.items()) + ".",
            "- **Nominal** (`common.step_flops`): 2·P per prompt and generated token of every sequence and 6·P "
            "per trained token, the same count for both sides. rlkit prefills each prompt once per group, "
            "skips finished rows while decoding and trains each group as one packed sequence, so it executes "
            "fewer FLOPs than this count (the fraction can exceed 1): it measures workload throughput, not "
            "arithmetic-unit utilization.",
            "", _provenance(doc), ""]
    rows = []
    for r in doc["results"]:
        if not r.get("ok"):
            rows.append([r["side"], "failed: " + str(r.get("error"))] + [""] * 8)
            continue
        mf = r.get("min_frac", {})
        rows.append([r["side"], _f(r["warmup"]["seconds"] if r.get("warmup") else None, ".2f"), fmt(r["step_s"]),
                     fmt(r["generate_s"]), fmt(r.get("learn_s")), fmt(r["gen_tokens_per_s"], ".1f"),
                     fmt(r["e2e_tokens_per_s"], ".1f"), fmt(r["roofline_frac"], ".3f")]
                    + [fmt(mf.get(k), ".3f") for k in ("generate", "learn", "step")])
    out += _table(["side", "step 1 s", "step s", "generation s", "learning s", "generated tok/s (generation)",
                   "generated tok/s (step)", "nominal FLOP fraction", "min-bound fraction: generation",
                   "min-bound fraction: learning", "min-bound fraction: step"], rows) + [""]
    for name, rat in doc.get("ratios", {}).items():
        out.append(f"- **{name}**: step time {fmt(rat['step_s'], '.3f')} "
                   f"(target ≤ {ratio_max}); "
                   f"end-to-end tokens/s {fmt(rat['e2e_tokens_per_s'], '.2f')}.")
    out += [f"- {r['side']}: {r['note']}" for r in doc["results"] if r.get("note")]
    out += [f"- **{r['side']}** runs the rollout engine's decoder linears in bf16 (`rollout.matmul_dtype: "
            f"bfloat16`; learning stays fp32), so its generation fraction is against the fp32 probe, not a bf16 "
            f"unit's rate; the sampler/learner gap it costs, `gap/kl` (mean k3 of learner vs sampler log-probs "
            f"per token): {fmt(r['gap_kl'], '.2e')}." for r in doc["results"] if r.get("ok") and r.get("gap_kl")
            and r["side"] == "rlkit-bf16mm"]
    out += ["", "Stage seconds (median over steps 2..K; rlkit's `generate` excludes its nested `score`; with "
            "overlap it is only the wait for samples generated during the previous step):", ""]
    out += _stage_table(doc["results"]) + ["", "![e2e stages](img/e2e_stages.png)", ""]
    return out


def _stage_means(r: dict) -> dict[str, float]:
    steady = r["steps"][1:] or r["steps"][:1]
    keys = sorted({k for s in steady for k in s["stages"]})
    out = {}
    for k in keys:
        vals = [s["stages"].get(k, 0.0) for s in steady]
        out[k] = summary(vals)["median"]
    if "generate" in out and "score" in out and r["side"].startswith("rlkit"):
        out["generate"] -= out["score"]
    return out


def _stage_table(results: list[dict]) -> list[str]:
    ok = [r for r in results if r.get("ok") and r.get("steps")]
    stages = ["generate", "score", "reference", "learn", "sync"]
    rows = [[r["side"]] + [_f(_stage_means(r).get(s), ".2f") for s in stages] for r in ok]
    return _table(["side"] + stages, rows)


def section_kl(doc: Optional[dict]) -> list[str]:
    out = ["## 2. KL kernel (log-prob pass, forward + backward, fp32)", ""]
    if not doc:
        return out + [NOT_MEASURED.format(name="kl", cmd=COMMANDS["kl"]), ""]
    h = doc["headline"]
    out += ["Variants of bench/kl_bench.py, each (variant, size) in a fresh process; peak = rise of the "
            "process's peak RSS over its RSS before the pass. Ratios against `trl` at the same size.", "",
            _provenance(doc), ""]
    rows = []
    for r in doc["rows"]:
        base = next((b for b in doc["rows"] if b["variant"] == "trl" and b["n"] == r["n"] and b["v"] == r["v"]
                     and b["ok"]), None)
        tr = mr = "—"
        if base and r["ok"]:
            tr = f"{r['seconds']['median'] / base['seconds']['median']:.2f}"
            den = base["peak_extra_bytes"]["median"]
            mr = f"{r['peak_extra_bytes']['median'] / den:.3f}" if den else "—"
        mark = " (headline)" if (r["n"], r["v"]) == (h["n"], h["v"]) else ""
        rows.append([f"{r['n']} × {r['d']} × {r['v']}{mark}", r["variant"], fmt(r["seconds"]),
                     fmt(r["peak_extra_bytes"], ".0f", 2**-20), tr, mr])
    return out + _table(["N × D × V", "variant", "seconds", "peak extra MiB", "time / trl", "memory / trl"],
                        rows) + [""]


def section_sync(doc: Optional[dict]) -> list[str]:
    out = ["## 3. Weight sync", ""]
    if not doc:
        return out + [NOT_MEASURED.format(name="sync", cmd=COMMANDS["sync"]), ""]
    out += [f"{doc['args']['model']}: {doc['bytes'] / 2**20:.1f} MiB per full sync, learner rank 0 → 1 rollout "
            f"worker through `Runtime.sync`: the Ray object store (`object`) and a gloo broadcast (`collective`) "
            f"per bucket size, and shared memory (`shm`, "
            f"the default when both share a node: the learner copies into one of two segments, the engine adopts "
            f"views of it), {doc['args']['repeats']} repeats each. "
            f"Reference: `copy_` of the same bytes in the same process: {fmt(doc['memcpy'], '.2f', 1e-9)} GB/s "
            f"with {doc['memcpy']['threads']} threads, {fmt(doc['memcpy_1thread'], '.2f', 1e-9)} GB/s with 1 "
            f"(ratios use {doc.get('memcpy_reference_threads', doc['memcpy']['threads'])}).", "", _provenance(doc), ""]
    rows = [[r.get("transport", "object"), "—" if r.get("transport") == "shm" else f"{r['bucket_mib']:g}",
             str(r["breakdown"]["buckets"]),
             fmt(r["seconds"], ".3f"),
             fmt(r["bytes_per_s"], ".3f", 1e-9), fmt(r["ratio_vs_memcpy"], ".3f"),
             f"{r['breakdown']['learner_pack_put_s']:.3f}", f"{r['breakdown']['worker_get_load_s']:.3f}"]
            for r in doc["buckets"]]
    return out + _table(["transport", "bucket MiB", "buckets", "sync s", "GB/s", "× memcpy (target ≥ 0.5)",
                         "learner copy/put s", "worker get/adopt s"], rows) + [""]


def section_engine(doc: Optional[dict]) -> list[str]:
    out = ["## 4. Rollout engines", ""]
    if not doc or not doc.get("rows"):
        err = f" ({doc['error'][-200:].strip()})" if doc and doc.get("error") else ""
        return out + [NOT_MEASURED.format(name="engine", cmd=COMMANDS["engine"]) + err, ""]
    out += ["bench/engine_bench.py: generated tokens/s (EOS included, no padding), each engine in its own "
            "process.", "", _provenance(doc), ""]
    rows = [[r["engine"], r["model"], r["shape"], str(r["threads"]), f"{r['start_s']:.1f}",
             fmt(r["tokens_per_s"], ".1f")] for r in doc["rows"]]
    return out + _table(["engine", "model", "prompts × samples × tokens", "threads", "start-up s", "tokens/s"],
                        rows) + [""]


def section_scaling(doc: Optional[dict]) -> list[str]:
    out = ["## 5. Scaling", ""]
    if not doc:
        return out + [NOT_MEASURED.format(name="scaling", cmd=COMMANDS["scaling"]), ""]
    a = doc["args"]
    out += [f"rlkit, {a['model']}, {a['samples']} samples per prompt, {a['new_tokens']} new tokens, micro-batch "
            f"{a['micro_batch']}, {a['threads']} threads; every point a fresh process. Efficiency = step-time "
            f"growth ÷ trained-token growth vs the smallest point (≤ 1: no worse than linear). Worker points "
            f"split the same thread budget.", "", _provenance(doc), ""]
    rows = []
    for p in doc["points"]:
        if not p["ok"]:
            rows.append([p["kind"], str(p["prompts"]), str(p["rollout_workers"]), "failed", "", "", "", ""])
            continue
        rows.append([p["kind"], str(p["prompts"]), f"{p['rollout_workers']} × {p['rollout_threads']} thr",
                     f"{p['trained_tokens']['median']:.0f}", fmt(p["step_s"]), fmt(p["generate_s"]),
                     fmt(p["learn_s"]), _f(p.get("efficiency"), ".3f")])
    out += _table(["kind", "prompts", "rollout workers", "trained tokens", "step s", "generation s", "learn s",
                   "efficiency"], rows)
    return out + ["", "![step time vs tokens](img/scaling_tokens.png)", "",
                  "![rollout workers](img/scaling_workers.png)", ""]


def section_rewards(doc: Optional[dict]) -> list[str]:
    out = ["## 6. Reward worker", ""]
    if not doc or not doc.get("workloads"):
        return out + [NOT_MEASURED.format(name="rewards", cmd=COMMANDS["rewards"]), ""]
    out += [f"bench/reward_bench.py: samples/s of the `math` reward in the reward worker ({doc['prompts']} "
            "prompts × 8 per workload, 2 child processes, cold verdict cache).", "", _provenance(doc), ""]
    rows = [[k, fmt(v, ".0f")] for k, v in doc["workloads"].items()]
    return out + _table(["workload", "samples/s"], rows) + [""]


# ----------------------------------------------------------------------------------------------
# Charts
# ----------------------------------------------------------------------------------------------


LEVERS = {
    "engine_gqa": ("HF engine: grouped-query attention", "`generate` of 8 prompts × 8 samples",
                   "transformers `sdpa` (KV heads repeated under the mask)", "`rlkit_sdpa` (SDPA's own GQA)"),
    "engine_fused": ("HF engine: fused decode step", "`generate` of 8 prompts × 8 samples",
                     "transformers' forward per decode step", "fused Llama-family step (`FusedDecoder`)"),
    "cache_compaction": ("HF engine: finished rows leave the KV cache", "compaction work of one generation",
                         "gather of every kept row's whole buffer", "rows kept in place, holes filled from the tail"),
    "sampling_draw": ("HF engine: sampling tail", "`generate` of 8 prompts × 8 samples",
                      "÷ temperature 1, float64 block sums over a fresh [rows, vocab] copy",
                      "no ÷ 1, fp32 block sums into a kept buffer"),
    "shared_prefix": ("HF engine: samples share the prompt's KV", "`generate` of 8 prompts × 8 samples",
                      "prompt KV repeated per sample (SDPA)", "read once per prompt (`SharedPrefixKV`)"),
    "bf16_matmul": ("HF engine: bf16 decoder matmuls (`rollout.matmul_dtype`)", "`generate` of 8 prompts × 8 samples",
                    "fp32 matmuls", "bf16 matmuls on bf16 copies (LM head fp32); other tokens"),
    "learner_tree": ("Learner: packed groups' attention", "one optimizer step over 64 rows (4 micro-batches)",
                     "one row per group under a dense mask", "groups end to end, tree attention"),
    "tree_kernel": ("Learner: tree-attention kernel", "one optimizer step over 64 rows (4 micro-batches)",
                    "SDPA (flash kernel, boolean mask)", "two batched matmuls around a softmax"),
    "logits_buffer": ("Learner: LM-head chunk logits buffer", "one optimizer step over 64 rows (4 micro-batches)",
                      "a fresh [chunk, vocab] allocation per chunk", "one buffer kept across chunks"),
    "one_rank_reduce": ("Learner: one-rank gradient reduce", "DeepSpeed step of one update (ZeRO-1, one rank)",
                        "DeepSpeed's all-reduce (flatten, ÷1, copy back)", "skipped (identity at one rank)"),
    "freed_memory_generate": ("Engine: freed memory held", "`HFEngine.generate`, fresh processes alternating",
                              "glibc malloc defaults", "freed memory kept in the heap (`rollout.hold_freed_memory`)"),
    "freed_memory_learn": ("Learner: freed memory held", "one optimizer step over 64 rows, fresh processes alternating",
                           "glibc malloc defaults", "freed memory kept in the heap (`learner.hold_freed_memory`)"),
}


def section_levers(doc: Optional[dict]) -> list[str]:
    out = ["## 7. Levers", ""]
    if not doc:
        return out + [NOT_MEASURED.format(name="levers", cmd=COMMANDS["levers"]), ""]
    w = doc.get("workload", {})
    out += [f"bench/levers.py: each change measured before/after in one process, alternating, on the e2e "
            f"shape ({w.get('model')}, {w.get('prompts')} prompts × {w.get('samples')} samples × "
            f"{w.get('new_tokens')} tokens, {w.get('generated_tokens')} tokens generated; "
            f"{doc['args'].get('threads')} threads).", "", _provenance(doc), ""]
    rows = []
    for key, r in doc["levers"].items():
        name, what, before, after = LEVERS.get(key, (key, "", "before", "after"))
        rows.append([name, what, before, fmt(r["before_s"], ".3f"), after, fmt(r["after_s"], ".3f"),
                     fmt(r["after_over_before"], ".3f")])
    out += _table(["lever", "timed", "before", "s", "after", "s", "after / before"], rows) + [""]
    for key, what in (("freed_memory_generate", "generation"), ("freed_memory_learn", "learner update")):
        fm = doc["levers"].get(key)
        if fm and "faults_before" in fm:
            out += [f"Minor page faults per {what}: {fmt(fm['faults_before'], '.0f')} with malloc's defaults, "
                    f"{fmt(fm['faults_after'], '.0f')} with freed memory held.", ""]
    return out


def _errbar(points: list[dict], key: str) -> tuple[list[float], list[list[float]]]:
    med = [p[key]["median"] for p in points]
    return med, [[m - p[key]["min"] for m, p in zip(med, points)], [p[key]["max"] - m for m, p in zip(med, points)]]


def chart_scaling(doc: Optional[dict], img: Path) -> list[Path]:
    """Step time vs trained tokens per step (with the linear reference), and 1 vs 2 rollout workers."""
    if not doc:
        return []
    import matplotlib.pyplot as plt

    written = []
    pts = sorted((p for p in doc["points"] if p["ok"] and p["kind"] == "tokens"),
                 key=lambda p: p["trained_tokens"]["median"])
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [p["trained_tokens"]["median"] for p in pts]
        for key, label in (("step_s", "step"), ("generate_s", "generation"), ("learn_s", "learn")):
            med, err = _errbar(pts, key)
            ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=label)
        t1 = pts[0]["step_s"]["median"]
        ax.plot(x, [t1 * n / x[0] for n in x], "k--", lw=1, label="linear from the smallest point")
        ax.set(xlabel="trained tokens per step (prompt + completion)", ylabel="seconds (median, min–max)",
               title=f"rlkit step time vs work per step ({doc['args']['model']})")
        ax.legend()
        written.append(_save(fig, img / "scaling_tokens.png"))
    workers = _worker_points(doc)
    if len(workers) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        labels = [f"{p['rollout_workers']} worker(s)\n× {p['rollout_threads']} thread(s)" for p in workers]
        gen, learn = [p["generate_s"]["median"] for p in workers], [p["learn_s"]["median"] for p in workers]
        other = [max(0.0, p["step_s"]["median"] - g - lr) for p, g, lr in zip(workers, gen, learn)]
        ax.bar(labels, gen, label="generation")
        ax.bar(labels, learn, bottom=gen, label="learn")
        ax.bar(labels, other, bottom=[g + lr for g, lr in zip(gen, learn)], label="other (score, sync, …)")
        ax.set(ylabel="seconds per step (median)", title=f"{workers[0]['prompts']} prompts per step")
        ax.legend()
        written.append(_save(fig, img / "scaling_workers.png"))
    return written


def _worker_points(doc: dict) -> list[dict]:
    at = doc["args"]["workers_at"]
    pts = [p for p in doc["points"] if p["ok"] and p["multiplier"] == at
           and (p["kind"] == "workers" or p["rollout_workers"] == 1)]
    return sorted(pts, key=lambda p: p["rollout_workers"])


def chart_e2e(doc: Optional[dict], img: Path) -> list[Path]:
    """Stacked stage seconds per side."""
    ok = [r for r in (doc or {}).get("results", []) if r.get("ok") and r.get("steps")]
    if not ok:
        return []
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    left = [0.0] * len(ok)
    means = [_stage_means(r) for r in ok]
    for stage in ("generate", "score", "reference", "learn", "sync"):
        vals = [m.get(stage, 0.0) for m in means]
        if any(vals):
            ax.barh([r["side"] for r in ok], vals, left=left, label=stage)
            left = [a + b for a, b in zip(left, vals)]
    ax.set(xlabel="seconds per step (median of stages, steps 2..K)", title=f"GRPO step ({doc['workload']['model']})")
    ax.legend(fontsize=8)
    return [_save(fig, img / "e2e_stages.png")]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def render(docs: dict[str, Optional[dict]]) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `bench/report.py` from the JSON results in `bench/out/`; do not edit by hand. "
             "Regenerate with `make bench` (all) or one of `make bench-e2e`, `bench-sync`, `bench-scaling`, "
             "then `make bench-report`. Every figure is the median of repeated runs with (min–max); "
             "comparisons are measured in the same process or in back-to-back processes on the same machine.", ""]
    lines += section_machine(docs) + section_targets(docs)
    lines += section_e2e(docs["e2e"]) + section_kl(docs["kl"]) + section_sync(docs["sync"])
    lines += section_engine(docs["engine"]) + section_scaling(docs["scaling"]) + section_rewards(docs["rewards"])
    lines += section_levers(docs["levers"])
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(common.OUT_DIR), help="folder of the *.json results")
    ap.add_argument("--doc", default=str(common.ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--img", default=None, help="chart folder (default: img/ beside --doc)")
    ap.add_argument("--collect", default="", help="comma list of kl, rewards, engine to run first")
    ap.add_argument("--quick", action="store_true", help="collect at tiny sizes, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kl-headline-only", action="store_true", help="KL kernel at the headline size only")
    ap.add_argument("--engines", default="auto", help="engines to collect: auto (vllm,hf where .venv-vllm exists), "
                                                       "or a comma list of vllm, hf")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    results = Path(args.results)
    for name in [x for x in args.collect.split(",") if x]:
        if name not in COLLECTORS:
            raise SystemExit(f"--collect: unknown bench '{name}'; valid: {sorted(COLLECTORS)}")
        print(f"[report] collecting {name} ...", flush=True)
        common.write_result(name, COLLECTORS[name](args), args, results)
    import matplotlib

    matplotlib.use("Agg")
    docs = load(results)
    doc_path = Path(args.doc)
    img = Path(args.img) if args.img else doc_path.parent / "img"
    charts = chart_e2e(docs["e2e"], img) + chart_scaling(docs["scaling"], img)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render(docs))
    missing = [n for n, d in docs.items() if d is None]
    print(f"wrote {doc_path} and {len(charts)} chart(s) in {img}; not measured: {', '.join(missing) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
