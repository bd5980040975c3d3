"""End-to-end GRPO step time of rlkit vs TRL's GRPOTrainer on the same workload, on CPU.

    .venv/bin/python bench/e2e_bench.py                 # SmolLM2-135M, 8 prompts × 8, 48 tokens, 3 steps
    .venv/bin/python bench/e2e_bench.py --steps 5       # more steps (step 1 is reported as warm-up)
    .venv/bin/python bench/e2e_bench.py --quick         # tiny random Llama, 2 steps, 4 × 4, 8 tokens

The TRL baseline workload (SmolLM2-135M, 1–2-digit +/− problems) on both sides: the same prompts (rlkit's
arithmetic generator: both sides train on the first ``steps × prompts`` rows of rlkit's
``PromptSampler``, as chat messages rendered by the same chat template), the same sampling
(temperature 1, top-p 1, top-k 0, ``--new-tokens``), the same reward (``rlkit.rewards.math_answer``),
the same update (GRPO/"dapo" token-mean loss, ε = 0.2, β = 0 so no reference pass, one AdamW
step per batch at lr 5e-6 constant, grad-norm clip 1, four micro-batches per step):

  trl            TRL ``GRPOTrainer``, HF ``generate`` (``use_vllm=False``), the baseline's GRPOConfig
                 with ``max_steps = --steps``.
  rlkit          ``configs/grpo_demo.yaml`` with the same overrides: Ray actors (HF-engine rollout
                 worker, reward worker, one DeepSpeed ZeRO-2 learner), synchronous.
  rlkit-overlap  the same with ``rollout.overlap=true`` (generate step k+1 while learning on step
                 k), with the threads split between the rollout worker and the learner (they run at
                 the same time). The child checks that rollouts of step ≥ 2 are actually one version
                 stale; if they are not, the option is not wired into the trainer, and the row says so.
  rlkit-bf16mm   ``rlkit`` with ``rollout.matmul_dtype=bfloat16``: the rollout engine's decoder linears
                 multiply in bf16 (oneDNN) on copies of the fp32 weights; learning is unchanged fp32.
                 Its generation fractions divide by the fp32 probe, so they are not utilization of a
                 bf16 unit; the row reports the sampler/learner gap (``gap/kl``) it costs.

Each side runs in a fresh subprocess, one after the other, with ``OMP_NUM_THREADS = --threads``
(default 2, the whole 2-core machine) and ``torch.set_num_threads(--threads)`` in every process
that computes (TRL's process; rlkit's rollout and learner actors through ``rollout.threads`` and
``learner.threads``; they do not run at the same time in synchronous mode).

Per step: wall seconds, generation and learning seconds, generated tokens (EOS included, no
padding) and two FLOP fractions, each a FLOP count ÷ (seconds × the fp32 2048² matmul rate measured
in the same child process, before and after its steps):

* nominal: :func:`common.step_flops` (2·P per prompt and generated token of every sequence, 6·P per
  trained token) over the step;
* minimal: :func:`min_flops`, what any correct implementation of the step must execute (each distinct
  prompt prefilled once, the LM head only where a distribution is needed, attention included), for the
  step, the generation and the learning separately. Targets: rlkit's step ≤ 0.3× TRL's; minimal
  fractions generation ≥ 0.6, learning ≥ 0.7, step ≥ 0.6.

Step 1 includes one-time warm-up (allocator, thread pools, first DeepSpeed step) and is reported
separately; the summaries are over steps 2..K. Writes ``bench/out/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIDES = ("trl", "rlkit", "rlkit-overlap", "rlkit-bf16mm")
RLKIT_SIDES = SIDES[1:]
TARGET_STEP_RATIO = 0.3
TARGET_MIN_FRAC = {"generate": 0.6, "learn": 0.7, "step": 0.6}
"""Fractions of the minimal-FLOP bound (:func:`min_flops`) at the matmul rate that rlkit should reach."""


# ----------------------------------------------------------------------------------------------
# Shared by both children: the exact prompts and the parameter count
# ----------------------------------------------------------------------------------------------


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.num_train={args.num_train}", f"data.num_eval={args.num_eval}"]


def step_prompts(args: argparse.Namespace, tokenizer: Any) -> list:
    """The rows rlkit's sampler hands out in steps 1..K (seed 0), in order."""
    from rlkit.config import build_data_spec, load_config
    from rlkit.data import PromptSampler, load_prompts

    cfg = load_config(common.ROOT / "configs" / "grpo_demo.yaml", data_overrides(args))
    train_rows, _ = load_prompts(build_data_spec(cfg), tokenizer)
    sampler = PromptSampler(train_rows, args.prompts, cfg.train.seed)
    return [row for _ in range(args.steps) for row in sampler.next_batch()]


