"""The settings of one ``slidechat serve`` run, as one frozen bundle passed to every part of the app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slidechat.wsi.slide import SLIDE_SUFFIXES

#: Slide suffixes the viewer does not list: a DICOM slide is a folder of ``.dcm`` files (each would be listed
#: as a slide of its own); ``.czi``, ``.bmp`` and ``.webp`` have not been tried through the DeepZoom path.
SERVE_UNLISTED = (".dcm", ".czi", ".bmp", ".webp")
#: File suffixes listed as slides (a plain image is one field of view): the project's slide suffixes, less
#: those above.
SERVE_SUFFIXES = tuple(s for s in SLIDE_SUFFIXES if s not in SERVE_UNLISTED)


@dataclass(frozen=True)
class ServeConfig:
    """Where the slides and their side files are, how the server listens and its limits."""

    slides: Path                      # root folder of slides (searched recursively)
    features: Optional[Path] = None   # folder of <slide_id>.h5 (extract-features' h5_files/ or the folder above)
    screening: Optional[Path] = None  # `slidechat screen` output folder (fields/<slide_id>.csv, ...)
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None       # required when host is not loopback
    cache_dir: Optional[Path] = None  # unused: tiles are cached in memory
    tile_cache_mb: int = 256
    max_body_bytes: int = 64 * 1024
    max_question_chars: int = 4000
