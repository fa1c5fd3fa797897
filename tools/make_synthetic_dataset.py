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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_synthetic_dataset(args.manifest, args.out, seed=args.seed)
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