def param_count(model_dir: Path) -> int:
    """Parameters of a safetensors HF folder, from the file headers (tied weights are stored once)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                size = 1
                for d in meta["shape"]:
                    size *= d
                total += size
    if not total:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights to count")
    return total


def model_shape(model_dir: Path) -> dict[str, Any]:
    """What the FLOP counts need of a HF folder: parameters (file count), D, V, layers, the attention
    width (heads × head dim) and whether the LM head is the tied input embedding."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return {"params": param_count(model_dir), "hidden": d, "vocab": cfg["vocab_size"],
            "layers": cfg["num_hidden_layers"], "attn": heads * cfg.get("head_dim", d // heads),
            "tied": bool(cfg.get("tie_word_embeddings", True))}


def min_flops(shape: dict[str, Any], seqs: list[tuple[Any, int, int]]) -> dict[str, float]:
    """The FLOPs any correct implementation of the step must execute, by phase.

    ``seqs``: (prompt key, prompt tokens, completion tokens) per sampled sequence; sequences with the
    same key share their prompt (a group). Counted per forward position, as 2·(body parameters) for
    the matmuls (Kaplan et al. 2020, arXiv 2001.08361, §2.1; body = the parameters without the
    embedding and LM-head matrices, whose lookup costs nothing), 2·D·V for the LM head only where a
    distribution is needed, and 4·(heads × head dim)·keys per layer for attention scores and their
    weighted sum (causal: a query sees the keys up to itself). The positions:

    * each distinct prompt once (its KV cache serves the whole group), the LM head at its last
      position once (the first token's distribution is the same for every sample of the group);
    * each generated token but the last of its sequence (whose forward nothing needs), with its head.

    Generation runs these positions forward once. Learning needs the same positions, forward and
    backward (3× the forward: the weight gradient and the input gradient each cost a forward), with
    the log-prob of each response token scored at the position before it; β = 0 and one update per
    batch, so π_old = π_θ and no reference or old-policy pass is needed. Hence learn = 3 × generate
    and step = generate + learn (reward scoring and weight sync do no model FLOPs).
    """
    d, v, layers, a = shape["hidden"], shape["vocab"], shape["layers"], shape["attn"]
    head = 2.0 * d * v
    body = 2.0 * (shape["params"] - d * v * (1 if shape["tied"] else 2))
    prompts = {}
    for key, p, _ in seqs:
        prompts[key] = p
    fwd = sum(body * p + 2.0 * a * layers * p * (p + 1) + head for p in prompts.values())
    for _, p, n in seqs:
        k = max(n - 1, 0)  # fed-back tokens: positions p+1 .. p+k, each seeing p+j keys
        fwd += (body + head) * k + 4.0 * a * layers * (k * p + k * (k + 1) / 2)
    return {"generate": fwd, "learn": 3.0 * fwd, "step": 4.0 * fwd}


def step_row(step: int, seconds: float, gen_s: Optional[float], learn_s: float, seqs: list[tuple[Any, int, int]],
             shape: dict[str, Any], gflops: float, stages: dict[str, float]) -> dict[str, Any]:
    """One step's record from its sequences ((prompt key, prompt tokens, completion tokens) each).

    Nominal trained tokens = prompt + completion of every sequence (no extra passes: β = 0);
    minimal fractions per phase: :func:`min_flops` ÷ (that phase's seconds × the matmul rate)."""
    prefill, generated = sum(p for _, p, _ in seqs), sum(n for _, _, n in seqs)
    flops = common.step_flops(shape["params"], generated=generated, prefill=prefill, trained=prefill + generated)
    least = min_flops(shape, seqs)
    rate = gflops * 1e9
    secs = {"step": seconds, "generate": gen_s, "learn": learn_s}
    return {"step": step, "seconds": seconds, "generate_s": gen_s, "learn_s": learn_s, "prefill_tokens": prefill,
            "generated_tokens": generated, "trained_tokens": prefill + generated, "flops": flops,
            "gen_tokens_per_s": generated / gen_s if gen_s else None,
            "e2e_tokens_per_s": generated / seconds, "roofline_frac": flops / (seconds * rate),
            "min_flops": least,
            "min_frac": {k: (least[k] / (t * rate) if t else None) for k, t in secs.items()},
            "stages": stages}


