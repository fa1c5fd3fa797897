#!/usr/bin/env python
"""Write synthetic cytology data (see slidechat.data.synthetic_cytology): fields of view with
LLaMA-Factory datasets, and/or whole cytology slides with labels.csv and per-cell/per-field truth.

examples:
  python tools/make_synthetic_cytology.py fields --out work_dirs/cyto_fields --n-fields 400
  python tools/make_synthetic_cytology.py slides --out work_dirs/cyto_slides --n-slides 10
"""

import argparse
import logging
import sys

from slidechat.data.synthetic_cytology import (DEFAULT_FIELD_SIZE, DEFAULT_MPP, write_cytology_slides,
                                               write_fields_dataset)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fields", help="PNG fields + dataset_info.json + JSONL datasets (train/test)")
    f.add_argument("--out", required=True)
    f.add_argument("--n-fields", type=int, default=200)
    f.add_argument("--size", type=int, default=DEFAULT_FIELD_SIZE, help="field side in px (default 512)")
    f.add_argument("--mpp", type=float, default=DEFAULT_MPP, help="µm/px of the fields (default 0.5)")
    f.add_argument("--test-fraction", type=float, default=0.2)
    f.add_argument("--abnormal-probability", type=float, default=0.5,
                   help="share of fields holding abnormal cells (default 0.5)")
    f.add_argument("--prefix", default="cyto", help="dataset name prefix (default cyto)")
    f.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("slides", help="pyramidal TIFF smears + labels.csv + truth_*.csv + manifest.csv")
    s.add_argument("--out", required=True)
    s.add_argument("--n-slides", type=int, default=8)
    s.add_argument("--width", type=int, default=4096)
    s.add_argument("--height", type=int, default=4096)
    s.add_argument("--base-mpp", type=float, default=DEFAULT_MPP, help="level-0 µm/px (default 0.5)")
    s.add_argument("--abnormal-fraction", type=float, default=0.5)
    s.add_argument("--n-abnormal", type=int, help="abnormal cells per abnormal slide (default 4-16)")
    s.add_argument("--field-size", type=int, default=DEFAULT_FIELD_SIZE,
                   help="field grid for truth_fields.csv (px at --field-mpp)")
    s.add_argument("--field-mpp", type=float, help="µm/px of the truth field grid (default --base-mpp)")
    s.add_argument("--prefix", default="cyto")
    s.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.what == "fields":
        out = write_fields_dataset(a.out, a.n_fields, a.seed, a.size, a.mpp, a.test_fraction,
                                   a.abnormal_probability, a.prefix)
    else:
        out = write_cytology_slides(a.out, a.n_slides, a.seed, a.width, a.height, a.base_mpp,
                                    a.abnormal_fraction, a.field_size, a.field_mpp, a.prefix,
                                    a.n_abnormal)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
