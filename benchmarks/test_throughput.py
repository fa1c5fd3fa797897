"""SlideBench test throughput: rows/s at batch 1 vs batch 8 on the same file, one process (CPU).

Runs the real test path (mmengine Runner from ``configs/tiny/stage_2.py``, SlideBench test loop,
writer, scoring) on a small Qwen2 (random weights) and random H5 features, timing ``runner.test()``
only (model/runner construction excluded). Generation is made to dominate: a few LLM layers,
``max_new_tokens`` 32, 32-64 patches per slide (``--patches 200 600`` shows the prefill-bound case). Prints a Markdown table.

    .venv/bin/python benchmarks/test_throughput.py [--rows 16] [--patches 32 64] [--layers 4] [--threads 1]

(Not a pytest test: no function here is collected.)
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "stage_2.py"


def make_inputs(root: Path, rows: int, patches: tuple, hidden: int, layers: int, seed: int = 0) -> dict:
    from slidechat.features.io import write_feature_h5
    from slidechat.model.tiny_llm import make_tiny_llm

    llm = make_tiny_llm(root / "llm", hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64),
                        num_kv_heads=2, intermediate_size=hidden * 4)
    rng = np.random.default_rng(seed)
    (root / "feats").mkdir(parents=True, exist_ok=True)
    n_patches = []
    with open(root / "bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Slide", "Question", "A", "B", "C", "D", "Answer"])
        for i in range(rows):
            n = int(rng.integers(patches[0], patches[1] + 1))
            n_patches.append(n)
            write_feature_h5(root / "feats" / f"s{i}.h5", rng.normal(size=(n, 512)).astype(np.float32),
                             np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64))
            w.writerow([f"q{i}", f"s{i}", f"Which finding is most prominent in slide {i}?",
                        "tumor", "normal tissue", "necrosis", "inflammation", "A"])
    opts = {"llm_name_or_path": str(llm), "tokenizer.pretrained_model_name_or_path": str(llm),
            "model.llm.pretrained_model_name_or_path": str(llm), "model.pretrained_pth": None,
            "model.slidechat_config.max_patches_test": int(patches[1])}
    return {"csv": root / "bench.csv", "feats": root / "feats", "opts": opts, "n_patches": n_patches}


def run_once(inp: dict, root: Path, batch: int, max_new: int, ckpt: Path) -> dict:
    from slidechat.apps.test import TestOptions, build_test_runner
    from slidechat.model.checkpoint import resolve_checkpoint

    out = root / f"out_b{batch}.csv"
    runner = build_test_runner(TestOptions(
        config=CONFIG, checkpoint=resolve_checkpoint(ckpt), test_slide_csv=inp["csv"], test_output_csv=out,
        feature_root=inp["feats"], batch_size=batch, max_new_tokens=max_new, overwrite=True,
        cfg_options=inp["opts"], work_dir=root / f"wd_b{batch}"))
    runner.test()
    t = runner.test_loop.timings
    import pandas as pd

    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    return {"batch": batch, "seconds": t["total_s"], "generate_s": t["generate_s"], "rows": len(df),
            "rows_per_s": len(df) / t["total_s"], "new_tokens": t["new_tokens"] / max(1, t["rows_generated"]),
            "outputs": df["Output"].tolist(), "errors": int((df["Error"] != "").sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--patches", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=(1, 8))
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per batch size, interleaved (1, 8, 1, 8...); the fastest is kept, which "
                         "damps the effect of other load on a shared machine")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: two OpenMP threads on a shared 2-core machine stall "
                         "each other and distort small-batch timings; 0 = torch's default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    with tempfile.TemporaryDirectory(prefix="sc_tput_") as tmp:
        if os.environ.get("KEEP_TMP"):  # keep the run folder for inspection
            tmp = tempfile.mkdtemp(prefix="sc_tput_keep_")
        root = Path(tmp)
        inp = make_inputs(root, args.rows, tuple(args.patches), args.hidden, args.layers)
        cfg = Config.fromfile(str(CONFIG))
        cfg.merge_from_dict(inp["opts"])
        torch.manual_seed(0)
        ckpt = root / "ckpt.pth"
        torch.save({"state_dict": BUILDER.build(cfg.model).state_dict()}, ckpt)
        runs = [run_once(inp, root, b, args.max_new_tokens, ckpt)
                for _ in range(args.repeats) for b in args.batches]
        results = [min((r for r in runs if r["batch"] == b), key=lambda r: r["seconds"]) for b in args.batches]
        all_s = {b: [round(r["seconds"], 1) for r in runs if r["batch"] == b] for b in args.batches}
    base = results[0]["rows_per_s"]
    same = [sum(a == b for a, b in zip(results[0]["outputs"], r["outputs"])) for r in results]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"LLM: Qwen2 hidden {args.hidden}, {args.layers} layers (random); {args.rows} rows, "
          f"{args.patches[0]}-{args.patches[1]} patches/slide (mean {np.mean(inp['n_patches']):.0f}); "
          f"max_new_tokens {args.max_new_tokens}, greedy\n")
    print("| batch | seconds (best) | all runs (s) | in generate() | rows/s | speed-up | new tokens/row "
          f"| outputs equal to batch {args.batches[0]} |")
    print("| ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: |")
    for r, s in zip(results, same):
        print(f"| {r['batch']} | {r['seconds']:.2f} | {all_s[r['batch']]} | {100 * r['generate_s'] / r['seconds']:.0f}% "
              f"| {r['rows_per_s']:.2f} | {r['rows_per_s'] / base:.2f}x | {r['new_tokens']:.1f} | {s}/{r['rows']} |")


if __name__ == "__main__":
    main()