def finish_side(side: str, steps: list[dict], params: int, probes: list[dict], **extra) -> dict[str, Any]:
    """Summaries over steps 2..K (step 1 alone if K = 1), plus the raw per-step records.

    A figure that a step does not have (generation seconds of an overlapped step) is left out of
    its summary, which may then be empty (n = 0, shown as "—").
    """
    steady = steps[1:] or steps[:1]
    pick = lambda key: [s[key] for s in steady if s.get(key) is not None]  # noqa: E731
    gf = common.summary(v for p in probes for v in p["values"])
    min_frac = {k: common.summary(s["min_frac"][k] for s in steady if s["min_frac"].get(k) is not None)
                for k in TARGET_MIN_FRAC}
    return {"side": side, "ok": True, "params": params, "warmup": steps[0] if steps else None, "steps": steps,
            "steady_steps": len(steady) if len(steps) > 1 else 0,
            "step_s": common.summary(pick("seconds")), "generate_s": common.summary(pick("generate_s")),
            "learn_s": common.summary(pick("learn_s")),
            "gen_tokens_per_s": common.summary(pick("gen_tokens_per_s")),
            "e2e_tokens_per_s": common.summary(pick("e2e_tokens_per_s")),
            "roofline_frac": common.summary(pick("roofline_frac")), "min_frac": min_frac,
            "matmul_gflops": gf, **extra}


# ----------------------------------------------------------------------------------------------
# TRL child
# ----------------------------------------------------------------------------------------------


def trl_config(args: argparse.Namespace, out_dir: str):
    """The GRPOConfig of trl-baseline.md §2, scaled to ``--prompts × --samples`` and ``--steps``."""
    from trl import GRPOConfig

    seqs = args.prompts * args.samples
    accum = 4 if seqs % 4 == 0 else 1  # the baseline's 16 × 4: four micro-batches per optimizer step
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, per_device_train_batch_size=seqs // accum,
        gradient_accumulation_steps=accum, num_generations=args.samples,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=5e-6, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, loss_type="dapo",
        scale_rewards="group", num_iterations=1, gradient_checkpointing=False, max_steps=args.steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, use_vllm=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def correctness(completions, answer, **unused) -> list[float]:
    """rlkit's ``math`` reward on TRL's conversational completions."""
    from rlkit.rewards.math_answer import math_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return math_answer(texts, answer=answer)


def _instrument_trl(trainer) -> dict[str, list]:
    """Time TRL's generation call and read the token masks of each generation batch.

    Wraps two of the trainer's own methods on this instance (the work is unchanged): the HF
    ``generate`` call, and the generate-and-score stage whose output holds the prompt and
    completion masks (completion mask: up to and including EOS).
    """
    rec: dict[str, list] = {"gen_s": [], "score_s": [], "prefill": [], "generated": [], "seqs": []}
    gen, gen_and_score = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_gen(*a, **k):
        t0 = time.perf_counter()
        out = gen(*a, **k)
        rec["gen_s"].append(time.perf_counter() - t0)
        return out

    def timed_gen_and_score(*a, **k):
        t0 = time.perf_counter()
        out = gen_and_score(*a, **k)
        rec["score_s"].append(time.perf_counter() - t0 - rec["gen_s"][-1])
        rec["prefill"].append(int(out["prompt_mask"].sum()))
        rec["generated"].append(int(out["completion_mask"].sum()))
        rec["seqs"].append(_trl_seqs(out))
        return out

    trainer._generate_single_turn = timed_gen
    trainer._generate_and_score_completions = timed_gen_and_score
    return rec


