"""Weight-sync throughput through rlkit's real path vs a plain memcpy of the same bytes.

    .venv/bin/python bench/sync_bench.py            # SmolLM2-135M (540 MB fp32), buckets 1/8/64/512 MiB
    .venv/bin/python bench/sync_bench.py --quick    # tiny random Llama (26 MB), buckets 1/4/64 MiB

A :class:`rlkit.runtime.Runtime` with one DeepSpeed learner and one HF-engine rollout worker (Ray
local cluster). Three transports: the object store, for each bucket size; the collective (learner
rank 0 broadcasts each bucket over a gloo group of its own, the engine receives into its
parameters; rows "coll N", for each bucket size; NCCL on GPUs runs the same code); and shared
memory (the default when learner and rollout worker share a node: the learner copies its weights
into one of two segments, the worker's engine adopts views of it; the row "shm"). For each object-store bucket size, ``--repeats`` calls of
``Runtime.sync(bucket_bytes=...)``: learner rank 0 clones its weights into buckets and puts each in
the object store, the rollout worker gets them and copies them into its model, then the driver
checks probe checksums. ``sync/seconds`` (transfer, without the checksum check) and ``sync/bytes``
come from the call; bytes/s = bytes ÷ seconds. The wall time of the whole call, checksum check
included, is kept too.

The reference, in this same process and run: ``dst.copy_(src)`` of two uint8 tensors of the same
byte size (``--threads`` torch threads, and 1 thread), i.e. one read + one write of every byte;
ratio = sync bytes/s ÷ memcpy bytes/s of the faster thread count (target ≥ 0.5). One breakdown run
per bucket size splits a sync into the learner's part (clone + ``ray.put``) and the worker's part
(``ray.get`` + load into the model, timed inside the worker). Writes ``bench/out/sync.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_RATIO = 0.5
MiB = 2**20


def memcpy_rate(nbytes: int, repeats: int, threads: int) -> dict[str, Any]:
    """bytes/s of ``dst.copy_(src)`` for ``nbytes``-byte tensors: a summary over repeats."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault in the destination pages before timing
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        rates.append(nbytes / (time.perf_counter() - t0))
    torch.set_num_threads(before)
    return {**common.summary(rates), "threads": threads}


def make_runtime(args: argparse.Namespace, run_dir: str):
    from rlkit.config import load_config
    from rlkit.runtime import Runtime

    mdir = "smollm2" if args.model == "smollm2" else str(common.model_dir(args.model))
    cfg = load_config(common.ROOT / "configs" / "grpo_demo.yaml", [
        f"run_dir={run_dir}", f"model.path={mdir}", "rollout.num_workers=1", "learner.num_ranks=1",
        f"rollout.threads={args.threads}", f"learner.threads={args.threads}", "eval.num_problems=0",
        "progress=false", "report_to=[]", "data.num_train=8", "data.num_eval=0",
        # room for two full copies of the weights (the buckets of one sync, and a lagging release)
        f"object_store_mb={max(256, 3 * args.weight_mb)}",
    ])
    model_dir = str(common.model_dir(args.model))
    return Runtime(cfg, model_dir)


