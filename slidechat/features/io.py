"""Per-slide feature files: CLAM/TRIDENT-style H5 and SlideChat-style CSV.

``load_features`` is the single entry point every later stage (datasets, tests, chat) uses to read
features, whatever format they were written in. ``read_feature_provenance`` reads which encoder wrote a
file (H5 root attributes only) and ``check_feature_provenance`` refuses a set of files from two encoders,
or of another width than the model's ``feature_dim``, before any training or testing time is spent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".h5", ".hdf5", ".csv", ".pt")


def write_feature_h5(path: PathLike, features: np.ndarray, coords: np.ndarray,
                     coords_attrs: Optional[Mapping[str, Any]] = None,
                     file_attrs: Optional[Mapping[str, Any]] = None, atomic: bool = True) -> None:
    """Write ``features`` (N×D float32) and ``coords`` (N×2 int64, level-0 top-left x, y) atomically.

    Patch attributes go on the ``coords`` dataset, where CLAM and TRIDENT readers look for them;
    provenance goes on the file root. ``atomic=False`` writes ``path`` directly (for a caller that
    already writes to its own temporary file).
    """
    import h5py

    features = np.ascontiguousarray(features, dtype=np.float32)
    coords = np.ascontiguousarray(coords, dtype=np.int64)
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(features):
        raise SlideChatError(
            f"features {features.shape} and coords {coords.shape} must be N×D and N×2", path)
    with (atomic_path(path) if atomic else contextlib.nullcontext(Path(path))) as tmp:
        with h5py.File(tmp, "w") as f:
            dc = f.create_dataset("coords", data=coords)
            f.create_dataset("features", data=features)
            for k, v in (coords_attrs or {}).items():
                dc.attrs[k] = _h5_attr(v)
            for k, v in (file_attrs or {}).items():
                f.attrs[k] = _h5_attr(v)


def _h5_attr(v: Any) -> Any:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return np.asarray(v)
    return v


def write_slidechat_csv(path: PathLike, features: np.ndarray, atomic: bool = True) -> None:
    """SlideChat's layout: header ``0,1,…,D-1``, one row per patch, ``%.4f``, no coordinates."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise SlideChatError(f"features must be N×D, got {features.shape}", path)
    header = ",".join(str(i) for i in range(features.shape[1]))
    with (atomic_path(path) if atomic else contextlib.nullcontext(Path(path))) as tmp:
        np.savetxt(tmp, features, fmt="%.4f", delimiter=",", header=header, comments="")