def _trl_seqs(out: dict) -> list[tuple[tuple[int, ...], int, int]]:
    """(prompt tokens as the key, prompt length, completion length) per sequence of a TRL batch."""
    ids, pm, cm = out["prompt_ids"].cpu(), out["prompt_mask"].cpu().bool(), out["completion_mask"].cpu()
    return [(tuple(ids[i][pm[i]].tolist()), int(pm[i].sum()), int(cm[i].sum())) for i in range(ids.shape[0])]


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    from rlkit.assets import load_tokenizer

    torch.set_num_threads(args.threads)
    mdir = common.model_dir(args.model)
    tok = load_tokenizer(mdir)
    rows = step_prompts(args, tok)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r.fields["question"]}], "answer": r.answer}
                            for r in rows])
    model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
    clock: dict[str, list] = {"begin": [], "end": []}

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["begin"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            clock["end"].append(time.perf_counter())

    out_dir = tempfile.mkdtemp(prefix="e2e-trl-")
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=[correctness], args=trl_config(args, out_dir),
                              train_dataset=ds, processing_class=tok, callbacks=[StepClock()])
        rec = _instrument_trl(trainer)
        probes = [common.matmul_gflops(threads=args.threads)]
        trainer.train()
        probes.append(common.matmul_gflops(threads=args.threads))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if not len(clock["end"]) == len(rec["gen_s"]) == len(rec["generated"]) == args.steps:
        raise RuntimeError(f"TRL ran {len(clock['end'])} steps and {len(rec['gen_s'])} generation batches; the "
                           f"timing assumes one generation batch per optimizer step ({args.steps} steps)")
    shape = model_shape(mdir)
    gflops = common.summary(v for p in probes for v in p["values"])["median"]
    steps = []
    for i, (b, e) in enumerate(zip(clock["begin"], clock["end"], strict=True)):
        stages = {"generate": rec["gen_s"][i], "score": rec["score_s"][i],
                  "learn": (e - b) - rec["gen_s"][i] - rec["score_s"][i]}
        steps.append(step_row(i + 1, e - b, rec["gen_s"][i], stages["learn"], rec["seqs"][i], shape, gflops,
                              stages))
    return finish_side("trl", steps, shape["params"], probes, prompt_tokens_mean=sum(rec["prefill"]) / max(
        1, len(rec["prefill"])) / (args.prompts * args.samples))


# ----------------------------------------------------------------------------------------------
# rlkit child
# ----------------------------------------------------------------------------------------------


def rlkit_config(args: argparse.Namespace, run_dir: str, overlap: bool, matmul_dtype: str = "auto"):
    """``configs/grpo_demo.yaml`` with the benchmark's workload and thread counts."""
    from rlkit.config import load_config

    mdir = "smollm2" if args.model == "smollm2" else str(common.model_dir(args.model))
    seqs = args.prompts * args.samples
    workers = args.rollout_workers
    # The thread budget is the machine: several rollout workers split it, and with overlap generation
    # and learning run at the same time, so they split it too (rollout half, learner the rest).
    gen_threads = args.threads // 2 if overlap and args.threads > 1 else args.threads
    learn_threads = args.threads - gen_threads if overlap and args.threads > 1 else args.threads
    overrides = [
        f"run_dir={run_dir}", f"model.path={mdir}", "rollout.engine=hf", f"rollout.num_workers={workers}",
        f"rollout.threads={max(1, gen_threads // workers)}", f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.temperature=1.0", f"rollout.overlap={str(overlap).lower()}", f"learner.threads={learn_threads}",
        "learner.num_ranks=1", f"learner.micro_batch_size={args.micro_batch or max(1, seqs // 4)}", "learner.lr=5.0e-6",
        "learner.lr_schedule=constant", f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
        f"train.samples_per_prompt={args.samples}", "train.max_minutes=null", "eval.num_problems=0",
        "checkpoint.every_steps=0", "progress=false", "report_to=[]", f"rollout.matmul_dtype={matmul_dtype}",
        f"object_store_mb={256 if args.model == 'tiny' else 2048}", *data_overrides(args),
    ]
    return load_config(common.ROOT / "configs" / "grpo_demo.yaml", overrides)


