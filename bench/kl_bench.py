"""Benchmark of the token log-prob pass, forward + backward, on CPU in fp32.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kl_bench.py            # N=4096, D=576, V=49152
    OMP_NUM_THREADS=2 .venv/bin/python bench/kl_bench.py --quick    # small sizes, seconds

Loss for every variant: L = −Σ_n a_n·log π(y_n)/N (a policy-gradient loss), gradients wrt the hidden
states and the LM-head weight. Variants:
  naive      logits = h Wᵀ → log_softmax → gather, autograd
  trl        logits = h Wᵀ → trl.trainer.utils.selective_log_softmax, autograd (skipped without trl)
  fused      rlkit.kl.fused_token_loss: chunked, gradient contracted in the forward (3 matmuls)
  fused-rc   rlkit.kl.fused_token_logprobs: chunked, backward recomputes the logits (4 matmuls)
Each variant runs in a fresh subprocess; peak extra memory is the rise of the process's peak
resident set (VmHWM, reset after the inputs are built) over its resident set before the pass.
Ratios are against the faster of naive and trl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("naive", "trl", "fused", "fused-rc")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _loss_fn(variant: str, h, W, y, adv, chunk):
    import torch

    n = h.shape[0]
    if variant in ("naive", "trl"):
        logits = h @ W.t()
        if variant == "naive":
            logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
        else:
            from trl.trainer.utils import selective_log_softmax
            logp = selective_log_softmax(logits, y)
        return -(adv * logp).sum() / n
    from rlkit.kl_fused import fused_token_logprobs, fused_token_loss

    if variant == "fused":
        loss, _ = fused_token_loss(h, W, y, lambda rows, lp, e, k: -adv[rows] * lp / n, chunk_size=chunk)
        return loss
    return -(adv * fused_token_logprobs(h, W, y, chunk_size=chunk).logp_N).sum() / n


def run_one(variant: str, n: int, d: int, v: int, threads: int, chunk: int | None) -> dict:
    """Build inputs, run forward + backward once, report seconds, peak extra bytes and checksums."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(v, d, generator=g) * d ** -0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    # warm up kernels and thread pools at a tiny size so the timed pass measures steady state
    h8, w64 = h[:8].detach().requires_grad_(), W[:64].detach().requires_grad_()
    _loss_fn(variant, h8, w64, y[:8] % 64, adv[:8], chunk).backward()
    base = _rss_bytes("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    loss = _loss_fn(variant, h, W, y, adv, chunk)
    loss.backward()
    secs = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    return {"variant": variant, "seconds": secs, "peak_extra": max(peak - base, 0), "exact_peak": exact_peak,
            "loss": loss.item(), "gh": h.grad.norm().item(), "gw": W.grad.norm().item()}


def _spawn(variant: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", variant, "--n", str(args.n), "--d", str(args.d), "--v", str(args.v),
           "--threads", str(args.threads)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(f"[{variant}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--v", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="rows per chunk for rlkit (default: auto)")
    ap.add_argument("--quick", action="store_true", help="N=512, V=8192")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.v = 512, 8192
    if args.child:
        print(json.dumps(run_one(args.child, args.n, args.d, args.v, args.threads, args.chunk)))
        return 0
    try:
        import trl.trainer.utils  # noqa: F401
        has_trl = True
    except ImportError:
        has_trl = False
    rows = []
    for variant in args.variants.split(","):
        if variant == "trl" and not has_trl:
            print("trl not installed: skipping the trl variant")
            continue
        res = _spawn(variant, args)
        if res is not None:
            rows.append(res)
    print(f"N={args.n} D={args.d} V={args.v} fp32 CPU threads={args.threads} (forward + backward)")
    baselines = [r for r in rows if r["variant"] in ("naive", "trl")]
    best_t = min((r["seconds"] for r in baselines), default=None)
    best_m = min((r["peak_extra"] for r in baselines if r["seconds"] == best_t), default=None)
    print(f"{'variant':10s} {'time s':>8s} {'peak MB':>9s} {'t ratio':>8s} {'mem ratio':>9s} "
          f"{'loss':>12s} {'|dh|':>10s} {'|dW|':>10s}")
    for r in rows:
        tr = f"{r['seconds'] / best_t:8.2f}" if best_t else f"{'-':>8s}"
        mr = f"{r['peak_extra'] / best_m:9.3f}" if best_m else f"{'-':>9s}"
        print(f"{r['variant']:10s} {r['seconds']:8.2f} {r['peak_extra'] / 2**20:9.0f} {tr} {mr} "
              f"{r['loss']:12.6f} {r['gh']:10.6f} {r['gw']:10.6f}")
    if rows and not all(r["exact_peak"] for r in rows):
        print("note: VmHWM could not be reset; peaks include the inputs' set-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