def breakdown(rt, bucket_bytes: int, transport: str = "object") -> dict[str, float]:
    """One sync done by hand through the same actor calls as ``Runtime.sync``, timed per side."""
    import ray

    if transport == "collective":  # both sides run at once: each side's own time of the broadcast
        tr = rt.weight_sync._make("collective")
        layout = ray.get(rt.learners[0].sync_layout.remote(bucket_bytes))
        t0 = time.perf_counter()
        sent = rt.learners[0].collective_send.remote(tr.tag, bucket_bytes)
        got = rt.rollout[0].collective_recv.remote(tr.tag, rt.version, layout)
        state, loaded = ray.get([sent, got])
        t2 = time.perf_counter()
        rt.weight_sync.verify(rt.version, state["sums"])
        return {"learner_pack_put_s": t2 - t0, "worker_get_load_s": loaded["seconds"], "worker_call_s": t2 - t0,
                "buckets": len(layout), "total_s": t2 - t0, "bytes": state["bytes"]}

    if bucket_bytes == 0:  # shared memory
        t0 = time.perf_counter()
        state = ray.get(rt.learners[0].shm_state.remote(rt.weight_sync.transport.tag))
        t1 = time.perf_counter()
        loaded = ray.get(rt.rollout[0].load_shm.remote(rt.version, state["segment"], state["entries"]))
        t2 = time.perf_counter()
        rt.weight_sync.verify(rt.version, state["sums"])
        return {"learner_pack_put_s": t1 - t0, "worker_get_load_s": loaded["seconds"], "worker_call_s": t2 - t1,
                "buckets": 1, "total_s": t2 - t0, "bytes": state["bytes"]}
    t0 = time.perf_counter()
    state = ray.get(rt.learners[0].full_state.remote(bucket_bytes))
    t1 = time.perf_counter()
    loaded = ray.get(rt.rollout[0].load_buckets.remote(rt.version, state["refs"]))
    t2 = time.perf_counter()
    n_buckets = len(state.pop("refs"))  # dropping the refs releases the buckets, as Runtime.sync does
    rt.weight_sync.verify(rt.version, state["sums"])
    return {"learner_pack_put_s": t1 - t0, "worker_get_load_s": loaded["seconds"], "worker_call_s": t2 - t1,
            "buckets": n_buckets, "total_s": t2 - t0, "bytes": state["bytes"]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Syncs per bucket size, then the memcpy reference of the same byte count."""
    rows = []
    run_dir = tempfile.mkdtemp(prefix="sync-bench-")
    rt = make_runtime(args, run_dir)
    try:
        rt.sync(transport="object")  # warm-up: first object-store allocations, first load into the engine
        shm = rt.weight_sync._choose().name == "shm"
        if shm:
            rt.sync(transport="shm")  # warm-up: create both segments, fault in their pages
            rt.sync(transport="shm")
        rt.sync(transport="collective")  # warm-up: build the gloo group, first broadcast
        cases = ([("object", mib) for mib in args.buckets] + [("collective", mib) for mib in args.buckets]
                 + ([("shm", 0)] if shm else []))
        for transport, mib in cases:
            seconds, walls, nbytes = [], [], 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                m = rt.sync(bucket_bytes=int(mib * MiB), transport=transport)
                walls.append(time.perf_counter() - t0)
                seconds.append(m["sync/seconds"])
                nbytes = m["sync/bytes"]
            rate = common.summary(nbytes / s for s in seconds)
            rows.append({"bucket_mib": mib, "transport": transport, "bytes": nbytes, "seconds": common.summary(seconds),
                         "bytes_per_s": rate, "wall_with_check_s": common.summary(walls),
                         "breakdown": breakdown(rt, int(mib * MiB), transport)})
            label = "shared memory" if transport == "shm" else f"{transport} bucket {mib:g} MiB"
            print(f"[sync] {label}: {common.fmt(rate, '.3g', 1e-9)} GB/s", flush=True)
    finally:
        rt.shutdown()
    nbytes = int(rows[0]["bytes"])
    mem = memcpy_rate(nbytes, args.repeats * 2, args.threads)
    mem1 = memcpy_rate(nbytes, args.repeats * 2, 1)
    # The reference is the faster of the two thread counts: what a plain copy achieves here.
    ref = max((mem, mem1), key=lambda s: s["median"])
    for r in rows:
        r["ratio_vs_memcpy"] = common.ratio_summary(r["bytes_per_s"], ref)
    return {"bytes": nbytes, "memcpy": mem, "memcpy_1thread": mem1, "memcpy_reference_threads": ref["threads"],
            "buckets": rows}


def print_table(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.model}: {res['bytes'] / MiB:.1f} MiB per sync, {args.repeats} repeats, median (min–max)")
    print(f"memcpy ({res['memcpy']['threads']} threads): {common.fmt(res['memcpy'], '.3g', 1e-9)} GB/s; "
          f"1 thread: {common.fmt(res['memcpy_1thread'], '.3g', 1e-9)} GB/s; ratios use "
          f"{res['memcpy_reference_threads']} thread(s)")
    print(f"{'bucket MiB':>10} {'sync s':>22} {'GB/s':>22} {'× memcpy':>22} {'learner s':>10} {'worker s':>9}")
    for r in res["buckets"]:
        b = r["breakdown"]
        label = {"shm": "shm", "collective": f"coll {r['bucket_mib']:g}"}.get(r.get("transport"), f"{r['bucket_mib']:g}")
        print(f"{label:>10} {common.fmt(r['seconds'], '.3f'):>22} "
              f"{common.fmt(r['bytes_per_s'], '.3g', 1e-9):>22} {common.fmt(r['ratio_vs_memcpy'], '.3f'):>22} "
              f"{b['learner_pack_put_s']:10.3f} {b['worker_get_load_s']:9.3f}")
    print(f"target: ≥ {TARGET_RATIO} × memcpy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a HF model folder")
    ap.add_argument("--buckets", default="1,8,64,512", help="bucket sizes in MiB, comma list")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model, buckets 1/4/64 MiB, 3 repeats")
    ap.add_argument("--ray-zero-copy", action="store_true",
                    help="set RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 in every Ray process (Ray ≥ 2.4x: torch tensors "
                         "are read from the object store without a deserialization copy)")
    ap.add_argument("--out", default=str(common.OUT_DIR), help="folder of sync.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.buckets, args.repeats = "tiny", "1,4,64", 3
    args.buckets = [float(x) for x in str(args.buckets).split(",")]
    mdir = common.model_dir(args.model)
    args.weight_mb = int(sum(f.stat().st_size for f in Path(mdir).glob("*.safetensors")) / MiB) + 1
    # Before torch and Ray start: the actors inherit this environment (thread counts, offline).
    os.environ.update({k: v for k, v in common.bench_env(args.threads).items() if k != "PYTHONPATH"})
    if args.ray_zero_copy:
        os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    res = measure(args)
    print_table(res, args)
    path = common.write_result("sync", {"target_ratio_min": TARGET_RATIO, **res}, args, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