def run_rlkit(args: argparse.Namespace, overlap: bool = False, matmul_dtype: str = "auto") -> dict[str, Any]:
    import torch

    from rlkit.metrics import StageTimer
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    torch.set_num_threads(args.threads)
    run_dir = tempfile.mkdtemp(prefix="e2e-rlkit-")
    cfg = rlkit_config(args, run_dir, overlap, matmul_dtype)
    trainer = Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))
    seen: list = []
    try:
        rt = trainer.runtime
        rt.sync()  # the engines start from the learner's weights, as in Trainer.fit
        collect = rt.collect

        def recording_collect(refs):  # keeps the rollouts' token counts; the work is unchanged
            out = collect(refs)
            seen.append(out)
            return out

        rt.collect = recording_collect
        probes = [common.matmul_gflops(threads=args.threads)]
        timer, metrics, walls = StageTimer(), [], []
        stale_seen = not overlap
        for step in range(args.steps):
            t0 = time.perf_counter()
            m = trainer.step(timer)
            walls.append(time.perf_counter() - t0)
            trainer.state.step += 1
            metrics.append({**m, **timer.pop()})
            stale_seen = stale_seen or m.get("rollout/staleness_mean", 0.0) > 0
            if overlap and step >= 1 and not stale_seen:
                break  # step 2 was generated on-policy: the option is not wired; stop paying for it
        probes.append(common.matmul_gflops(threads=args.threads))
    finally:
        trainer.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    shape = model_shape(common.model_dir(args.model))
    side = "rlkit-overlap" if overlap else "rlkit-bf16mm" if matmul_dtype == "bfloat16" else "rlkit"
    return _rlkit_result(args, side, stale_seen, metrics, walls, seen, shape, probes)


def _rlkit_result(args, side, stale_seen, metrics, walls, seen, shape, probes) -> dict[str, Any]:
    overlap = side == "rlkit-overlap"
    gflops = common.summary(v for p in probes for v in p["values"])["median"]
    steps = []
    for i, (m, wall, rollouts) in enumerate(zip(metrics, walls, seen, strict=True)):
        seqs = [(tuple(r.prompt_ids), len(r.prompt_ids), len(r.completion_ids)) for r in rollouts]
        stages = {k[len("time/"):]: v for k, v in m.items() if k.startswith("time/")}
        # time/score is nested inside time/generate in Trainer.step: generation alone is the difference.
        gen_s = stages.get("generate", 0.0) - stages.get("score", 0.0)
        # The learner's passes: its side passes (old/reference log-probs; none needed here) and the update.
        learn_s = stages.get("learn", 0.0) + stages.get("reference", 0.0)
        stale = overlap and stale_seen and i > 0
        row = step_row(i + 1, wall, None if stale else gen_s, learn_s, seqs, shape, gflops, stages)
        if stale:
            # These samples were generated during the previous step's learning: the stage time is only
            # the wait for them, so it gives no generation rate.
            row["generate_wait_s"] = gen_s
        row["staleness_mean"] = m.get("rollout/staleness_mean")
        row["sync"] = {k: m[k] for k in ("sync/seconds", "sync/bytes") if k in m}
        steps.append(row)
    extra: dict[str, Any] = {"prompt_tokens_mean": sum(s["prefill_tokens"] for s in steps) / max(
        1, len(steps) * args.prompts * args.samples)}
    gaps = [v for m in metrics[1:] for k, v in m.items() if k.endswith("gap/kl")]
    if gaps:
        extra["gap_kl"] = common.summary(gaps)
    if overlap:
        extra["overlap_effective"] = stale_seen
        if not stale_seen:
            extra["note"] = ("rollout.overlap=true ran on-policy (staleness 0 at step 2): the option is in "
                             "rlkit/config.py but Trainer.step does not use it")
    return finish_side(side, steps, shape["params"], probes, **extra)


# ----------------------------------------------------------------------------------------------
# Parent: run the sides back to back, compare, write JSON
# ----------------------------------------------------------------------------------------------


def child_args(args: argparse.Namespace, side: str) -> list[str]:
    return ["--child", side, "--model", args.model, "--steps", str(args.steps), "--prompts", str(args.prompts),
            "--samples", str(args.samples), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
            "--num-train", str(args.num_train), "--num-eval", str(args.num_eval),
            "--rollout-workers", str(args.rollout_workers), "--micro-batch", str(args.micro_batch)]


