"""Slide-encoder forward cost vs number of patches: LongNet dilated attention vs full attention.

Released dims (512/1024, 8 heads, 2 layers), eval, no grad, fp32, CPU. Each (mode, N) runs in a fresh
subprocess so peak RSS (``ru_maxrss``) belongs to that run alone; the figure reported is the peak minus the
RSS after model + input were built, i.e. what the forward itself needed.

    python benchmarks/encoder_scaling.py                    # default sizes, prints a markdown table
    python benchmarks/encoder_scaling.py --sizes 1000 10000 --modes dilated
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from slidechat.model.slide_encoder import LongNetEncoder, SlideEncoderConfig

DENSE_NAIVE_LIMIT_GB = 16.0


def worker(mode: str, n: int, repeats: int) -> dict:
    import resource

    import torch

    torch.manual_seed(0)
    if mode == "dilated":
        cfg = SlideEncoderConfig()
    elif mode == "dense":  # one segment spanning the slide, ratio 1 = full softmax attention (fused SDPA kernel)
        cfg = SlideEncoderConfig(segment_lengths=(n,), dilated_ratios=(1,))
    elif mode == "compat":
        cfg = SlideEncoderConfig(compat="slidechat_v1")
    else:
        raise ValueError(mode)
    enc = LongNetEncoder(cfg).eval()
    x = torch.randn(1, n, 512)
    with torch.no_grad():
        enc(x[:, :256])  # warm-up (kernels, allocator) on a small input
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now_kb = _current_rss_kb()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            y = enc(x)
            times.append(time.perf_counter() - t0)
            del y
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n": n, "seconds": min(times), "peak_rss_gb": peak_kb / 2**20,
            "forward_extra_gb": (peak_kb - max(base_kb, rss_now_kb)) / 2**20 if peak_kb > rss_now_kb else 0.0,
            "threads": torch.get_num_threads()}


def _current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def naive_dense_scores_gb(n: int, heads: int = 8) -> float:
    """Memory a dense attention that materialises its N x N fp32 score matrix per head would need."""
    return n * n * heads * 4 / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000, 100000])
    ap.add_argument("--modes", nargs="+", default=["dilated", "dense"], choices=["dilated", "dense", "compat"])
    ap.add_argument("--dense-max-n", type=int, default=50000,
                    help="skip full attention above this N (quadratic time on a 2-core CPU)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="append results as JSON lines here")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return 0
    rows = []
    print("| mode | N patches | forward s | peak RSS GB | forward extra GB | note |")
    print("|---|---:|---:|---:|---:|---|")
    for mode in args.modes:
        for n in args.sizes:
            if mode == "dense" and n > args.dense_max_n:
                print(f"| {mode} | {n} | - | - | - | skipped: quadratic time; a score-materialising dense "
                      f"attention would need {naive_dense_scores_gb(n):.0f} GB |", flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, str(n), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {mode} | {n} | - | - | - | failed: {proc.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            note = ""
            if mode == "dense":
                note = f"fused SDPA (no N x N); naive scores would be {naive_dense_scores_gb(n):.1f} GB"
            print(f"| {mode} | {n} | {r['seconds']:.2f} | {r['peak_rss_gb']:.2f} | {r['forward_extra_gb']:.2f} | "
                  f"{note} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
