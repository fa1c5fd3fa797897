#!/usr/bin/env python
"""Write synthetic Aperio-style slides (+ truth masks, manifest.csv); see slidechat.wsi.synthetic."""

import argparse
import logging
import sys

from slidechat.wsi.synthetic import LABELS, make_synthetic_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (slides/, masks/, fov/, manifest.csv)")
    p.add_argument("--n-slides", type=int, default=8, help="tissue slides, labels cycled over " + ",".join(LABELS))
    p.add_argument("--width", type=int, default=2560)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--base-magnification", type=float, default=20.0, choices=[20.0, 40.0],
                   help="20 (0.5 µm/px) or 40 (0.25 µm/px)")
    p.add_argument("--n-blank", type=int, default=0, help="slides with no tissue")
    p.add_argument("--n-no-metadata", type=int, default=0, help="slides without MPP/AppMag")
    p.add_argument("--n-fov", type=int, default=0, help="cytology-like PNG fields of view")
    p.add_argument("--prefix", default="synth")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    man = make_synthetic_dataset(a.out, a.n_slides, a.width, a.height, a.base_magnification, a.seed,
                                 n_blank=a.n_blank, n_no_metadata=a.n_no_metadata, n_fov=a.n_fov,
                                 prefix=a.prefix)
    print(man)
    return 0


if __name__ == "__main__":
    sys.exit(main())
