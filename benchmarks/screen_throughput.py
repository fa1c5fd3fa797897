#!/usr/bin/env python
"""Screening throughput: fields/s of ``slidechat screen`` scoring on the tiny Qwen2-VL at batch 1 vs 8,
and the share of time spent reading fields vs running the model, in one run.

Also times the stock batched forward (``model(**batch)``, all images of a batch packed into one
vision sequence) against the screening scorer's per-image vision tower on the same batch of 8, the
reason the scorer runs the vision tower image by image.

    .venv/bin/python benchmarks/screen_throughput.py [--slides 2] [--size 2048] [--field-size 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048, help="slide side in px at 0.5 µm/px")
    ap.add_argument("--field-size", type=int, default=512)
    ap.add_argument("--image-max-pixels", type=int, default=768 * 768)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", help="folder for slides/model (default: a temporary folder)")
    a = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from slidechat.data.synthetic_cytology import write_cytology_slides
    from slidechat.apps.screening import ScreenOptions, screen_slide
    from slidechat.inference.field_scorer import FieldModel
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    work = Path(a.work or tempfile.mkdtemp(prefix="screen_bench_"))
    if not (work / "slides" / "labels.csv").is_file():
        write_cytology_slides(work / "slides", n_slides=a.slides, seed=7, width=a.size, height=a.size)
    model_dir = work / "tiny" if (work / "tiny" / "config.json").is_file() else \
        make_tiny_qwen2vl(work / "tiny", seed=0)
    slides = sorted((work / "slides" / "slides").glob("*.svs"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}; {len(slides)} slides {a.size}x{a.size} @0.5 µm/px, "
          f"fields {a.field_size} px @0.5 µm/px, image_max_pixels {a.image_max_pixels}")
    base = ScreenOptions(field_size=a.field_size, target_mpp=0.5, progress=False,
                         image_max_pixels=a.image_max_pixels, device=a.device)
    scorer = FieldModel(model_dir, opts=base)
    # warm-up
    screen_slide(slides[0], scorer, base)
    rows = []
    for bs in [int(v) for v in a.batch_sizes.split(",")]:
        opts = ScreenOptions(**{**base.__dict__, "batch_size": bs})
        scorer.opts = opts
        n = 0
        t_read = t_model = t_plan = 0.0
        t0 = time.perf_counter()
        for p in slides:
            r = screen_slide(p, scorer, opts)
            n += len(r.rows)
            t_read += r.timings["read_s"]
            t_model += r.timings["model_s"]
            t_plan += r.timings["plan_s"]
        wall = time.perf_counter() - t0
        rows.append((bs, n, n / wall, n / t_model, t_plan, t_read, t_model, wall))
    print("\n| batch | fields | fields/s (end to end) | fields/s (model only) | plan+detector s | read s | "
          "model s | read share | model share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bs, n, fps, mfps, tp, tr, tm, wall in rows:
        print(f"| {bs} | {n} | {fps:.2f} | {mfps:.2f} | {tp:.2f} | {tr:.2f} | {tm:.2f} | "
              f"{100 * tr / wall:.1f}% | {100 * tm / wall:.1f}% |")
    if len(rows) >= 2:
        print(f"\nbatch {rows[-1][0]} vs batch {rows[0][0]}: {rows[-1][2] / rows[0][2]:.2f}x end to end, "
              f"{rows[-1][3] / rows[0][3]:.2f}x model only")

    # stock packed forward vs per-image vision tower, same 8 images
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (a.field_size, a.field_size, 3), dtype=np.uint8))
            for _ in range(8)]
    batch = scorer._batch(scorer.prompt_text, imgs)
    stock, ours = [], []
    for _ in range(3):  # medians of 3: the machine may be shared
        with torch.inference_mode():
            scorer.model.rope_deltas = None
            t0 = time.perf_counter()
            scorer.model(**batch, use_cache=False)
            stock.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scorer.logits_from_batch(batch)
        ours.append(time.perf_counter() - t0)
    t_stock, t_ours = float(np.median(stock)), float(np.median(ours))
    t0 = time.perf_counter()
    scorer._batch(scorer.prompt_text, imgs)
    t_proc = time.perf_counter() - t0
    print(f"\nsame batch of 8 prepared fields: stock model(**batch) {t_stock:.2f} s, scorer "
          f"(per-image vision tower + forward) {t_ours:.2f} s; preparing the batch (LLaMA-Factory "
          f"scaling + Qwen2-VL processor) {t_proc:.2f} s")


if __name__ == "__main__":
    main()
