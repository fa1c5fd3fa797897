"""Raw slides -> per-slide patch features (H5 in the CLAM/TRIDENT layout, optional SlideChat CSV, QC PNG).

Per slide: open -> resolve level-0 MPP -> tissue mask -> patch grid -> batched encoding. Patches are
read by DataLoader worker processes, each with its own slide handle, and shipped as uint8 batches; the
encoder's resize/normalise runs batched in the main process (on the GPU when there is one, under bf16
autocast). Outputs are written atomically, so a killed run never leaves a file that looks finished, and
a rerun skips slides whose H5 exists. A failing slide is recorded in ``failures*.csv`` and the run goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as _glob
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError
from slidechat.wsi.patching import (DEFAULT_MAGNIFICATION, DEFAULT_PATCH_SIZE, DEFAULT_TISSUE_THRESHOLD,
                                    PatchGrid, plan_patches)
from slidechat.wsi.slide import Slide, resolve_resolution, slide_id
from slidechat.wsi.tissue import TissueMask, TissueParams, segment_tissue, whole_slide_mask

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FAILURE_COLUMNS = ("slide", "path", "stage", "reason")


@dataclass
class ExtractOptions:
    """Everything that shapes the patches; defaults follow SlideChat (224 px at 20x)."""

    target_magnification: Optional[float] = DEFAULT_MAGNIFICATION
    target_mpp: Optional[float] = None
    patch_size: int = DEFAULT_PATCH_SIZE
    base_mpp: Optional[float] = None
    base_magnification: Optional[float] = None
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD
    no_tissue_seg: bool = False
    tissue: TissueParams = field(default_factory=TissueParams)
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True
    progress: bool = True
    run_reads: bool = True   # read runs of adjacent patches as one region, then split

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "ExtractOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        tissue_names = {f.name for f in dataclasses.fields(TissueParams)}
        unknown = set(kw) - names - {f"seg_{n}" for n in tissue_names}
        if unknown:
            raise TypeError(f"unknown extraction options: {', '.join(sorted(unknown))}")
        tissue = kw.pop("tissue", None) or TissueParams(
            **{n: kw.pop(f"seg_{n}") for n in tissue_names if f"seg_{n}" in kw})
        return cls(tissue=tissue, **kw)


class _StageError(Exception):
    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stage, self.cause = stage, cause


# ----------------------------------------------------------------------------------------------
# patch reading (runs in DataLoader workers)


class _PatchBatches:
    """Map-style dataset of *batches*: item i = uint8 (b, P, P, 3) patches and their row indices."""

    def __init__(self, path: Path, grid: PatchGrid, batch_size: int, run_reads: bool = True) -> None:
        self.path = path
        self.coords = grid.coords
        self.level = grid.read_level
        self.read_size = grid.read_size
        self.patch_size = grid.patch_size
        self.ps0 = grid.patch_size_level0
        self.step0 = grid.step_level0
        # a run of horizontally adjacent patches is one read when patches tile the level exactly
        exact = abs(grid.patch_size_level0 / grid.read_downsample - grid.read_size) < 1e-6
        self.run_reads = run_reads and exact and grid.step_level0 == grid.patch_size_level0
        self.batches = [np.arange(i, min(i + batch_size, len(grid)))
                        for i in range(0, len(grid), batch_size)]
        self._slide: Optional[Slide] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.batches)

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # one handle per process
            self._slide = Slide(self.path)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> Tuple[Any, Any]:
        import torch

        idx = self.batches[i]
        return torch.from_numpy(self.read(idx)), torch.from_numpy(idx)

    def read(self, idx: np.ndarray) -> np.ndarray:
        s = self._handle()
        P, r = self.patch_size, self.read_size
        out = np.empty((len(idx), P, P, 3), np.uint8)
        runs = self._runs(idx) if self.run_reads else [[j] for j in range(len(idx))]
        for run in runs:
            x, y = self.coords[idx[run[0]]]
            region = s.read_region((int(x), int(y)), self.level, (r * len(run), r))
            for k, j in enumerate(run):
                tile = region[:, k * r:(k + 1) * r]
                out[j] = tile if r == P else _resize(tile, P)
        return out

    def _runs(self, idx: np.ndarray, max_run: int = 16) -> List[List[int]]:
        runs: List[List[int]] = []
        for j, row in enumerate(idx):
            if runs and len(runs[-1]) < max_run:
                pj = idx[runs[-1][-1]]
                if (self.coords[row, 1] == self.coords[pj, 1]
                        and self.coords[row, 0] - self.coords[pj, 0] == self.step0):
                    runs[-1].append(j)
                    continue
            runs.append([j])
        return runs


def _resize(tile: np.ndarray, P: int) -> np.ndarray:
    """Area-average for integer downsampling (the common 40x -> 20x case), PIL otherwise."""
    r = tile.shape[0]
    if r > P and r % P == 0:
        f = r // P
        return tile.reshape(P, f, P, f, 3).mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8)
    from PIL import Image

    method = Image.Resampling.BOX if r > P else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((P, P), method))


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def _mp_context() -> Any:
    """``fork`` where available: workers start in milliseconds. Workers therefore never touch OpenCV,
    whose thread pool does not survive a fork (resizing in workers uses PIL)."""
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


# ----------------------------------------------------------------------------------------------
# one slide


def resolve_device(device: str = "auto") -> "Any":
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SlideChatError(f"bad --device '{device}': {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlideChatError(f"--device {device} requested but CUDA is not available",
                             hint="use --device cpu")
    return dev


def _as_encoder(encoder: Any, checkpoint: Optional[PathLike]) -> Any:
    from slidechat.features.encoders import PatchEncoder, build_encoder

    if isinstance(encoder, PatchEncoder):
        return encoder
    if isinstance(encoder, str):
        return build_encoder(encoder, checkpoint)
    raise SlideChatError(f"encoder must be a name or a PatchEncoder, got {type(encoder).__name__}")


@dataclass
class SlideResult:
    slide: str
    path: Path
    features: np.ndarray
    coords: np.ndarray
    grid: PatchGrid
    mask: TissueMask
    dimensions: Tuple[int, int]
    timings: Dict[str, float]
    thumbnail: Optional[np.ndarray] = None


def _encode_grid(path: Path, grid: PatchGrid, encoder: Any, opts: ExtractOptions, device: Any,
                 desc: str) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    ds = _PatchBatches(path, grid, max(1, int(opts.batch_size)), opts.run_reads)
    nw = max(0, int(opts.num_workers))
    nw = min(nw, len(ds))
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=nw,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if nw else None,
                        multiprocessing_context=_mp_context() if nw else None,
                        prefetch_factor=4 if nw else None, persistent_workers=False)
    feats = np.empty((len(grid), encoder.embed_dim), np.float32)
    use_amp = opts.amp and device.type == "cuda"
    bar = tqdm(total=len(grid), desc=desc, unit="patch", leave=False, disable=not opts.progress)
    prev_threads = torch.get_num_threads()
    if device.type == "cpu" and nw > 0:  # leave the readers their cores: oversubscription is slower
        torch.set_num_threads(max(1, min(prev_threads, (os.cpu_count() or 1) - nw)))
    try:
        with torch.inference_mode():
            for patches, idx in loader:
                patches = patches.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    out = encoder(patches)
                feats[idx.numpy()] = out.float().cpu().numpy()
                bar.update(len(idx))
    finally:
        torch.set_num_threads(prev_threads)
        bar.close()
        if ds._slide is not None:
            ds._slide.close()
    if not np.isfinite(feats).all():
        raise SlideChatError("encoder produced non-finite features", path)
    return feats


def _process(path: Path, encoder: Any, opts: ExtractOptions, device: Any, want_thumb: bool) -> SlideResult:
    t0 = time.perf_counter()
    stage = "open"
    try:
        with Slide(path) as slide:
            stage = "resolution"
            res = resolve_resolution(slide, opts.base_mpp, opts.base_magnification)
            stage = "tissue"
            t1 = time.perf_counter()
            mask = whole_slide_mask(slide) if opts.no_tissue_seg else segment_tissue(slide, opts.tissue)
            stage = "patching"
            grid = plan_patches(slide, mask, res, opts.target_magnification, opts.target_mpp,
                                opts.patch_size, opts.tissue_threshold)
            thumb = slide.thumbnail(1024) if want_thumb else None
            dims = slide.dimensions
        t2 = time.perf_counter()
        stage = "encode"
        feats = _encode_grid(path, grid, encoder, opts, device, desc=slide_id(path)[:30])
        t3 = time.perf_counter()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise _StageError(stage, e) from e
    timings = {"open_s": t1 - t0, "segment_s": t2 - t1, "encode_s": t3 - t2,
               "patches_per_s": len(grid) / max(t3 - t2, 1e-9)}
    return SlideResult(slide_id(path), path, feats, grid.coords.copy(), grid, mask, dims, timings, thumb)


def extract_slide_features(slide_path: PathLike, encoder: Any = "conch_v1",
                           checkpoint: Optional[PathLike] = None, **options: Any
                           ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Features of one slide in memory: ``(features float32 [N, D], coords int64 [N, 2], info)``.

    ``encoder`` is a registry name or a built :class:`PatchEncoder`; ``options`` are
    :class:`ExtractOptions` fields (``target_magnification``, ``target_mpp``, ``patch_size``,
    ``base_mpp``, ``tissue_threshold``, ``no_tissue_seg``, ``batch_size``, ``num_workers``, ``device``,
    ``seg_threshold``...). ``info`` holds the grid attributes, tissue mask, timings and provenance.
    Raises :class:`SlideChatError` naming the slide on any failure.
    """
    opts = ExtractOptions.from_kwargs(**options)
    device = resolve_device(opts.device)
    enc = _as_encoder(encoder, checkpoint).to(device).eval()
    try:
        r = _process(Path(slide_path), enc, opts, device, want_thumb=False)
    except _StageError as e:
        raise _as_slide_error(e, Path(slide_path)) from e.cause
    info = {"slide": r.slide, "path": str(r.path), "dimensions": r.dimensions,
            "grid": r.grid.summary(), "coords_attrs": r.grid.coords_attrs(),
            "tissue_mask": r.mask, "timings": r.timings, **enc.provenance()}
    return r.features, r.coords, info


