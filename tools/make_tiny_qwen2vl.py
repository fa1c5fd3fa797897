"""Build a tiny random Qwen VL model (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) with its processor, offline.

The folder loads through the same ``from_pretrained`` path as a real one. The size flags set the model's
shapes (e.g. 7B-like sizes for a benchmark); the tokenizer always stays tiny, ``--vocab-size`` only sets
the embedding rows.
"""

from __future__ import annotations

import argparse
import logging
import sys

from slidechat.model.tiny_qwen2vl import ARCHS, make_tiny_qwen2vl


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="qwen2_vl", help="model family (default qwen2_vl)")
    parser.add_argument("--out", default="work_dirs/tiny_qwen2vl", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="embedding rows (default: the tiny tokenizer's size; must be >= it)")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=64)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--vision-embed-dim", type=int, default=32, help="vision tower width")
    parser.add_argument("--vision-heads", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "bf16"), default="float32",
                        help="weights' dtype (bf16 = bfloat16: half the size for benchmark-sized models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = make_tiny_qwen2vl(args.out, seed=args.seed, arch=args.arch, vocab_size=args.vocab_size,
                                hidden_size=args.hidden_size, num_layers=args.num_layers,
                                num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                intermediate_size=args.intermediate_size, vision_depth=args.vision_depth,
                                vision_embed_dim=args.vision_embed_dim, vision_heads=args.vision_heads,
                                dtype="bfloat16" if args.dtype == "bf16" else args.dtype)
    except ValueError as e:
        print(f"make_tiny_qwen2vl: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
