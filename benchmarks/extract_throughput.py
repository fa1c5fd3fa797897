#!/usr/bin/env python
"""Extraction throughput vs the raw OpenSlide decode limit, on one large synthetic slide.

Prints patches/s for (a) raw ``read_region`` of exactly the pipeline's patches in N processes and
(b) the whole pipeline (``extract_slide_features``, tiny_test encoder, N reader workers), plus their
ratio. Target: pipeline >= 80 % of the decode limit. No timing assertions live in tests; this is it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np


def _decode(args):
    path, coords, level, size = args
    import openslide

    o = openslide.OpenSlide(path)
    t = time.perf_counter()
    for x, y in coords:
        np.asarray(o.read_region((int(x), int(y)), level, (size, size)))[..., :3].copy()
    return time.perf_counter() - t


def decode_rate(path: str, coords: np.ndarray, level: int, size: int, procs: int) -> float:
    chunks = np.array_split(coords, procs)
    t = time.perf_counter()
    if procs == 1:
        _decode((path, chunks[0], level, size))
    else:
        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_decode, [(path, c, level, size) for c in chunks])
    return len(coords) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="work_dirs/bench_extract")
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--height", type=int, default=10240)
    ap.add_argument("--base-magnification", type=float, default=20.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    from slidechat.features.encoders import build_encoder
    from slidechat.features.pipeline import extract_slide_features
    from slidechat.wsi.synthetic import SlideSpec, write_slide

    work = Path(a.work)
    slide = work / f"bench_{a.width}x{a.height}_{a.base_magnification:g}x.svs"
    if not slide.is_file():
        t = time.perf_counter()
        write_slide(slide, SlideSpec(slide.stem, "tumor", a.width, a.height, 10 / a.base_magnification, 7))
        print(f"wrote {slide} in {time.perf_counter() - t:.0f}s")
    enc = build_encoder("tiny_test")
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}")
    print(f"slide {a.width}x{a.height} @ {a.base_magnification:g}x, target 224 px @ 20x, tiny_test")
    print("| reader procs | run reads | patches | decode limit (patch/s) | pipeline encode stage (patch/s) "
          "| pipeline end-to-end (patch/s) | encode/decode |")
    print("|---|---|---|---|---|---|---|")
    for nw in a.workers:
        for runs in (False, True):
            best_dec = best_pipe = best_e2e = 0.0
            for _ in range(a.repeats):
                t = time.perf_counter()
                feats, coords, info = extract_slide_features(slide, enc, num_workers=nw,
                                                             batch_size=a.batch_size, progress=False,
                                                             run_reads=runs)
                e2e = len(coords) / (time.perf_counter() - t)
                g = info["grid"]
                dec = decode_rate(str(slide), coords, g["read_level"], g["read_size"], max(nw, 1))
                best_dec = max(best_dec, dec)
                best_pipe = max(best_pipe, info["timings"]["patches_per_s"])
                best_e2e = max(best_e2e, e2e)
            print(f"| {nw} | {runs} | {len(coords)} | {best_dec:.0f} | {best_pipe:.0f} | {best_e2e:.0f} "
                  f"| {best_pipe / best_dec:.0%} |")


if __name__ == "__main__":
    main()