def _as_slide_error(e: _StageError, path: Path) -> SlideChatError:
    c = e.cause
    if isinstance(c, SlideChatError):
        return c
    return SlideChatError(f"{e.stage} failed: {type(c).__name__}: {c}", path)


# ----------------------------------------------------------------------------------------------
# many slides


def output_paths(out_dir: PathLike, sid: str) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"h5": out / "h5_files" / f"{sid}.h5", "csv": out / "csv" / f"{sid}.csv",
            "qc": out / "qc" / f"{sid}.png"}


def _remove_partials_for(out_dir: Path, sid: str) -> int:
    """Remove ``.partial`` leftovers of this slide only (other ranks may be writing theirs)."""
    n = 0
    for sub in ("h5_files", "csv", "qc"):
        for p in (out_dir / sub).glob(f".{_glob.escape(sid)}.*.partial"):
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
    return n


def _write_outputs(r: SlideResult, out_dir: Path, enc: Any, save_csv: bool, save_qc: bool) -> None:
    from slidechat import __version__
    from slidechat.features.io import write_feature_h5, write_slidechat_csv

    paths = output_paths(out_dir, r.slide)
    file_attrs = {"slide_id": r.slide, "slide_path": str(r.path), "slidechat_version": __version__,
                  "n_patches": int(len(r.coords)), "level0_width": int(r.dimensions[0]),
                  "level0_height": int(r.dimensions[1]), "tissue_method": r.mask.method,
                  "tissue_threshold": r.mask.threshold, **enc.provenance(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    coords_attrs = r.grid.coords_attrs()
    coords_attrs["name"] = r.slide
    coords_attrs["level0_dim"] = np.array(r.dimensions, np.int64)
    # secondary outputs first: the H5 is the "done" marker that resume looks for
    if save_csv:
        write_slidechat_csv(paths["csv"], r.features)
    if save_qc and r.thumbnail is not None:
        write_qc_png(paths["qc"], r.thumbnail, r.dimensions, r.mask, r.grid)
    write_feature_h5(paths["h5"], r.features, r.coords, coords_attrs, file_attrs)


def write_qc_png(path: PathLike, thumb: np.ndarray, dims: Tuple[int, int], mask: TissueMask,
                 grid: PatchGrid) -> None:
    """Thumbnail with the tissue contour (green) and kept patches (blue boxes)."""
    import cv2
    from PIL import Image

    img = np.ascontiguousarray(thumb.copy())
    th, tw = img.shape[:2]
    sx, sy = tw / dims[0], th / dims[1]
    if mask.method != "none":
        m = cv2.resize(mask.mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (0, 170, 0), 2)
    ps = grid.patch_size_level0
    for x, y in grid.coords:
        cv2.rectangle(img, (int(x * sx), int(y * sy)), (int((x + ps) * sx) - 1, int((y + ps) * sy) - 1),
                      (30, 60, 220), 1)
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _write_failures(path: Path, failures: List[Dict[str, str]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(FAILURE_COLUMNS))
            w.writeheader()
            w.writerows(failures)


def extract_slides(slide_paths: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                   encoder: Any = "conch_v1", checkpoint: Optional[PathLike] = None,
                   save_csv: bool = False, save_qc: bool = True, overwrite: bool = False,
                   rank: Optional[int] = None, world_size: Optional[int] = None,
                   limit: Optional[int] = None, **options: Any) -> Dict[str, Any]:
    """Extract many slides into ``out_dir`` (``h5_files/``, ``csv/``, ``qc/``, ``failures*.csv``).

    ``slide_paths``: paths, or a folder / glob / CSV-or-text list (see ``collect_slide_paths``).
    Slides are sharded round-robin over ``rank``/``world_size`` (default: torchrun's env). Slides whose
    H5 exists are skipped unless ``overwrite``. Returns a summary dict with ``done``, ``skipped``,
    ``failed`` (list of {slide, path, stage, reason}), ``n_patches``, ``failures_file``.
    """
    from tqdm.auto import tqdm

    from slidechat.features.inputs import collect_slide_paths, limit as _limit, rank_and_world, shard

    opts = ExtractOptions.from_kwargs(**options)
    if isinstance(slide_paths, (str, os.PathLike)):
        slide_paths = collect_slide_paths(slide_paths)
    else:
        slide_paths = [Path(p) for p in slide_paths]
    rank, world = rank_and_world(rank, world_size)
    all_paths = _limit(slide_paths, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fail_path = out / ("failures.csv" if world == 1 else f"failures_rank{rank}.csv")

    # ids must be unique across the whole list (decided identically on every rank)
    failures: List[Dict[str, str]] = []
    seen: Dict[str, Path] = {}
    jobs: List[Tuple[int, Path]] = []
    for i, p in enumerate(all_paths):
        sid = slide_id(p)
        if sid in seen:
            if rank == 0:
                failures.append({"slide": sid, "path": str(p), "stage": "input",
                                 "reason": f"duplicate slide id (also {seen[sid]})"})
            continue
        seen[sid] = p
        jobs.append((i, p))
    mine = [p for _, p in shard(jobs, rank, world)]

    summary: Dict[str, Any] = {"out_dir": str(out), "rank": rank, "world_size": world,
                               "done": [], "skipped": [], "failed": failures, "n_patches": 0,
                               "failures_file": str(fail_path)}
    todo = []
    for p in mine:
        sid = slide_id(p)
        _remove_partials_for(out, sid)
        paths = output_paths(out, sid)
        if paths["h5"].is_file() and not overwrite:
            if save_csv and not paths["csv"].is_file():  # resume a run that lacked --save-csv
                from slidechat.features.io import load_features, write_slidechat_csv

                write_slidechat_csv(paths["csv"], load_features(paths["h5"])[0])
            summary["skipped"].append(sid)
            continue
        todo.append(p)
    if summary["skipped"]:
        logger.info("rank %d: %d slide(s) already done, skipped (use --overwrite to redo)", rank,
                    len(summary["skipped"]))
    if not todo:
        _write_failures(fail_path, failures)
        _log_summary(summary)
        return summary

    device = resolve_device(opts.device)
    enc = _as_encoder(encoder, checkpoint).to(device).eval()
    logger.info("rank %d/%d: %d slide(s) to extract with %s on %s", rank, world, len(todo), enc.name,
                device)
    t0 = time.perf_counter()
    for p in tqdm(todo, desc=f"slides (rank {rank})" if world > 1 else "slides", unit="slide",
                  disable=not opts.progress):
        sid = slide_id(p)
        try:
            r = _process(p, enc, opts, device, want_thumb=save_qc)
            try:
                _write_outputs(r, out, enc, save_csv, save_qc)
            except Exception as e:
                raise _StageError("write", e) from e
        except _StageError as e:
            err = _as_slide_error(e, p)
            reason = err.reason + (f" ({err.hint})" if err.hint else "")
            logger.error("%s: %s failed: %s", sid, e.stage, reason)
            logger.debug("traceback", exc_info=e.cause)
            failures.append({"slide": sid, "path": str(p), "stage": e.stage, "reason": reason})
            _write_failures(fail_path, failures)
            continue
        summary["done"].append(sid)
        summary["n_patches"] += len(r.coords)
        logger.info("%s: %d patches (%s, %.0f patches/s)", sid, len(r.coords),
                    f"{r.grid.patch_size}px@{r.grid.target_magnification:g}x", r.timings["patches_per_s"])
    summary["seconds"] = time.perf_counter() - t0
    _write_failures(fail_path, failures)
    _log_summary(summary)
    return summary


def _log_summary(s: Dict[str, Any]) -> None:
    logger.info("extraction summary (rank %d): %d done, %d skipped, %d failed, %d patches -> %s%s",
                s["rank"], len(s["done"]), len(s["skipped"]), len(s["failed"]), s["n_patches"],
                s["out_dir"], f"; failures in {s['failures_file']}" if s["failed"] else "")
