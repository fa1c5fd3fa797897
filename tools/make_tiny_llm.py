"""Build the tiny random Qwen2 LLM + tokenizer used by tests and smoke runs (offline, a few seconds)."""

from __future__ import annotations

import argparse
import logging

from slidechat.model.tiny_llm import make_tiny_llm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="work_dirs/tiny_llm", help="output folder")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_tiny_llm(args.out, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                        intermediate_size=args.intermediate_size, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