def load_features(path: PathLike, num_columns: Optional[int] = None, require_finite: bool = False
                  ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Read any slidechat feature file into ``(features float32 N×D, coords int64 N×2 or None)``.

    Accepts ``.h5``/``.hdf5`` (datasets ``features`` and optional ``coords``), SlideChat ``.csv``
    (header row ``0..D-1``, one patch per row; a leading pandas index column is recognised and dropped)
    and CLAM ``.pt`` tensors. ``num_columns`` is the width the model expects: a file of any other width
    is an error naming the file, found and expected widths (cutting 1,024-d features to 512 would feed
    the model meaningless inputs without complaint). Raises :class:`SlideChatError` naming the file for
    anything unreadable, and with ``require_finite`` for NaN/Inf features.
    """
    p = Path(path)
    if not p.is_file():
        raise SlideChatError("feature file not found", p)
    suffix = p.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            feats, coords = _load_h5(p)
        elif suffix == ".csv":
            feats, coords = _load_csv(p), None
        elif suffix == ".pt":
            feats, coords = _load_pt(p), None
        else:
            raise SlideChatError(f"unknown feature format '{suffix}' (expected one of "
                                 f"{', '.join(FEATURE_SUFFIXES)})", p)
    except SlideChatError:
        raise
    except Exception as e:  # h5py/pandas raise many types; name the file either way
        raise SlideChatError(f"cannot read feature file: {type(e).__name__}: {e}", p) from e
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise SlideChatError(f"expected a non-empty N×D feature matrix, got shape {feats.shape}", p)
    if num_columns is not None and feats.shape[1] != num_columns:
        raise SlideChatError(f"features are {feats.shape[1]} wide, the model expects {num_columns} "
                             f"(feature_dim)", p, hint="extract with the patch encoder the model was "
                                                       "trained on, or use a config whose feature_dim matches")
    if require_finite and not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats).all(axis=1)).sum())
        raise SlideChatError(f"features contain NaN/Inf ({bad} of {len(feats)} patches)", p)
    return np.ascontiguousarray(feats, dtype=np.float32), coords


def _load_h5(p: Path) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    import h5py

    with h5py.File(p, "r") as f:
        if "features" not in f:
            raise SlideChatError(f"H5 has no 'features' dataset (has: {', '.join(f.keys()) or 'nothing'})", p)
        feats = f["features"][()]
        coords = f["coords"][()] if "coords" in f else None
    if feats.ndim == 3 and feats.shape[0] == 1:  # some toolkits store 1×N×D
        feats = feats[0]
    if coords is not None:
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.shape != (feats.shape[0], 2):
            raise SlideChatError(f"coords shape {coords.shape} does not match features {feats.shape}", p)
        coords = coords.astype(np.int64)
    return feats, coords


def _load_csv(p: Path) -> np.ndarray:
    import pandas as pd

    df = pd.read_csv(p, engine="c", dtype=np.float32)
    first = str(df.columns[0]) if len(df.columns) else ""
    if first == "" or first.startswith("Unnamed: 0"):
        # ``DataFrame.to_csv`` with its index: an unnamed first column holding 0..N-1 is not a feature
        idx = df.iloc[:, 0].to_numpy()
        if not np.array_equal(idx, np.arange(len(df), dtype=idx.dtype)):
            raise SlideChatError(f"first column has no name but is not a 0..N-1 row index "
                                 f"(header {first!r})", p)
        df = df.iloc[:, 1:]
    return df.to_numpy(dtype=np.float32)


def _load_pt(p: Path) -> np.ndarray:
    import torch

    t = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor):
        raise SlideChatError(f".pt file holds {type(t).__name__}, expected a tensor", p)
    return t.float().numpy()


def find_feature_file(stem: PathLike) -> Optional[Path]:
    """Resolve ``stem`` (with or without suffix) to an existing feature file, preferring H5."""
    stem = Path(stem)
    if stem.suffix.lower() in FEATURE_SUFFIXES and stem.is_file():
        return stem
    for suf in FEATURE_SUFFIXES:
        cand = stem.with_name(stem.name + suf)
        if cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------- provenance

#: ``encoder`` of a file without provenance (SlideChat CSV, CLAM ``.pt``, CLAM/TRIDENT H5)
UNKNOWN_ENCODER = "unknown"


@dataclass(frozen=True)
class FeatureProvenance:
    """Which encoder wrote a feature file: the H5 root attributes ``PatchEncoder.provenance`` writes."""

    encoder: str
    embed_dim: Optional[int] = None
    preset: str = "none"
    preset_version: str = "none"
    checkpoint_sha256: str = "none"

    @property
    def known(self) -> bool:
        return self.encoder != UNKNOWN_ENCODER

    @property
    def identity(self) -> Tuple[str, str, str]:
        """Files whose identities differ hold different features, even under one encoder name."""
        return self.encoder, self.preset_version, self.checkpoint_sha256

    def describe(self) -> str:
        sha = self.checkpoint_sha256
        weights = "random/unrecorded weights" if sha == "none" else f"weights sha256 {sha[:12]}"
        return f"{self.encoder} ({self.embed_dim}-d, preset version {self.preset_version}, {weights})"


def read_feature_provenance(path: PathLike) -> FeatureProvenance:
    """The provenance of one feature file, from the H5 root attributes only (no dataset is read).

    Files without it (CSV, ``.pt``, H5 from CLAM/TRIDENT) are ``UNKNOWN_ENCODER``. Cached per file
    version (path, size, modification time): the input check and the dataset ask for the same files.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise SlideChatError("feature file not found", p) from None
    return _read_provenance(os.fspath(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _read_provenance(path: str, size: int, mtime_ns: int) -> FeatureProvenance:  # noqa: ARG001 - cache key
    if Path(path).suffix.lower() not in (".h5", ".hdf5"):
        return FeatureProvenance(UNKNOWN_ENCODER)
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr_text(f.attrs[k]) for k in ("encoder", "encoder_embed_dim", "encoder_preset",
                                                          "encoder_preset_version", "encoder_checkpoint_sha256")
                     if k in f.attrs}
    except Exception as e:  # h5py raises many types; name the file either way
        raise SlideChatError(f"cannot read feature file: {type(e).__name__}: {e}", path) from e
    if "encoder" not in attrs:
        return FeatureProvenance(UNKNOWN_ENCODER)
    dim = attrs.get("encoder_embed_dim")
    if dim is not None and not dim.isdigit():
        raise SlideChatError(f"provenance attribute encoder_embed_dim is {dim!r}, not a width", path)
    return FeatureProvenance(attrs["encoder"], None if dim is None else int(dim),
                             attrs.get("encoder_preset", "none"), attrs.get("encoder_preset_version", "none"),
                             attrs.get("encoder_checkpoint_sha256", "none"))


def _attr_text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def check_feature_provenance(paths: Iterable[Optional[PathLike]], feature_dim: Optional[int]
                             ) -> Optional[FeatureProvenance]:
    """The one encoder behind ``paths`` (None when no file records one), checked against ``feature_dim``.

    Refused, in one line naming the files: files from two encoders (name, preset version or weights
    differ: features of different spaces would train or test one model), and recorded widths other than
    ``feature_dim``. Files without provenance pass when all are such, else with a warning (they are
    taken for the recorded encoder's; ``load_features`` still checks their width).
    """
    first: Dict[Tuple[str, str, str], Tuple[Path, FeatureProvenance]] = {}
    unknown: List[Path] = []
    for path in dict.fromkeys(Path(p) for p in paths if p is not None):
        prov = read_feature_provenance(path)
        if not prov.known:
            unknown.append(path)
            continue
        first.setdefault(prov.identity, (path, prov))
        if len(first) > 1:
            (p1, a), (p2, b) = first.values()
            raise SlideChatError(f"feature files from two encoders: {p1} is {a.describe()}, this file is "
                                 f"{b.describe()}", p2, hint="one feature folder per encoder: point "
                                 "feature_root at one encoder's features (or re-extract the others)")
        if feature_dim is not None and prov.embed_dim is not None and prov.embed_dim != feature_dim:
            raise SlideChatError(f"features of encoder {prov.encoder} are {prov.embed_dim}-d, the config's "
                                 f"feature_dim is {feature_dim}", path,
                                 hint=f"set feature_dim = {prov.embed_dim} in the config; see docs/training.md")
    if not first:
        return None
    path, prov = next(iter(first.values()))
    if unknown:
        logger.warning("%d feature file(s) record no encoder (e.g. %s) beside files of %s (e.g. %s): taken for "
                       "%s features", len(unknown), unknown[0], prov.encoder, path, prov.encoder)
    return prov
