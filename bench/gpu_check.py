"""``make gpu-check``: the GPU pieces that need neither Ray nor vLLM, in plain processes, one JSON report.

    python bench/gpu_check.py [--dry] [--out bench/out/gpu_check.json]

On a CUDA machine it measures (docs/gpu.md § make gpu-check):

* ``triton``: :mod:`rlkit.kl_triton`'s row kernels against the torch path (``rlkit.kl_fused._row_stats``
  / ``_row_dlogits``) at SmolLM2's and a 7B model's vocabulary: values, logit gradients, time, peak
  memory and the fraction of the HBM-bandwidth roofline the kernels reach.
* ``fused_bf16``: the fused log-prob pass (``fused_token_logprobs``) from bf16 inputs on CUDA against
  fp64, values and gradients, and its time.
* ``learner``: one learner update (:class:`rlkit.workers.learner.LearnerRank`: DeepSpeed on a world
  of one, NCCL with bf16 on CUDA) against the same update on CPU (gloo, fp32), each in a child
  process: loss, the update's cosine and relative difference.
* ``hf_engine``: the HF engine generating on CUDA (tokens/s) and its sampled log-probs against the
  learner's forward of the same tokens (:func:`rlkit.workers.learner.stats_on_device`).
* ``ipc``: the IPC weight-sync transport between two processes on the one GPU (learner side
  :func:`rlkit.workers.weights.ipc_state`, engine side ``RolloutWorker.load_ipc`` in a spawned child),
  checksums verified, GB/s against a device-to-device copy of the same bytes.

``--dry`` runs every section on CPU at tiny sizes through its CPU twin: the Triton kernels under
``TRITON_INTERPRET=1``, the learner update over gloo in fp32, the HF engine on CPU, and the
shared-memory transport (``weights.shm_state`` → ``RolloutWorker.load_shm``) in place of IPC. The
report lists under ``not_run`` what the lent machine cannot run (two-GPU NCCL, vLLM on CUDA).
Every section records ``ok`` and its error instead of stopping the others; the exit status is 1 when
any section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if "--dry" in sys.argv:  # read by triton when it is first imported (transformers imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
"""Peak memory bandwidth by GPU model (vendor data sheets), for the roofline fraction."""

NOT_RUN = {
    "nccl_two_gpus": "the lent machine has one GPU: the NCCL collective transport between two GPUs and "
                     "multi-rank learner groups over NCCL need two",
    "vllm_cuda": "vLLM is not installed on the lent machine (its wheel is larger than what a run can carry)",
    "ray": "Ray is not installed on the lent machine: the roles run here as plain processes",
}


def sizes(dry: bool) -> dict:
    if dry:
        return {"rows": [{"name": "tiny", "rows": 4, "vocab": 4500}],
                "fused": {"n": 40, "d": 32, "v": 2100, "chunk": 16},
                "model": {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 128},
                "gen": {"prompts": 2, "n": 2, "new": 6}, "repeats": 1}
    return {"rows": [{"name": "smollm2", "rows": 1024, "vocab": 49152},
                     {"name": "7b-like", "rows": 1024, "vocab": 152064}],
            "fused": {"n": 4096, "d": 3584, "v": 152064, "chunk": 1024},
            "model": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536},
            "gen": {"prompts": 16, "n": 8, "new": 128}, "repeats": 5}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (Triton compiles here)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def _peak(device: str, fn) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def _hbm(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)


def _maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().nan_to_num(0.0).max())


# ------------------------------------------------------------------------------------ sections
def check_triton(device: str, sz: dict) -> dict:
    from rlkit import kl_fused, kl_triton

    if not kl_triton.available(device):
        raise RuntimeError(f"rlkit.kl_triton is not available on {device} (needs triton; on CPU TRITON_INTERPRET=1)")
    out = {"interpreter": kl_triton.interpreting(), "shapes": []}
    bw = _hbm(device)
    for shape in sz["rows"]:
        g = torch.Generator().manual_seed(0)
        c, v = shape["rows"], shape["vocab"]
        z = (torch.randn(c, v, generator=g) * 3).to(device)
        r = torch.log_softmax(torch.randn(c, v, generator=g) * 3, -1).to(device)
        y = torch.randint(0, v, (c,), generator=g).to(device)
        ones = torch.ones(c, device=device)
        row = {"name": shape["name"], "rows": c, "vocab": v}
        for dtype in (torch.float32, torch.bfloat16):
            zz = z.to(dtype)

            def run(stats, dlogits, zz=zz, y=y, r=r, ones=ones):
                p, lse, logp, ez, kl = stats(zz.clone(), y, r, "forward", True)
                grad = dlogits(zz.clone(), p, y, lse, ez, kl, r, "forward", ones, ones, ones)
                return logp, kl, grad

            t_tri, (lp_t, kl_t, g_t) = _timed(lambda: run(kl_triton.row_stats, kl_triton.row_dlogits), device, sz["repeats"])
            t_tor, (lp_o, kl_o, g_o) = _timed(lambda: run(kl_fused._row_stats, kl_fused._row_dlogits), device, sz["repeats"])
            # Bytes the kernels must move: z and r read in the stats pass, read again and G written
            # in the gradient pass (the clones of z are the caller's, counted for both paths).
            moved = (2 * zz.numel() + 2 * r.numel()) * zz.element_size() + zz.numel() * zz.element_size()
            key = "fp32" if dtype == torch.float32 else "bf16"
            row[key] = {
                "max_abs_diff": {"logp": _maxdiff(lp_t, lp_o), "kl": _maxdiff(kl_t, kl_o), "dlogits": _maxdiff(g_t, g_o)},
                "seconds": {"triton": t_tri, "torch": t_tor}, "speedup": t_tor / t_tri,
                "peak_bytes": {"triton": _peak(device, lambda: run(kl_triton.row_stats, kl_triton.row_dlogits)),
                               "torch": _peak(device, lambda: run(kl_fused._row_stats, kl_fused._row_dlogits))},
                "hbm_roofline_fraction": (moved / t_tri / bw) if bw else None,
            }
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            if max(row[key]["max_abs_diff"].values()) > tol * max(1.0, float(z.abs().max())):
                raise AssertionError(f"triton vs torch {key} at {shape['name']}: {row[key]['max_abs_diff']}")
        out["shapes"].append(row)
    return out


def check_fused_bf16(device: str, sz: dict) -> dict:
    from rlkit import kl_fused

    f = sz["fused"]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(f["n"], f["d"], generator=g)
    W = torch.randn(f["v"], f["d"], generator=g) * f["d"] ** -0.5
    y = torch.randint(0, f["v"], (f["n"],), generator=g)
    adv = torch.randn(f["n"], generator=g)

    def run(hh, WW, dev):
        hh = hh.to(dev).requires_grad_()
        WW = WW.to(dev).requires_grad_()
        out = kl_fused.fused_token_logprobs(hh, WW, y.to(dev), temperature=0.8, chunk_size=f["chunk"], with_entropy=True)
        gh, gW = torch.autograd.grad((adv.to(dev) * out.logp_N).sum() - 0.1 * out.entropy_N.sum(), (hh, WW))
        return out.logp_N, gh, gW

    hb, Wb = h.to(torch.bfloat16), W.to(torch.bfloat16)
    secs, got = _timed(lambda: run(hb, Wb, device), device, sz["repeats"])
    # fp64 reference from the same rounded inputs, on the CPU (exact enough at any size here).
    n_ref = min(f["n"], 256)
    want = run(hb[:n_ref].double(), Wb.double(), "cpu")
    diffs = {"logp": _maxdiff(got[0][:n_ref].cpu(), want[0])}
    tokens = f["n"]
    res = {"shape": f, "seconds": secs, "tokens_per_s": tokens / secs, "max_abs_diff": diffs,
           "peak_bytes": _peak(device, lambda: run(hb, Wb, device)), "dtype": "bfloat16"}
    if f["n"] == n_ref:  # gradients compare only when the reference saw every row
        res["max_abs_diff"].update(dh=_maxdiff(got[1].cpu(), want[1]), dW=_maxdiff(got[2].cpu(), want[2]))
    if diffs["logp"] > 0.1:
        raise AssertionError(f"fused bf16 log-probs off by {diffs['logp']}")
    return res


def model_folder(where: Path, sz: dict, tokenizer: str | None) -> Path:
    """A random-weight Llama folder of ``sz['model']``'s shape with SmolLM2's tokenizer."""
    from rlkit.assets import tiny_model_dir, tokenizer_dir

    m = sz["model"]
    tok = tokenizer or tokenizer_dir()
    return Path(tiny_model_dir(where, hidden=m["hidden"], layers=m["layers"], heads=m["heads"],
                               kv_heads=m["kv_heads"], tokenizer=tok))


def _batch(model_dir: Path, sz: dict, seed: int = 0):
    """A GRPO-shaped training batch (random completions) on the CPU."""
    from rlkit.types import Rollout, collate

    g = torch.Generator().manual_seed(seed)
    gen = sz["gen"]
    rollouts, rewards = [], []
    for p in range(gen["prompts"]):
        prompt = torch.randint(10, 1000, (8,), generator=g).tolist()
        for _ in range(gen["n"]):
            comp = torch.randint(10, 1000, (gen["new"],), generator=g).tolist()
            rollouts.append(Rollout(prompt, comp, [-5.0] * len(comp), "length", 0, p, p))
            rewards.append(float(torch.rand((), generator=g) > 0.5))
    return collate(rollouts, rewards, pad_id=0, version=0)


def learner_child(model_dir: str, device: str, sz: dict) -> dict:
    """One update of a world-of-one learner on this process's device; the update vector's summary."""
    from rlkit.config import load_config
    from rlkit.workers.learner import LearnerRank, LearnerSpec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = _batch(Path(model_dir), sz)
    cfg = load_config(None, [f"model.path={model_dir}", "learner.lr=1e-3", f"learner.micro_batch_size={b.size}",
                             "learner.zero_stage=0", f"train.prompts_per_step={sz['gen']['prompts']}",
                             f"train.samples_per_prompt={sz['gen']['n']}", "algorithm.name=grpo",
                             "algorithm.args={beta: 0.0}", "learner.threads=1"])
    rank = LearnerRank(0, 1, "127.0.0.1", port, LearnerSpec.from_config(cfg, model_dir))
    before = rank.param_vector().double().cpu().clone()
    rank.set_batch(b)
    rank.side_passes()
    adv = (b.rewards_B - b.rewards_B.mean())[:, None] * b.response_mask_B_T
    _sync(device)
    t0 = time.perf_counter()
    metrics = rank.train(adv, {})
    _sync(device)
    secs = time.perf_counter() - t0
    delta = rank.param_vector().double().cpu() - before
    path = Path(tempfile.mkdtemp()) / "delta.pt"
    torch.save(delta.float(), path)
    return {"device": str(rank.device), "dtype": "bfloat16" if rank.engine.bfloat16_enabled() else "float32",
            "seconds": secs, "update_norm": float(delta.norm()), "delta_path": str(path),
            "skipped": metrics.get("learn/skipped_updates"), "grad_norm": metrics.get("learn/grad_norm")}


def _child(part: str, device: str, args: list[str], timeout: float = 600) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {part} on {device} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][6:])


def check_learner(device: str, sz: dict, model_dir: Path, dry: bool) -> dict:
    sz_json = json.dumps(sz)
    runs = {"cpu": _child("learner", "cpu", [str(model_dir), sz_json])}
    if not dry:
        runs["cuda"] = _child("learner", "cuda", [str(model_dir), sz_json])
    for r in runs.values():
        if not r["update_norm"] > 0 or r["skipped"]:
            raise AssertionError(f"the update was not applied: {r}")
    out = {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "delta_path"} for k, v in runs.items()}}
    if "cuda" in runs:
        a, c = (torch.load(runs[k]["delta_path"]).double() for k in ("cuda", "cpu"))
        out["update_cosine_cuda_vs_cpu"] = float(torch.nn.functional.cosine_similarity(a, c, dim=0))
        out["update_rel_diff"] = float((a - c).norm() / c.norm())
        out["speedup_cuda_vs_cpu"] = runs["cpu"]["seconds"] / runs["cuda"]["seconds"]
    return out


def check_hf_engine(device: str, sz: dict, model_dir: Path) -> dict:
    from rlkit.types import Rollout, SamplingConfig, collate
    from rlkit.workers.hf_engine import HFEngine
    from rlkit.workers.learner import load_frozen, stats_on_device

    out = {}
    for dtype in ("float32", "bfloat16") if device == "cuda" else ("float32",):
        eng = HFEngine(str(model_dir), dtype=dtype, threads=1, device=device, batch_size=256)
        gen = sz["gen"]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=gen["new"])
        prompts = [list(range(20 + i, 28 + i)) for i in range(gen["prompts"])]
        secs, gens = _timed(lambda eng=eng, prompts=prompts, gen=gen, sampling=sampling:
                            eng.generate(prompts, gen["n"], sampling, seed=0), device, max(1, sz["repeats"] // 2))
        tokens = sum(len(g.completion_ids) for g in gens)
        # The learner's forward of the same tokens (fp32, on the same device).
        learner = load_frozen(str(model_dir), "float32", torch.device(device))
        rolls = [Rollout(g.prompt_ids, g.completion_ids, g.logprobs, g.finish_reason, 0, i, i) for i, g in enumerate(gens)]
        b = collate(rolls, [0.0] * len(rolls), pad_id=eng.pad_id, version=0)
        lp = stats_on_device(learner, b, temperature=1.0, chunk_size=1024)["logp"]
        mask = b.response_mask_B_T.bool()
        gap = (b.sampler_logp_B_T - lp)[mask].abs()
        out[dtype] = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
                      "logp_gap_max": float(gap.max()), "logp_gap_mean": float(gap.mean())}
        if dtype == "float32" and out[dtype]["logp_gap_max"] > 1e-3:
            raise AssertionError(f"engine vs learner log-probs: {out[dtype]}")
        eng.close()
    return out


def ipc_child(queue, done, model_dir: str, kind: str) -> None:
    """The engine side: a RolloutWorker with the HF engine on this GPU (or CPU for the shm twin)."""
    from rlkit.workers.rollout import RolloutWorker

    try:
        w = RolloutWorker(model_dir, engine="hf", dtype="float32", threads=1)
        msg = queue.get()
        if kind == "ipc":
            res = w.load_ipc(1, msg["buckets"])
        else:
            res = w.load_shm(1, msg["segment"], msg["entries"])
        res["sums"] = w.engine.tensor_checksum(msg["names"])
        done.put(res)
    except Exception:  # noqa: BLE001 -- reported to the parent
        done.put({"error": traceback.format_exc()})


def ipc_transfer(model_dir: Path, device: str) -> dict:
    """Learner side in this process, engine side in a spawned child: the IPC transport on CUDA, its
    shared-memory twin on CPU. Returns bytes, seconds, GB/s and whether every checksum matched."""
    import multiprocessing as mp

    from transformers import AutoModelForCausalLM

    from rlkit.workers import weights

    kind = "ipc" if device == "cuda" else "shm"
    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)  # differ from the child's copy, so a transfer that did nothing is caught
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=ipc_child, args=(queue, done, str(model_dir), kind))
    child.start()
    slot: dict = {}
    try:
        if kind == "ipc":
            state = weights.ipc_state(policy, 0, 64 << 20)
            queue.put({"buckets": state["buckets"], "names": state["names"]})
        else:
            state = weights.shm_state(policy, 0, 0, slot, f"gpuchk{os.getpid()}")
            queue.put({"segment": state["segment"], "entries": state["entries"], "names": state["names"]})
        res = done.get(timeout=600)
    finally:
        child.join(timeout=60)
        if slot.get("writer") is not None:
            slot["writer"].close()
    if "error" in res:
        raise RuntimeError(res["error"])
    bad = [n for n in state["names"] if abs(res["sums"][n] - state["sums"][n]) > 1e-6 * max(1.0, abs(state["sums"][n]))]
    note = ("the HF engine adopts views of the segment (no copy): a lower bound on the time"
            if kind == "shm" else "the engine copies device to device from the opened handles")
    return {"transport": kind, "note": note, "bytes": state["bytes"], "seconds": res["seconds"],
            "gb_per_s": state["bytes"] / res["seconds"] / 1e9, "checksums_match": not bad, "mismatched": bad[:5]}


def check_ipc(device: str, model_dir: Path) -> dict:
    res = ipc_transfer(model_dir, device)
    src = torch.empty(int(res["bytes"]) // 4, device=device)
    dst = torch.empty_like(src)
    secs, _ = _timed(lambda: dst.copy_(src), device, 5)
    res["copy_gb_per_s"] = res["bytes"] / secs / 1e9
    res["fraction_of_copy"] = res["gb_per_s"] / res["copy_gb_per_s"]
    if not res["checksums_match"]:
        raise AssertionError(f"{res['transport']} sync: checksums differ for {res['mismatched']}")
    return res


# ------------------------------------------------------------------------------------ driver
def run(dry: bool, tokenizer: str | None = None) -> dict:
    device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    sz = sizes(dry or device == "cpu")
    from bench.common import machine

    report: dict = {"bench": "gpu_check", "schema": 1, "dry": dry, "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                    "machine": machine(), "sections": {}, "not_run": dict(NOT_RUN)}
    if device == "cpu" and not dry:
        report["not_run"]["cuda"] = "no CUDA device visible: ran the CPU twins at tiny sizes"
    work = Path(tempfile.mkdtemp(prefix="rlkit-gpu-check-"))

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            report["sections"][name] = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001 -- one failing section must not hide the others
            report["sections"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
        report["sections"][name]["wall_s"] = time.perf_counter() - t0
        print(f"gpu-check {name}: {'ok' if report['sections'][name]['ok'] else 'FAILED'} "
              f"({report['sections'][name]['wall_s']:.1f} s)", flush=True)

    section("triton", lambda: check_triton(device, sz))
    section("fused_bf16", lambda: check_fused_bf16(device, sz))
    model_dir: list[Path] = []
    section("model", lambda: {"path": str(model_dir.append(model_folder(work / "model", sz, tokenizer))
                                          or model_dir[0]), "shape": sz["model"]})
    if model_dir:
        section("learner", lambda: check_learner(device, sz, model_dir[0], dry or device == "cpu"))
        section("hf_engine", lambda: check_hf_engine(device, sz, model_dir[0]))
        section("ipc", lambda: check_ipc(device, model_dir[0]))
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        # The only child part: "learner" (model folder, sizes as JSON).
        model_dir, sz = argv[2], json.loads(argv[3])
        res = learner_child(model_dir, "cuda" if torch.cuda.is_available() else "cpu", sz)
        print("CHILD " + json.dumps(res), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU twins at tiny sizes (runs in the test suite)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check.json"))
    p.add_argument("--tokenizer", default=None, help="folder with SmolLM2's tokenizer (default: rlkit's cached one)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    report = run(args.dry, args.tokenizer)
    report["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu-check: {'OK' if report['ok'] else 'FAILED'} in {report['wall_s']:.0f} s → {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
