"""SlideBench test throughput: rows/s at batch 1 vs batch 8, or with vs without prefix reuse, on the same
file, one process (CPU).

Runs the real test path (mmengine Runner from ``configs/tiny/stage_2.py``, SlideBench test loop,
writer, scoring) on a small Qwen2 (random weights) and random H5 features, timing ``runner.test()``
only (model/runner construction excluded). Generation is made to dominate: a few LLM layers,
``max_new_tokens`` 32, 32-64 patches per slide (``--patches 200 600`` shows the prefill-bound case). Prints a Markdown table.

    .venv/bin/python benchmarks/test_throughput.py [--rows 16] [--patches 32 64] [--layers 4] [--threads 1]

``--reuse-ab`` (issue 14) answers the same file with and without prefix reuse in one run, at one batch
size, ``--questions`` questions per slide; ``--shape qwen2.5-0.5b`` gives the LLM Qwen2.5-0.5B's shape
(hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864; random weights, the tiny tokenizer's vocabulary).
The realistic case of the issue, with the prefill / decode split measured on the LLM:

    benchmarks/test_throughput.py --reuse-ab --shape qwen2.5-0.5b --slides 3 --questions 6 \
        --patches 2000 2000 --max-new-tokens 8 --batches 6 --repeats 1

(Not a pytest test: no function here is collected.)
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "stage_2.py"


#: LLM shapes (``--shape``): hidden, layers, heads, KV heads, FFN (Qwen2.5-0.5B: its config.json on the Hub,
#: https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json)
SHAPES = {"qwen2.5-0.5b": (896, 24, 14, 2, 4864)}
#: SlideBench-style questions of different lengths (several per slide with --questions)
QUESTIONS = ["Which finding is most prominent in slide {i}?", "What is the tumor type?",
             "Based on the whole slide image {i}, which histological pattern dominates the tumor?",
             "Is there necrosis?", "Which grade best describes the tumor cells of slide {i} and their nuclei?",
             "What is seen?"]


def make_inputs(root: Path, rows: int, patches: tuple, hidden: int, layers: int, seed: int = 0,
                questions: int = 1, shape: Optional[str] = None) -> dict:
    """``rows`` slides (``questions`` questions each: rows x questions CSV rows) and the LLM."""
    from slidechat.features.io import write_feature_h5
    from slidechat.model.tiny_llm import make_tiny_llm

    h, n_layers, heads, kv, ffn = SHAPES[shape] if shape else (hidden, layers, max(4, hidden // 64), 2, hidden * 4)
    llm = make_tiny_llm(root / "llm", hidden_size=h, num_layers=n_layers, num_heads=heads, num_kv_heads=kv,
                        intermediate_size=ffn)
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
            for k in range(questions):
                w.writerow([f"q{i}" + (f"_{k}" if questions > 1 else ""), f"s{i}",
                            QUESTIONS[k % len(QUESTIONS)].format(i=i),
                            "tumor", "normal tissue", "necrosis", "inflammation", "A"])
    opts = {"llm_name_or_path": str(llm), "tokenizer.pretrained_model_name_or_path": str(llm),
            "model.llm.pretrained_model_name_or_path": str(llm), "model.pretrained_pth": None,
            "model.slidechat_config.max_patches_test": int(patches[1])}
    return {"csv": root / "bench.csv", "feats": root / "feats", "opts": opts, "n_patches": n_patches}


class ForwardClock:
    """Seconds the model spends in the slide encoder, in LLM forwards of several tokens (prefill) and of
    one token (decode), from forward hooks."""

    def __init__(self, model: Any) -> None:
        core = getattr(model, "core", model)
        self.s = {"encoder": 0.0, "prefill": 0.0, "decode": 0.0}
        self._t0 = 0.0
        decoder = core.llm.model  # the Qwen2 decoder stack
        self.handles = [core.LongNet_encoder.register_forward_pre_hook(self._start),
                        core.LongNet_encoder.register_forward_hook(lambda m, a, o: self._stop("encoder")),
                        decoder.register_forward_pre_hook(self._start),
                        decoder.register_forward_hook(self._stop_llm, with_kwargs=True)]

    def _start(self, *a: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, kind: str) -> None:
        self.s[kind] += time.perf_counter() - self._t0

    def _stop_llm(self, m: Any, a: Any, kw: Any, o: Any) -> None:
        x = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
        self._stop("prefill" if x is not None and x.shape[1] > 1 else "decode")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_once(inp: dict, root: Path, batch: int, max_new: int, ckpt: Path, prefix_reuse: bool = True) -> dict:
    from slidechat.apps.test import TestOptions, build_test_runner
    from slidechat.model.checkpoint import resolve_checkpoint

    tag = f"b{batch}_{'reuse' if prefix_reuse else 'full'}"
    out = root / f"out_{tag}.csv"
    runner = build_test_runner(TestOptions(
        config=CONFIG, checkpoint=resolve_checkpoint(ckpt), test_slide_csv=inp["csv"], test_output_csv=out,
        feature_root=inp["feats"], batch_size=batch, max_new_tokens=max_new, overwrite=True,
        cfg_options=inp["opts"], work_dir=root / f"wd_{tag}", prefix_reuse=prefix_reuse))
    clock = ForwardClock(runner.model)
    try:
        runner.test()
    finally:
        clock.remove()
    t = runner.test_loop.timings
    import pandas as pd

    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    return {"batch": batch, "reuse": prefix_reuse, "seconds": t["total_s"], "generate_s": t["generate_s"],
            "rows": len(df), "rows_per_s": len(df) / t["total_s"],
            "new_tokens": t["new_tokens"] / max(1, t["rows_generated"]), "split": dict(clock.s),
            "outputs": df["Output"].tolist(), "errors": int((df["Error"] != "").sum())}


def reuse_ab(args: argparse.Namespace, inp: dict, root: Path, ckpt: Path) -> None:
    """Today's path (every row its own prefill) and prefix reuse on the same file, interleaved; the
    fastest run of each is kept. Prints the table and the measured per-row split of today's path."""
    b = args.batches[0]
    runs = [run_once(inp, root, b, args.max_new_tokens, ckpt, prefix_reuse=reuse)
            for _ in range(args.repeats) for reuse in (False, True)]
    best = [min((r for r in runs if r["reuse"] == reuse), key=lambda r: r["seconds"]) for reuse in (False, True)]
    full, reuse = best
    same = sum(a == c for a, c in zip(full["outputs"], reuse["outputs"]))
    print("| path | seconds | rows/s | speed-up | slide encoder s | LLM prefill s | LLM decode s "
          "| new tokens/row | outputs equal |\n| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("every row its own prefill (--no-prefix-reuse)", full), ("prefix reuse (default)", reuse)):
        sp = r["split"]
        print(f"| {name} | {r['seconds']:.1f} | {r['rows_per_s']:.3f} | {r['rows_per_s'] / full['rows_per_s']:.2f}x "
              f"| {sp['encoder']:.1f} | {sp['prefill']:.1f} | {sp['decode']:.1f} | {r['new_tokens']:.1f} "
              f"| {same}/{r['rows']} |")
    n = full["rows"]
    print(f"\ntoday's path per row: encoder {full['split']['encoder'] / n:.2f} s, prefill "
          f"{full['split']['prefill'] / n:.2f} s, decode {full['split']['decode'] / n:.2f} s "
          f"(all runs: {[round(r['seconds'], 1) for r in runs]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", "--slides", type=int, default=16, help="slides (one CSV row each unless "
                                                                      "--questions)")
    ap.add_argument("--questions", type=int, default=1, help="questions per slide")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a real LLM's shape instead of --hidden/--layers")
    ap.add_argument("--reuse-ab", action="store_true",
                    help="compare prefix reuse with today's path at the first --batches size")
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
        inp = make_inputs(root, args.rows, tuple(args.patches), args.hidden, args.layers,
                          questions=args.questions, shape=args.shape)
        cfg = Config.fromfile(str(CONFIG))
        cfg.merge_from_dict(inp["opts"])
        torch.manual_seed(0)
        ckpt = root / "ckpt.pth"
        torch.save({"state_dict": BUILDER.build(cfg.model).state_dict()}, ckpt)
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}, "
              f"torch {torch.__version__}")
        print(f"LLM: {args.shape or f'Qwen2 hidden {args.hidden}, {args.layers} layers'} (random weights); "
              f"{args.rows} slides x {args.questions} question(s), {args.patches[0]}-{args.patches[1]} "
              f"patches/slide (mean {np.mean(inp['n_patches']):.0f}); max_new_tokens {args.max_new_tokens}, "
              f"greedy, batch {args.batches[0]}\n")
        if args.reuse_ab:
            reuse_ab(args, inp, root, ckpt)
            return
        runs = [run_once(inp, root, b, args.max_new_tokens, ckpt)
                for _ in range(args.repeats) for b in args.batches]
        results = [min((r for r in runs if r["batch"] == b), key=lambda r: r["seconds"]) for b in args.batches]
        all_s = {b: [round(r["seconds"], 1) for r in runs if r["batch"] == b] for b in args.batches}
    base = results[0]["rows_per_s"]
    same = [sum(a == b for a, b in zip(results[0]["outputs"], r["outputs"])) for r in results]
    print("| batch | seconds (best) | all runs (s) | in generate() | rows/s | speed-up | new tokens/row "
          f"| outputs equal to batch {args.batches[0]} |")
    print("| ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: |")
    for r, s in zip(results, same):
        print(f"| {r['batch']} | {r['seconds']:.2f} | {all_s[r['batch']]} | {100 * r['generate_s'] / r['seconds']:.0f}% "
              f"| {r['rows_per_s']:.2f} | {r['rows_per_s'] / base:.2f}x | {r['new_tokens']:.1f} | {s}/{r['rows']} |")


if __name__ == "__main__":
    main()
