"""One slide-model training step (forward + backward, fp32 CPU) with the stock full-vocabulary logits
vs the LM head at labelled positions only (issue 18), on a Qwen2.5-0.5B-width LLM with random weights.

    python benchmarks/label_logits.py --patches 2000

The LLM is built offline from a ``Qwen2Config`` (hidden 896, 2 layers, intermediate 4864, 14 heads / 2 KV
heads, the real 151,936-token vocabulary, tied embeddings as Qwen2.5-0.5B). Each path runs in its own
subprocess on the same seeded model and inputs, so its peak memory is its own: the Linux peak-RSS counter
(VmHWM) is reset after the model and inputs are built and read after the step; "peak above model" is that
peak minus the RSS before the step. Both losses are printed: they must agree (float32 summation order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ (also when imported by path)
from peak_rss import reset_peak_rss, status_kib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(path: str, patches: int, checkpointing: bool, threads: int) -> Dict[str, Any]:
    """Build the model and batch (seeded), then time one forward + backward along ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from slidechat.model.slidechat_model import SlideChatConfig, SlideChatModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True, use_cache=False, torch_dtype="float32")
    llm = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="sdpa")
    model = SlideChatModel(llm, SlideChatConfig(encoder=dict(dropout=0.0, drop_path=0.0))).train()
    if checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.enable_input_require_grads()
    g = torch.Generator().manual_seed(1)
    before, answer = 40, 32  # prompt tokens around the slide placeholder, then the labelled answer
    ids = torch.randint(0, cfg.vocab_size, (1, before + 1 + 8 + answer), generator=g)
    ids[0, 20] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -answer:] = ids[0, -answer:]
    feats = [torch.randn(patches, 512, generator=g)]
    rss_before = status_kib("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    out = model(ids, torch.ones_like(ids), feats, labels=labels, full_logits=(path == "stock"))
    out.loss.backward()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"path": path, "seconds": seconds, "rss_before_gib": rss_before / 2**20,
            "peak_gib": peak / 2**20, "above_gib": (peak - rss_before) / 2**20, "loss": float(out.loss),
            "seq_len": ids.shape[1] - 1 + patches, "labels": int((labels != IGNORE_INDEX).sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=2000)
    ap.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=("stock", "labels"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt = not args.no_checkpointing
    if args.child:
        print(json.dumps(run_one(args.child, args.patches, ckpt, args.threads)))
        return 0
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1")
    rows = []
    for path in ("stock", "labels"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--patches", str(args.patches),
               "--threads", str(args.threads)] + (["--no-checkpointing"] if not ckpt else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    s, n = rows
    print(f"slide model, Qwen2.5-0.5B-width LLM (vocab 151,936, 2 layers), {args.patches} patches "
          f"({s['seq_len']} positions, {s['labels']} labelled), fp32 CPU, {args.threads} threads, "
          f"activation checkpointing {'on' if ckpt else 'off'}; one forward + backward\n")
    print("| path | seconds | peak RSS (GiB) | peak above model (GiB) | loss |")
    print("|---|---|---|---|---|")
    names = {"stock": "stock `llm(..., labels=)` (full logits)", "labels": "LM head at labelled positions"}
    for r in rows:
        print(f"| {names[r['path']]} | {r['seconds']:.2f} | {r['peak_gib']:.2f} | {r['above_gib']:.2f} | "
              f"{r['loss']:.6f} |")
    print(f"\ntime x{s['seconds'] / n['seconds']:.1f} less, memory above model x{s['above_gib'] / n['above_gib']:.1f}"
          f" less; |loss difference| / loss = {abs(s['loss'] - n['loss']) / abs(s['loss']):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
