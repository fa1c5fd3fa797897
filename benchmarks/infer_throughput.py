"""``slidechat infer`` throughput: examples/s at batch 1 vs batch 8 on the same inputs, one process.

Runs the real inference path (LLaMA-Factory dataset reader, ``qwen2_vl`` prompts, LLaMA-Factory image
scaling, the shared loop, the fsynced JSONL writer, greedy ``generate`` with left padding) on the tiny
random Qwen2-VL (``tools/make_tiny_qwen2vl.py``) and synthetic cytology fields of view. The model is
loaded once; only ``run_inference`` is timed, each batch size on a fresh output file. Greedy outputs of
the two batch sizes are compared (they must be identical). Prints a Markdown table.

    .venv/bin/python benchmarks/infer_throughput.py [--rows 32] [--image-size 224] [--max-new-tokens 32]
        [--threads 1] [--batch-sizes 1 8] [--model DIR] [--device auto] [--dtype auto]

``--questions-per-image 4 --reuse-ab`` (issue 14): ``--rows`` images with four questions each (CytoChat's
benchmark asks several tasks of each field), answered with and without prefix reuse at the first batch
size; the outputs must be identical.

(Not a pytest test: no function here is collected.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch


#: LLM shapes (``--shape``): hidden, layers, heads, KV heads, FFN (Qwen2.5-0.5B's config.json,
#: https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json; the same as test_throughput.py's)
SHAPES = {"qwen2.5-0.5b": (896, 24, 14, 2, 4864)}
#: vision towers of real shape: Qwen2-VL-7B's ViT (config.json vision_config: depth 32, embed_dim 1280,
#: num_heads 16, mlp_ratio 4, patch 14; ~0.6 B parameters), random weights
VISION_SHAPES = {"qwen2-vl": (32, 1280, 16)}
#: CytoChat-style tasks asked of one field (``--questions-per-image``), of different lengths
QUESTIONS = ["Locate all dark.", "Is this field normal or abnormal?",
             "Classify the most abnormal cell in this field of view according to the Bethesda system.",
             "Count the cells.", "Describe the chromatin of the largest nucleus."]


def make_dataset(root: Path, rows: int, size: int, seed: int = 0, questions: int = 1) -> Path:
    """``rows`` synthetic fields of view (``questions`` rows each) + a LLaMA-Factory ``dataset_info.json``."""
    from slidechat.data.synthetic_cytology import make_field

    data = root / "data"
    (data / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(data / "bench.jsonl", "w", encoding="utf-8") as f:
        for i in range(rows):
            img = make_field(rng, size=size)[0]
            img.save(data / "imgs" / f"f{i}.png")
            for k in range(questions):
                f.write(json.dumps({"messages": [{"role": "user", "content": "<image>" + QUESTIONS[k % len(QUESTIONS)]},
                                                 {"role": "assistant", "content": "None."}],
                                    "images": [f"imgs/f{i}.png"]}) + "\n")
    info = {"bench": {"file_name": "bench.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


def run_once(model, processor, data: Path, out: Path, batch: int, max_new: int,
             prefix_reuse: bool = True) -> Dict[str, float]:
    from slidechat.data.llamafactory import read_llamafactory
    from slidechat.inference.loop import Qwen2VLFamily, SamplingSettings, cytology_items, run_inference
    from slidechat.inference.writers import JsonlPredictionWriter

    items = cytology_items(read_llamafactory("bench", data, check_images=False))
    family = Qwen2VLFamily(model, processor, SamplingSettings(max_new_tokens=max_new, temperature=0.0),
                           prefix_reuse=prefix_reuse, max_batch=batch)
    with JsonlPredictionWriter(out, [(it.key, it.images) for it in items], overwrite=True) as w:
        t0 = time.perf_counter()
        stats = run_inference(items, w, family, batch_size=batch, progress=False)
        dt = time.perf_counter() - t0
    assert stats.errors == 0, "benchmark rows failed"
    return {"batch": batch, "reuse": prefix_reuse, "rows": stats.written, "seconds": dt, "examples_per_s": stats.written / dt,
            "generate_s": stats.generate_s, "new_tokens": family.new_tokens, "slots": family.token_slots}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224, help="field of view side in pixels")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny model's ops are "
                                                             "too small to share)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--questions-per-image", type=int, default=1)
    ap.add_argument("--reuse-ab", action="store_true",
                    help="today's path vs prefix reuse at the first batch size (instead of batch sizes)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="the built model's LLM in a real model's shape (its vision tower stays tiny)")
    ap.add_argument("--vision-shape", choices=sorted(VISION_SHAPES), default=None,
                    help="vision tower of a real model's shape (default: the tiny one)")
    ap.add_argument("--model", default=None, help="Qwen2-VL folder (default: build the tiny one)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slidechat.utils.devices import resolve_device_dtype
    from slidechat.model.qwen2vl import load_qwen2vl
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = dict(zip(("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"),
                         SHAPES[args.shape])) if args.shape else {}
        if args.vision_shape:
            sizes.update(zip(("vision_depth", "vision_embed_dim", "vision_heads"), VISION_SHAPES[args.vision_shape]))
        model_dir = Path(args.model) if args.model else make_tiny_qwen2vl(root / "tiny_qwen2vl", **sizes)
        data = make_dataset(root, args.rows, args.image_size, questions=args.questions_per_image)
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        model, processor = load_qwen2vl(model_dir, torch_dtype=dtype, device=device)
        run_once(model, processor, data, root / "warmup.jsonl", max(args.batch_sizes), 2)  # warm-up
        results: List[Dict[str, float]] = []
        outputs = []
        plan = ([(args.batch_sizes[0], False), (args.batch_sizes[0], True)] if args.reuse_ab
                else [(b, True) for b in args.batch_sizes])
        for b, reuse in plan:
            out = root / f"b{b}_{reuse}.jsonl"
            results.append(run_once(model, processor, data, out, b, args.max_new_tokens, prefix_reuse=reuse))
            outputs.append(out.read_bytes())
    same = all(o == outputs[0] for o in outputs)
    base = results[0]["examples_per_s"]
    print(f"slidechat infer throughput: Qwen2-VL, LLM {args.shape or 'tiny'}, vision tower "
          f"{args.vision_shape or 'tiny'}, {args.rows} images x "
          f"{args.questions_per_image} question(s), {args.image_size}px fields, "
          f"max_new_tokens {args.max_new_tokens}, greedy, {args.threads} torch thread(s), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| batch | prefix reuse | rows | seconds | of which generate | answer tokens / decoded slots | examples/s | "
          f"speed-up vs the first |\n|---:|:---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {'on' if r['reuse'] else 'off'} | {r['rows']} | {r['seconds']:.2f} | {r['generate_s']:.2f} | "
              f"{r['new_tokens']} / {r['slots']} | {r['examples_per_s']:.2f} | "
              f"{r['examples_per_s'] / base:.2f}x |")
    if torch.cuda.is_available() and device.startswith("cuda"):
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({dtype})")
    print(f"\ngreedy outputs identical across the runs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
