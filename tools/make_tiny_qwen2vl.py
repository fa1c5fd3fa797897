"""Build the tiny random Qwen2-VL (model, tokenizer with Qwen2-VL's special tokens, processor) offline."""

from __future__ import annotations

import argparse
import logging

from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="work_dirs/tiny_qwen2vl", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(make_tiny_qwen2vl(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
