"""Write synthetic SlideInstruction/SlideBench files for the demo slides (see slidechat.data.synthetic)."""

from __future__ import annotations

import argparse
import logging

from slidechat.data.synthetic import write_synthetic_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", default="work_dirs/demo/slides/manifest.csv",
                        help="manifest.csv of the synthetic slides (slide,label,...)")
    parser.add_argument("--out", default="work_dirs/demo/data", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-every", type=int, default=0,
                        help="test only on every k-th slide, train on the rest (0: test on all)")
    parser.add_argument("--mcq-variants", type=int, default=1,
                        help="training copies of each MCQ with reshuffled options")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_synthetic_dataset(args.manifest, args.out, seed=args.seed,
                                    holdout_every=args.holdout_every,
                                    mcq_variants=args.mcq_variants)
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
