"""Raw slides -> per-slide patch features (H5 in the CLAM/TRIDENT layout, optional SlideChat CSV, QC PNG).

Per slide: open -> resolve level-0 MPP -> tissue mask -> patch grid -> batched encoding. Patches are
read by DataLoader worker processes, each with its own slide handle, and shipped as uint8 batches; the
encoder's resize/normalise runs batched in the main process (on the GPU when there is one, under bf16
autocast). Outputs are written atomically, so a killed run never leaves a file that looks finished, and
a rerun skips slides whose H5 exists. A failing slide is recorded in ``failures*.csv`` and the run goes on.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob as _glob
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from slidechat.utils.annotate import ScaleBar, add_title_and_scale_bar
from slidechat.utils.atomic import atomic_path
from slidechat.utils.devices import resolve_device
from slidechat.utils.errors import SlideChatError
from slidechat.utils.locks import FileLock, try_lock
from slidechat.utils.outputs import check_output_folder, read_marker, write_marker
from slidechat.utils.paths import PathLike
from slidechat.wsi.patching import (DEFAULT_MAGNIFICATION, DEFAULT_PATCH_SIZE, DEFAULT_TISSUE_THRESHOLD,
                                    PatchGrid, plan_patches)
from slidechat.wsi.slide import Slide, resolve_resolution, slide_id
from slidechat.wsi.tissue import TissueMask, TissueParams, whole_slide_mask

logger = logging.getLogger(__name__)

FAILURE_COLUMNS = ("slide", "path", "stage", "reason")
#: ``utils.outputs`` kind of an extraction folder
FEATURES_KIND = "feature extraction"
#: hidden folder of the per-slide locks that let several jobs share one ``--out``
LOCK_DIR = ".locks"


@dataclass
class ExtractOptions:
    """Everything that shapes the patches; defaults follow SlideChat (224 px at 20x)."""

    target_magnification: Optional[float] = DEFAULT_MAGNIFICATION
    target_mpp: Optional[float] = None
    patch_size: int = DEFAULT_PATCH_SIZE
    base_mpp: Optional[float] = None
    base_magnification: Optional[float] = None
    override_metadata: bool = False   # base_mpp/base_magnification replace the file's own resolution
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD
    no_tissue_seg: bool = False
    tissue: TissueParams = field(default_factory=TissueParams)
    batch_size: int = 64
    num_workers: Optional[int] = None  # reader processes; None = balanced automatically
    device: str = "auto"
    amp: bool = True
    progress: bool = True
    run_reads: bool = True   # read runs of adjacent patches as one region, then split
    cache_mb: float = 128    # OpenSlide tile cache per reader process
    host_resize: Optional[bool] = None  # encoder resize in the readers (PIL); None = on CPU only

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "ExtractOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        tissue_names = {f.name for f in dataclasses.fields(TissueParams)}
        unknown = set(kw) - names - {f"seg_{n}" for n in tissue_names}
        if unknown:
            raise TypeError(f"unknown extraction options: {', '.join(sorted(unknown))}")
        tissue = kw.pop("tissue", None) or TissueParams(
            **{n: kw.pop(f"seg_{n}") for n in tissue_names if f"seg_{n}" in kw})
        if kw.get("num_workers") in ("auto", "", -1):
            kw["num_workers"] = None
        return cls(tissue=tissue, **kw)


class _StageError(Exception):
    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stage, self.cause = stage, cause


# ----------------------------------------------------------------------------------------------
# patch reading (runs in DataLoader workers, or in the main process with --num-workers 0)


@dataclass(frozen=True)
class _ReadFailure:
    """A reader error as plain data: it crosses the worker boundary intact (torch would wrap an exception
    in a multi-line traceback text), so the failure line is the same with 0 or N workers."""

    reason: str
    path: Optional[str]
    hint: Optional[str] = None

    @classmethod
    def of(cls, e: BaseException, path: Path) -> "_ReadFailure":
        if isinstance(e, SlideChatError):
            return cls(e.reason, e.path, e.hint)
        return cls(f"{type(e).__name__}: {e}", str(path))

    def error(self) -> SlideChatError:
        return SlideChatError(self.reason, self.path, hint=self.hint)


class PatchReader:
    """Reads a grid's patches as uint8 ``(b, S, S, 3)``: ``S`` is the patch size, or the encoder's input
    size when ``host_resize`` = ``(h, w, filter)`` asks the reader to do the encoder's resize in PIL.

    Fast at every base magnification, with no per-pixel Python: a run of horizontally adjacent patches is
    one ``read_region`` (tiles shared by neighbours decoded once, helped by a per-process tile cache);
    an integer downsample (40x -> 20x) is PIL ``reduce`` on the whole run; a non-integer one is PIL
    ``resize(box=...)`` per patch (area filter); a matching pyramid level is read at its native size.
    """

    def __init__(self, path: PathLike, grid: PatchGrid, batch_size: int = 64, run_reads: bool = True,
                 host_resize: Optional[Tuple[int, int, str]] = None, cache_mb: float = 0,
                 max_run: int = 32, direct_tiles: bool = True) -> None:
        self.path = Path(path)
        self.coords = grid.coords
        self.level = grid.read_level
        self.read_size = grid.read_size
        self.patch_size = grid.patch_size
        self.step0 = grid.step_level0
        self.host_resize = host_resize
        self.cache_mb = cache_mb
        self.max_run = max(1, int(max_run))
        # a run of horizontally adjacent patches is one read when patches tile the level exactly
        exact = abs(grid.patch_size_level0 / grid.read_downsample - grid.read_size) < 1e-6
        self.run_reads = run_reads and exact and grid.step_level0 == grid.patch_size_level0
        ds = grid.read_downsample
        # direct tile decoding needs patch origins on whole pixels of the read level
        self.direct_tiles = direct_tiles and abs(ds - round(ds)) < 1e-9 and \
            bool((grid.coords % max(1, int(round(ds))) == 0).all())
        self.batches = [np.arange(i, min(i + batch_size, len(grid)))
                        for i in range(0, len(grid), max(1, int(batch_size)))]
        self._slide: Optional[Slide] = None
        self._pid: Optional[int] = None

    @property
    def out_size(self) -> Tuple[int, int]:
        return (self.host_resize[0], self.host_resize[1]) if self.host_resize else \
            (self.patch_size, self.patch_size)

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # one handle per process
            self._slide = Slide(self.path)
            self._pid = os.getpid()
            direct = False
            if self.direct_tiles:
                probe = tuple(int(v) for v in self.coords[len(self.coords) // 2]) if len(self.coords) else None
                direct = self._slide.enable_direct_tiles(self.cache_mb, probe)
            if not direct:
                self._slide.set_cache_size(self.cache_mb)
        return self._slide

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def read(self, idx: np.ndarray) -> np.ndarray:
        """uint8 patches for grid rows ``idx`` (any order), at :attr:`out_size`."""
        from PIL import Image

        s = self._handle()
        P, r = self.patch_size, self.read_size
        oh, ow = self.out_size
        out = np.empty((len(idx), oh, ow, 3), np.uint8)
        runs = self._runs(idx) if self.run_reads else [[j] for j in range(len(idx))]
        for run in runs:
            x, y = self.coords[idx[run[0]]]
            if r == P or (r > P and r % P == 0):  # native, or integer downsample (the 40x -> 20x case)
                arr = s.read_region_reduced((int(x), int(y)), self.level, (r * len(run), r), r // P)
                if self.host_resize is None:
                    for k, j in enumerate(run):
                        out[j] = arr[:, k * P:(k + 1) * P]
                else:
                    filt = _PIL_FILTERS[self.host_resize[2]]
                    for k, j in enumerate(run):
                        out[j] = np.asarray(Image.fromarray(arr[:, k * P:(k + 1) * P]).resize((ow, oh), filt))
                continue
            # non-integer factor (or finer than the scan): per patch, area filter down / bicubic up
            region = s.read_region_image((int(x), int(y)), self.level, (r * len(run), r))
            method = Image.Resampling.BOX if r > P else Image.Resampling.BICUBIC
            for k, j in enumerate(run):
                patch = region.resize((P, P), method, box=(k * r, 0, (k + 1) * r, r))
                if self.host_resize is not None:
                    patch = patch.resize((ow, oh), _PIL_FILTERS[self.host_resize[2]])
                out[j] = np.asarray(patch)
        return out

    def _runs(self, idx: np.ndarray) -> List[List[int]]:
        runs: List[List[int]] = []
        for j, row in enumerate(idx):
            if runs and len(runs[-1]) < self.max_run:
                pj = idx[runs[-1][-1]]
                if (self.coords[row, 1] == self.coords[pj, 1]
                        and self.coords[row, 0] - self.coords[pj, 0] == self.step0):
                    runs[-1].append(j)
                    continue
            runs.append([j])
        return runs


_PIL_FILTERS: Dict[str, int] = {"bicubic": 3, "bilinear": 2, "box": 4, "hamming": 5, "lanczos": 1,
                                "nearest": 0}


def _read_batch(reader: PatchReader, idx: np.ndarray) -> Tuple[Any, float]:
    """``(patches or _ReadFailure, seconds)``: failures are values, never exceptions across processes."""
    t = time.perf_counter()
    try:
        out: Any = reader.read(idx)
    except Exception as e:  # noqa: BLE001 - every reader error becomes the slide's one failure line
        out = _ReadFailure.of(e, reader.path)
    return out, time.perf_counter() - t


def _batch_stream(reader: PatchReader, batches: Sequence[np.ndarray]) -> Any:
    """Iterable dataset: each worker reads a *contiguous* share of the batches (neighbouring rows share
    tiles, so the tile cache of that worker decodes each tile once). Yields ``(patches, idx, seconds)``
    or a :class:`_ReadFailure`, then stops."""
    from torch.utils.data import IterableDataset

    class _BatchStream(IterableDataset):
        def __iter__(self) -> Any:
            return _iter_share(reader, list(batches))

    return _BatchStream()


def _iter_share(reader: PatchReader, batches: List[np.ndarray]) -> Any:
    import torch
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    n = len(batches)
    lo, hi = (wid * n) // nw, ((wid + 1) * n) // nw
    for b in batches[lo:hi]:
        arr, secs = _read_batch(reader, b)
        if isinstance(arr, _ReadFailure):
            yield arr
            return
        yield torch.from_numpy(arr), torch.from_numpy(b), secs


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def _mp_context() -> Any:
    """``fork`` where available: workers start in milliseconds. Workers therefore never touch OpenCV,
    whose thread pool does not survive a fork (resizing in workers uses PIL)."""
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def balance_workers(read_s_per_patch: float, encode_s_per_patch: float, encoder_threads: int,
                    device_type: str, cores: Optional[int] = None) -> Tuple[int, int]:
    """``(reader processes, encoder threads)`` from a probe batch's measured costs.

    CPU (both costs measured single-threaded): unless the encoder clearly dominates (> 90 % of the
    probe's time: CONCH or ResNet-50 on CPU, 10-1000x the cost of decoding a patch), every core gets a
    reader and the encoder one thread —
    single-threaded processes time-share the cores without idling, and a 16-patch probe on a shared
    machine is too noisy (3-10x swings measured) for finer splits; when it dominates, one reader and
    every core for the encoder's threads. GPU: enough
    readers that they deliver patches as fast as the GPU encodes them, one core left for the main process.
    """
    cores = cores or cpu_cores()
    r = max(read_s_per_patch, 1e-6)
    e = max(encode_s_per_patch, 1e-6)
    if device_type != "cpu":
        return max(1, min(math.ceil(r / e), max(1, cores - 1))), encoder_threads
    if r / (r + e) >= 0.1:
        return cores, 1
    return 1, cores


# ----------------------------------------------------------------------------------------------
# one slide


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


#: Timing keys, in the order of the log line and the H5 provenance (``timing_<key>`` root attributes).
TIMING_KEYS = ("open_s", "segment_s", "plan_s", "read_s", "encode_s", "write_s", "extract_s",
               "read_wait_s", "total_s")


def format_timings(t: Dict[str, float], n: int) -> str:
    """One line: where the slide's time went."""
    return (f"{n} patches in {t.get('total_s', 0):.2f} s ({t.get('patches_per_s', 0):.0f} patches/s end "
            f"to end): open {t.get('open_s', 0):.2f} s, segment {t.get('segment_s', 0):.2f} s, patch plan "
            f"{t.get('plan_s', 0):.2f} s, read {t.get('read_s', 0):.2f} s in "
            f"{_readers_text(int(t.get('readers', 0)))}, encode {t.get('encode_s', 0):.2f} s on {int(t.get('encoder_threads', 0))} "
            f"thread(s), write {t.get('write_s', 0):.2f} s; waited {t.get('read_wait_s', 0):.2f} s on "
            "the readers")


def _readers_text(n: int) -> str:
    return "the main process" if n == 0 else f"{n} reader process{'es' if n > 1 else ''}"


def _encode_grid(path: Path, grid: PatchGrid, encoder: Any, opts: ExtractOptions, device: Any,
                 desc: str) -> Tuple[np.ndarray, Dict[str, float]]:
    """Features of every patch of ``grid``, and the read/encode timings."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    host = opts.host_resize if opts.host_resize is not None else device.type == "cpu"
    spec = encoder.host_resize_spec(grid.patch_size, grid.patch_size) if host else None
    reader = PatchReader(path, grid, max(1, int(opts.batch_size)), opts.run_reads, spec, opts.cache_mb)
    feats = np.empty((len(grid), encoder.embed_dim), np.float32)
    use_amp = opts.amp and device.type == "cuda"
    bar = tqdm(total=len(grid), desc=desc, unit="patch", leave=False, disable=not opts.progress)
    prev_threads = torch.get_num_threads()
    t = {"read_s": 0.0, "encode_s": 0.0, "read_wait_s": 0.0}

    def encode(patches: Any, idx: np.ndarray) -> None:
        t0 = time.perf_counter()
        patches = patches.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = encoder(patches)
        feats[idx] = out.float().cpu().numpy()
        t["encode_s"] += time.perf_counter() - t0
        bar.update(len(idx))

    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            # probe: a small first batch in this process measures the read and encode costs (small, as
            # the other cores idle meanwhile)
            head = reader.batches[0]
            probe_idx, head_rest = head[:16], head[16:]
            first, secs = _read_batch(reader, probe_idx)
            if isinstance(first, _ReadFailure):
                raise _StageError("read", first.error())
            t["read_s"] += secs
            if opts.num_workers is None and not getattr(encoder, "_slidechat_warm", False):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    encoder(torch.from_numpy(first[:1]).to(device))  # first-call costs out of the probe
                encoder._slidechat_warm = True
            e0 = t["encode_s"]
            if opts.num_workers is None and device.type == "cpu":
                # compare like with like: one reader process vs one encoder thread (CPU seconds per
                # patch); small encoders also run no faster, often slower, on contended extra threads
                torch.set_num_threads(1)
            encode(torch.from_numpy(first), probe_idx)
            torch.set_num_threads(prev_threads)
            n0 = len(probe_idx)
            rest = ([head_rest] if len(head_rest) else []) + reader.batches[1:]
            if opts.num_workers is None:
                nw, threads = balance_workers(secs / n0, (t["encode_s"] - e0) / n0, 1 if device.type == "cpu"
                                              else prev_threads, device.type)
                logger.debug("%s: probe %.2f ms/patch read, %.2f ms/patch encode -> %d reader(s), %d "
                             "encoder thread(s)", desc, 1e3 * secs / n0, 1e3 * (t["encode_s"] - e0) / n0,
                             nw, threads)
            else:
                nw, threads = max(0, int(opts.num_workers)), prev_threads
                if device.type == "cpu" and nw > 0:  # leave the readers their cores
                    threads = max(1, min(prev_threads, cpu_cores() - nw))
            nw = min(nw, len(rest))
            t["readers"], t["encoder_threads"] = float(nw), float(threads)
            if device.type == "cpu":
                torch.set_num_threads(threads)
            if rest:
                loader = DataLoader(_batch_stream(reader, rest), batch_size=None, num_workers=nw,
                                    pin_memory=device.type == "cuda",
                                    worker_init_fn=_worker_init if nw else None,
                                    multiprocessing_context=_mp_context() if nw else None,
                                    prefetch_factor=4 if nw else None, persistent_workers=False)
                t_wait = time.perf_counter()
                for item in loader:
                    t["read_wait_s"] += time.perf_counter() - t_wait
                    if isinstance(item, _ReadFailure):
                        raise _StageError("read", item.error())
                    patches, idx, secs = item
                    t["read_s"] += float(secs)
                    encode(patches, idx.numpy())
                    t_wait = time.perf_counter()
                if nw == 0:  # reads happened inside the loop: not waiting on other processes
                    t["read_wait_s"] = 0.0
    finally:
        torch.set_num_threads(prev_threads)
        bar.close()
        reader.close()
    t["extract_s"] = time.perf_counter() - t_start
    if not np.isfinite(feats).all():
        raise _StageError("encode", SlideChatError("encoder produced non-finite features", path))
    return feats, t


def _process(path: Path, encoder: Any, opts: ExtractOptions, device: Any, want_thumb: bool) -> SlideResult:
    t0 = time.perf_counter()
    stage = "open"
    tm: Dict[str, float] = {}
    try:
        with Slide(path) as slide:
            stage = "resolution"
            res = resolve_resolution(slide, opts.base_mpp, opts.base_magnification,
                                     override=opts.override_metadata)
            t1 = time.perf_counter()
            tm["open_s"] = t1 - t0
            stage = "tissue"
            slide.enable_direct_tiles(min(opts.cache_mb, 32))  # low-res reads, decoded directly
            mask, thumb = _segment_and_thumbnail(slide, opts, want_thumb)
            t2 = time.perf_counter()
            tm["segment_s"] = t2 - t1
            stage = "patching"
            grid = plan_patches(slide, mask, res, opts.target_magnification, opts.target_mpp,
                                opts.patch_size, opts.tissue_threshold)
            dims = slide.dimensions
            tm["plan_s"] = time.perf_counter() - t2
        stage = "encode"
        feats, te = _encode_grid(path, grid, encoder, opts, device, desc=slide_id(path)[:30])
        tm.update(te)
    except KeyboardInterrupt:
        raise
    except _StageError:
        raise
    except Exception as e:
        raise _StageError(stage, e) from e
    tm["total_s"] = time.perf_counter() - t0
    tm["patches_per_s"] = len(grid) / max(tm["total_s"], 1e-9)
    return SlideResult(slide_id(path), path, feats, grid.coords.copy(), grid, mask, dims, tm, thumb)


def _segment_and_thumbnail(slide: Slide, opts: ExtractOptions, want_thumb: bool
                           ) -> Tuple[TissueMask, Optional[np.ndarray]]:
    """Tissue mask and QC thumbnail from one low-resolution read of the slide (not two)."""
    import cv2

    from slidechat.wsi.tissue import auto_downsample, segment_rgb

    W, H = slide.dimensions
    if opts.no_tissue_seg:
        return whole_slide_mask(slide), (slide.thumbnail(1024) if want_thumb else None)
    ds = opts.tissue.downsample or auto_downsample(W, H)
    rgb = slide.read_downsampled(ds)
    mask = segment_rgb(rgb, opts.tissue, level0_per_px=(W / rgb.shape[1], H / rgb.shape[0]))
    thumb = None
    if want_thumb:
        f = min(1.0, 1024 / max(rgb.shape[:2]))
        thumb = rgb if f >= 1.0 else cv2.resize(
            rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
            interpolation=cv2.INTER_AREA)
    return mask, thumb


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
    """All of a slide's outputs, or none: each is written to a temporary file, then all are renamed,
    the H5 (the "done" marker that resume looks for) last. Any failure removes what this call made."""
    from slidechat.utils.version import __version__
    from slidechat.features.io import write_feature_h5, write_slidechat_csv
    from slidechat.utils.atomic import temp_path_for

    t0 = time.perf_counter()
    paths = output_paths(out_dir, r.slide)
    file_attrs = {"slide_id": r.slide, "slide_path": str(r.path), "slidechat_version": __version__,
                  "n_patches": int(len(r.coords)), "level0_width": int(r.dimensions[0]),
                  "level0_height": int(r.dimensions[1]), "tissue_method": r.mask.method,
                  "tissue_threshold": r.mask.threshold, **enc.provenance(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    coords_attrs = r.grid.coords_attrs()
    coords_attrs["name"] = r.slide
    coords_attrs["level0_dim"] = np.array(r.dimensions, np.int64)
    temps: Dict[str, Path] = {}
    renamed: List[Path] = []
    try:
        if save_csv:
            temps["csv"] = temp_path_for(paths["csv"])
            write_slidechat_csv(temps["csv"], r.features, atomic=False)
        if save_qc and r.thumbnail is not None:
            temps["qc"] = temp_path_for(paths["qc"])
            write_qc_png(temps["qc"], r.thumbnail, r.dimensions, r.mask, r.grid, atomic=False,
                         slide_name=r.slide)
        temps["h5"] = temp_path_for(paths["h5"])
        write_feature_h5(temps["h5"], r.features, r.coords, coords_attrs, file_attrs, atomic=False)
        r.timings["write_s"] = time.perf_counter() - t0
        r.timings["total_s"] = r.timings.get("total_s", 0.0) + r.timings["write_s"]
        r.timings["patches_per_s"] = len(r.coords) / max(r.timings["total_s"], 1e-9)
        _add_timing_attrs(temps["h5"], r.timings)
        for key in ("csv", "qc", "h5"):
            if key in temps:
                os.replace(temps[key], paths[key])
                renamed.append(paths[key])
    except BaseException:
        for p in list(temps.values()) + renamed:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise


def _add_timing_attrs(h5_path: Path, timings: Dict[str, float]) -> None:
    """Per-slide timing breakdown in the H5 provenance: ``timing_<key>`` root attributes (seconds) and
    ``timings`` (the same as JSON), so users see where extraction time went."""
    import h5py

    with h5py.File(h5_path, "a") as f:
        for k, v in timings.items():
            f.attrs[f"timing_{k}"] = float(v)
        f.attrs["timings"] = json.dumps({k: round(float(v), 6) for k, v in timings.items()})


def _remove_outputs_for(out_dir: Path, sid: str) -> List[Path]:
    """A failed slide leaves none of its outputs (an old CSV/QC, or an H5 being overwritten)."""
    gone = []
    for p in output_paths(out_dir, sid).values():
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
    return gone


def is_failures_csv(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return tuple(next(csv.reader(fh), ())) == FAILURE_COLUMNS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def legacy_extraction_entries(folder: Path) -> Optional[set]:
    """The entries of an extraction folder written before the output marker (``h5_files/``, ``csv/``,
    ``qc/``, our ``failures*.csv``), or ``None`` when the folder holds anything else (not ours)."""
    names = {e for e in os.listdir(folder) if not e.startswith(".")}
    if not names:
        return None
    for e in names:
        p = folder / e
        if e in ("h5_files", "csv", "qc"):  # a file there is refused by name in check_output_dir
            continue
        if e.startswith("failures") and e.endswith(".csv") and p.is_file() and is_failures_csv(p):
            continue
        return None
    return names


def check_output_dir(out_dir: PathLike) -> Path:
    """The output-folder rule (``utils.outputs``) for extraction, checked before any work: create
    ``out_dir``, prove it writable, and mark it as ours -- or raise one clear error.

    A new or empty folder, or one holding an earlier extraction (resumed: finished slides are skipped),
    is accepted; a non-empty folder holding anything else is refused (``--overwrite`` redoes slides,
    it does not make a user's folder ours), so a user's ``failures.csv`` is never overwritten.
    """
    out = check_output_folder(out_dir, FEATURES_KIND, legacy=legacy_extraction_entries, create=True,
                              refuse_hint="extract into a new or empty folder, or into an earlier "
                                          "extraction's --out to resume it")
    for sub in ("h5_files", "csv", "qc"):
        q = out / sub
        if q.exists() and not q.is_dir():
            raise SlideChatError("exists and is not a folder (it must hold outputs)", q)
    if read_marker(out) is None:
        write_marker(out, FEATURES_KIND)
    return out


def write_qc_png(path: PathLike, thumb: np.ndarray, dims: Tuple[int, int], mask: TissueMask,
                 grid: PatchGrid, atomic: bool = True, slide_name: Optional[str] = None) -> Optional[ScaleBar]:
    """Thumbnail with the tissue contour (green) and kept patches (blue boxes), titled with the slide
    name, patch count, magnification and MPP, and a scale bar (level-0 MPP x the thumbnail's
    downsample), so the picture says what it shows on its own. Returns the bar drawn (None: MPP unknown)."""
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
    name = slide_name or slide_id(Path(path))
    title = [f"{name}: {len(grid)} patches (blue), tissue (green)",
             f"{grid.patch_size} px patches at {grid.target_magnification:g}x ({grid.target_mpp:g} um/px); "
             f"scan {grid.base_mpp:g} um/px ({grid.mpp_source}), {dims[0]}x{dims[1]} px"]
    img, bar, _ = add_title_and_scale_bar(img, title, grid.base_mpp * dims[0] / tw)
    with (atomic_path(path) if atomic else contextlib.nullcontext(Path(path))) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)  # QC: speed over bytes
    return bar


def _lock_path(out_dir: Path, name: str) -> Path:
    return out_dir / LOCK_DIR / f"{name}.lock"


def _write_failures(path: Path, failures: List[Dict[str, str]], others: Sequence[str] = ()) -> None:
    """Write this run's ``failures``, keeping the rows already there for the slides in ``others``
    (slides another job on the same ``--out`` handles). Serialised by a lock, so two jobs never drop
    each other's rows."""
    keep = set(others)
    with FileLock(_lock_path(path.parent, path.name)):
        rows: List[Dict[str, str]] = []
        if keep and path.is_file() and is_failures_csv(path):
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("slide") in keep]
        mine = {f["slide"] for f in failures}
        rows = [r for r in rows if r.get("slide") not in mine] + list(failures)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(FAILURE_COLUMNS), extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)