def compare(rows: list[dict]) -> dict[str, Any]:
    """rlkit/TRL ratios of step time (target ≤ 0.5) and of generated tokens/s."""
    by = {r["side"]: r for r in rows if r.get("ok")}
    out = {}
    if "trl" in by:
        for side in RLKIT_SIDES:
            if side in by:
                out[f"{side}/trl"] = {
                    "step_s": common.ratio_summary(by[side]["step_s"], by["trl"]["step_s"]),
                    "e2e_tokens_per_s": common.ratio_summary(by[side]["e2e_tokens_per_s"],
                                                             by["trl"]["e2e_tokens_per_s"]),
                }
    return out


def print_table(rows: list[dict], ratios: dict, args: argparse.Namespace) -> None:
    print(f"\n{args.model}: {args.prompts} prompts × {args.samples} samples, {args.new_tokens} new tokens, "
          f"threads {args.threads}; summaries over steps 2..{args.steps}: median (min–max)")
    fracs = "  ".join(f"min {k} ≥ {t}" for k, t in TARGET_MIN_FRAC.items())
    print(f"{'side':14} {'step 1 s':>9} {'step s':>22} {'gen s':>18} {'learn s':>18} {'nominal':>8}  {fracs}")
    for r in rows:
        if not r.get("ok"):
            print(f"{r['side']:14} FAILED: {r.get('error')}")
            continue
        w = r["warmup"]["seconds"] if r.get("warmup") else float("nan")
        mins = "  ".join(f"{common.fmt(r['min_frac'][k], '.3f'):>22}" for k in TARGET_MIN_FRAC)
        print(f"{r['side']:14} {w:9.2f} {common.fmt(r['step_s']):>22} {common.fmt(r['generate_s']):>18} "
              f"{common.fmt(r['learn_s']):>18} {common.fmt(r['roofline_frac'], '.3f'):>8}  {mins}")
        if r.get("note"):
            print(f"{'':14} note: {r['note']}")
    for name, rat in ratios.items():
        print(f"{name}: step time {common.fmt(rat['step_s'], '.3f')} (target ≤ {TARGET_STEP_RATIO}), "
              f"end-to-end tokens/s {common.fmt(rat['e2e_tokens_per_s'], '.2f')}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per side (step 1 is warm-up)")
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a HF model folder")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rollout-workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--num-train", type=int, default=4000, help="rows of the arithmetic training split")
    ap.add_argument("--num-eval", type=int, default=200, help="held-out rows (excluded from training)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps, 4 × 4 prompts, 8 tokens")
    ap.add_argument("--out", default=str(common.OUT_DIR), help="folder of e2e.json")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per side")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.prompts, args.samples, args.new_tokens = "tiny", 2, 4, 4, 8
        args.num_train, args.num_eval = 64, 8
    return args


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    if side == "trl":
        return run_trl(args)
    return run_rlkit(args, overlap=side == "rlkit-overlap",
                     matmul_dtype="bfloat16" if side == "rlkit-bf16mm" else "auto")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.emit(run_side(args, args.child))
        return 0
    common.model_dir(args.model)  # build or fetch the folder once, before any timing
    parent_probe = [common.matmul_gflops(threads=args.threads)]
    rows = []
    for side in args.sides.split(","):
        print(f"[e2e] {side} ...", flush=True)
        res = common.run_child("e2e_bench.py", child_args(args, side), args.threads, timeout=args.timeout,
                               log=Path(args.out) / "logs" / f"e2e-{side}.log")
        res["side"] = side
        if not res.get("ok"):
            print(f"[e2e] {side} failed: {res.get('error')}\n{res.get('tail', '')}", file=sys.stderr)
        rows.append(res)
    parent_probe.append(common.matmul_gflops(threads=args.threads))
    ratios = compare(rows)
    print_table(rows, ratios, args)
    path = common.write_result("e2e", {
        "workload": {"model": args.model, "prompts": args.prompts, "samples": args.samples,
                     "new_tokens": args.new_tokens, "steps": args.steps, "threads": args.threads},
        "targets": {"step_ratio_max": TARGET_STEP_RATIO, "min_frac_min": TARGET_MIN_FRAC},
        "matmul_gflops": common.summary(v for p in parent_probe for v in p["values"]),
        "results": rows, "ratios": ratios,
    }, args, Path(args.out))
    print(f"wrote {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
