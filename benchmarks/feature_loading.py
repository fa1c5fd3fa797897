"""Per-slide feature loading through ``load_features``: H5 vs SlideChat CSV, same slide, one run.

    python benchmarks/feature_loading.py --patches 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from slidechat.features.io import load_features, write_feature_h5, write_slidechat_csv


def _time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.patches, args.dim)).astype(np.float32)
    coords = np.stack([np.arange(args.patches) * 224, np.zeros(args.patches)], 1).astype(np.int64)
    with tempfile.TemporaryDirectory() as d:
        h5, csv = Path(d) / "slide.h5", Path(d) / "slide.csv"
        write_feature_h5(h5, feats, coords)
        write_slidechat_csv(csv, feats)
        t_h5 = _time(lambda: load_features(h5, num_columns=512), args.repeats)
        t_csv = _time(lambda: load_features(csv, num_columns=512), args.repeats)
        import pandas as pd

        results = {"load_features .h5": t_h5, "load_features .csv (pandas C engine)": t_csv}
        try:
            import pyarrow  # noqa: F401

            results["pandas pyarrow engine (not used by load_features)"] = _time(
                lambda: pd.read_csv(csv, engine="pyarrow").to_numpy(np.float32), args.repeats)
        except ImportError:
            results["pandas pyarrow engine"] = float("nan")
        sizes = {"h5": h5.stat().st_size, "csv": csv.stat().st_size}
    print(f"slide: {args.patches} x {args.dim} float32; files: H5 {sizes['h5'] / 2**20:.1f} MiB, "
          f"CSV {sizes['csv'] / 2**20:.1f} MiB; median of {args.repeats}")
    for k, v in results.items():
        print(f"  {k:55s} {v * 1000:9.1f} ms")
    print(f"  H5 speed-up over CSV: {t_csv / t_h5:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
