"""Shared pytest fixtures (session-scoped: expensive set-up happens once per test run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Tiny generated slides covering the cases extraction must handle.

    Keys: ``tumor20``, ``inflamed20`` (20x, 0.5 µm/px), ``tumor40`` (40x, 0.25 µm/px), ``blank``,
    ``nometa`` (no MPP/AppMag), ``corrupt`` (random bytes), ``odd`` (a copy with spaces, unicode and
    dots in its name), ``fov`` (PNG); ``*_mask`` are truth masks; ``dir`` holds everything except
    ``nometa``, ``fov`` and masks.
    """
    from slidechat.wsi.synthetic import SlideSpec, write_fov_png, write_slide

    root = tmp_path_factory.mktemp("synthetic")
    sl, other = root / "slides", root / "other"
    sl.mkdir()
    specs = {
        "tumor20": SlideSpec("s20_tumor", "tumor", 1536, 1280, 0.5, seed=1),
        "inflamed20": SlideSpec("s20_inflamed", "inflamed", 1536, 1280, 0.5, seed=2),
        "tumor40": SlideSpec("s40_tumor", "tumor", 2560, 2048, 0.25, seed=3),
        "blank": SlideSpec("s_blank", "tumor", 1024, 1024, 0.5, seed=4, blank=True),
        "nometa": SlideSpec("s_nometa", "normal", 1024, 1024, 0.5, seed=5, write_metadata=False),
    }
    out: Dict[str, Path] = {"dir": sl}
    for key, spec in specs.items():
        folder = other if key == "nometa" else sl
        out[key] = folder / f"{spec.name}.svs"
        out[key + "_mask"] = root / "masks" / f"{spec.name}_mask.png"
        write_slide(out[key], spec, out[key + "_mask"])
    out["corrupt"] = sl / "s_corrupt.svs"
    out["corrupt"].write_bytes(b"II*\x00" + os.urandom(4096))
    out["odd"] = sl / "odd name ü.v2.svs"
    shutil.copy(out["inflamed20"], out["odd"])
    out["fov"] = other / "fov_tumor.png"
    write_fov_png(out["fov"], "tumor", size=512, seed=1)
    return out


@pytest.fixture(scope="session")
def extracted(synthetic_slides: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One ``extract_slides`` run (tiny_test encoder, 1 worker, CSV on) over ``synthetic_slides['dir']``."""
    from slidechat.apps.extract import extract_slides

    out = tmp_path_factory.mktemp("extracted")
    summary = extract_slides(synthetic_slides["dir"], out, encoder="tiny_test", save_csv=True,
                             num_workers=1, batch_size=16, progress=False)
    return out, summary