def extract_slides(slide_paths: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                   encoder: Any = "conch_v1", checkpoint: Optional[PathLike] = None,
                   save_csv: bool = False, save_qc: bool = True, overwrite: bool = False,
                   rank: Optional[int] = None, world_size: Optional[int] = None,
                   limit: Optional[int] = None, **options: Any) -> Dict[str, Any]:
    """Extract many slides into ``out_dir`` (``h5_files/``, ``csv/``, ``qc/``, ``failures*.csv``).

    ``slide_paths``: paths, or a folder / glob / CSV-or-text list (see ``collect_slide_paths``).
    Slides are sharded round-robin over ``rank``/``world_size`` (default: torchrun's env). Slides whose
    H5 exists are skipped unless ``overwrite``. Returns a summary dict with ``done``, ``skipped``,
    ``failed`` (list of {slide, path, stage, reason}), ``busy``, ``n_patches``, ``failures_file``.

    Several jobs may share one ``out_dir`` (a re-queued cluster job, or a job array run twice): each
    slide is extracted under its own lock (``.locks/<slide>.lock``), so a job leaves a slide that
    another is extracting (``busy``) or has finished to it, and the jobs split the work instead of
    both redoing every slide. With ``overwrite``, a slide finished by another job during this run is
    not redone either.
    """
    from tqdm.auto import tqdm

    from slidechat.features.inputs import collect_slide_paths, limit as _limit, rank_and_world, unique_shard

    opts = ExtractOptions.from_kwargs(**options)
    run_started = time.time()
    out = check_output_dir(out_dir)  # before any work: a bad --out fails in a second
    if isinstance(slide_paths, (str, os.PathLike)):
        slide_paths = collect_slide_paths(slide_paths)
    else:
        slide_paths = [Path(p) for p in slide_paths]
    rank, world = rank_and_world(rank, world_size)
    all_paths = _limit(slide_paths, limit)
    fail_path = out / ("failures.csv" if world == 1 else f"failures_rank{rank}.csv")

    mine, failures = unique_shard(all_paths, rank, world)  # ids unique across the whole list

    summary: Dict[str, Any] = {"out_dir": str(out), "rank": rank, "world_size": world,
                               "done": [], "skipped": [], "failed": failures, "busy": [], "n_patches": 0,
                               "failures_file": str(fail_path)}
    todo = []
    for p in mine:
        sid = slide_id(p)
        paths = output_paths(out, sid)
        if paths["h5"].is_file() and not overwrite:
            with try_lock(_lock_path(out, sid)) as got:
                if got:  # leftovers of a killed run only when no other job is writing this slide
                    _remove_partials_for(out, sid)
                if got and save_csv and not paths["csv"].is_file():  # resume a run that lacked --save-csv
                    from slidechat.features.io import load_features, write_slidechat_csv

                    write_slidechat_csv(paths["csv"], load_features(paths["h5"])[0])
            summary["skipped"].append(sid)
            continue
        todo.append(p)
    if summary["skipped"]:
        logger.info("rank %d: %d slide(s) already done, skipped (use --overwrite to redo)", rank,
                    len(summary["skipped"]))
    if not todo:
        _write_failures(fail_path, failures, summary["busy"])
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
        lock = FileLock(_lock_path(out, sid))
        if not lock.acquire():
            logger.info("%s: another job on %s is extracting it; left to that job", sid, out)
            summary["busy"].append(sid)
            continue
        try:
            h5 = output_paths(out, sid)["h5"]
            if h5.is_file() and (not overwrite or h5.stat().st_mtime >= run_started):
                logger.info("%s: finished by another job on %s meanwhile; skipped", sid, out)
                summary["skipped"].append(sid)
                continue
            _remove_partials_for(out, sid)  # only under the slide's lock: another job may be writing
            r = _process(p, enc, opts, device, want_thumb=save_qc)
            try:
                _write_outputs(r, out, enc, save_csv, save_qc)
            except Exception as e:
                raise _StageError("write", e) from e
        except _StageError as e:
            err = _as_slide_error(e, p)
            reason = _one_line(err.reason + (f" ({err.hint})" if err.hint else ""))
            logger.error("%s: %s failed: %s", sid, e.stage, reason)
            logger.debug("traceback", exc_info=e.cause)
            gone = _remove_outputs_for(out, sid)
            if gone:
                logger.info("%s: removed its earlier outputs (%s)", sid, ", ".join(str(g) for g in gone))
            failures.append({"slide": sid, "path": str(p), "stage": e.stage, "reason": reason})
            _write_failures(fail_path, failures, summary["busy"])
            continue
        finally:
            lock.release()
        summary["done"].append(sid)
        summary["n_patches"] += len(r.coords)
        summary.setdefault("timings", {})[sid] = dict(r.timings)
        logger.info("%s (%s): %s", sid, f"{r.grid.patch_size}px@{r.grid.target_magnification:g}x",
                    format_timings(r.timings, len(r.coords)))
    summary["seconds"] = time.perf_counter() - t0
    _write_failures(fail_path, failures, summary["busy"])
    _log_summary(summary)
    return summary


def _one_line(text: str) -> str:
    """Failure reasons go to a CSV cell and one console line: no embedded newlines."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _log_summary(s: Dict[str, Any]) -> None:
    busy = f", {len(s['busy'])} left to another job" if s.get("busy") else ""
    logger.info("extraction summary (rank %d): %d done, %d skipped%s, %d failed, %d patches -> %s%s",
                s["rank"], len(s["done"]), len(s["skipped"]), busy, len(s["failed"]), s["n_patches"],
                s["out_dir"], f"; failures in {s['failures_file']}" if s["failed"] else "")
