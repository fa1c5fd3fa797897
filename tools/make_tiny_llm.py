"""Build a tiny random causal LM + tokenizer (offline, a few seconds) for tests and smoke runs.

``--arch qwen2`` (default) writes the demo's tiny Qwen2 (add ``--official-template`` for Qwen2.5-Instruct's
own chat template); ``--arch qwen3`` / ``--arch llama`` write a tiny Qwen3 / Llama 3 with that family's
real chat template and special tokens. Each folder loads with AutoTokenizer / AutoModelForCausalLM.
"""

from __future__ import annotations

import argparse
import logging

from slidechat.model.tiny_llm import ARCHS, make_tiny_llm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="work_dirs/tiny_llm", help="output folder")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2", help="model family (default: qwen2)")
    parser.add_argument("--official-template", action="store_true",
                        help="qwen2 only: Qwen2.5-Instruct's own chat template instead of the demo's")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.official_template and args.arch != "qwen2":
        parser.error("--official-template is for --arch qwen2 (qwen3 and llama always carry their own)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_tiny_llm(args.out, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                        intermediate_size=args.intermediate_size, seed=args.seed, arch=args.arch,
                        official_template=True if args.official_template else None)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
