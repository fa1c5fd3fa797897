"""One slide -> patch features, and that slide's output files (H5 in the CLAM/TRIDENT layout, optional
SlideChat CSV, QC PNG).

Per slide: open once -> resolve level-0 MPP -> tissue mask -> patch grid -> batched encoding, all on the
one slide handle (worker processes open their own). Patches are read by ``wsi.reader`` and shipped as
uint8 batches; the encoder's resize/normalise runs batched in this process (on the GPU when there is
one, under bf16 autocast). Outputs are written atomically, so a killed run never leaves a file that
looks finished. Many slides: ``apps.extract`` on the slide runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from slidechat.features.encoders import PatchEncoder, build_encoder, get_preset
from slidechat.features.io import write_feature_h5, write_slidechat_csv
from slidechat.utils.annotate import ScaleBar, add_title_and_scale_bar
from slidechat.utils.atomic import atomic_path, temp_path_for
from slidechat.utils.devices import resolve_device
from slidechat.utils.errors import SlideChatError, exception_text
from slidechat.utils.paths import PathLike
from slidechat.utils.version import __version__
from slidechat.wsi.patching import (DEFAULT_MAGNIFICATION, DEFAULT_PATCH_SIZE, DEFAULT_TISSUE_THRESHOLD,
                                    PatchGrid, plan_patches)
from slidechat.wsi.reader import PatchReader, ReadFailure, balance_workers, cpu_cores, read_batch, stream_batches
from slidechat.wsi.slide import Slide, resolve_resolution, slide_id
from slidechat.wsi.tissue import TissueMask, TissueParams, auto_downsample, segment_rgb, whole_slide_mask

logger = logging.getLogger(__name__)

#: ``--layout``: ``slidechat`` (``h5_files/``, ``csv/``, ``qc/``) or ``trident`` (TRIDENT's folders)
LAYOUTS = ("slidechat", "trident")


@dataclass
class ExtractOptions:
    """Everything that shapes the patches; defaults follow SlideChat (224 px at 20x)."""

    target_magnification: Optional[float] = DEFAULT_MAGNIFICATION
    target_mpp: Optional[float] = None
    patch_size: int = DEFAULT_PATCH_SIZE
    base_mpp: Optional[float] = None
    base_magnification: Optional[float] = None
    override_metadata: bool = False   # base_mpp/base_magnification replace the file's own resolution
    mpp_source: str = "auto"          # which metadata field sets the resolution (wsi.slide.MPP_SOURCES)
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

    @property
    def magnification(self) -> float:
        """The target magnification as patching resolves it (``wsi.patching.plan_patches``): 10 / MPP when
        an MPP is asked for, else the magnification, else the default."""
        if self.target_mpp:
            return 10.0 / self.target_mpp
        return float(self.target_magnification or DEFAULT_MAGNIFICATION)

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



class StageError(Exception):
    """A slide's failure at one stage (open, resolution, tissue, patching, read, encode, write)."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stage, self.cause = stage, cause


def as_encoder(encoder: Any, checkpoint: Optional[PathLike]) -> Any:
    """A built :class:`PatchEncoder` from a registry name (or the encoder itself)."""
    if isinstance(encoder, PatchEncoder):
        return encoder
    if isinstance(encoder, str):
        return build_encoder(encoder, checkpoint)
    raise SlideChatError(f"encoder must be a name or a PatchEncoder, got {type(encoder).__name__}")


@dataclass
class SlideResult:
    """One slide's features in memory, with what its output files record (grid, mask, timings)."""

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
    return (f"{n} patches in {t.get('total_s', 0):.2f} s ({_rate(t.get('patches_per_s', 0))} patches/s end "
            f"to end): open {t.get('open_s', 0):.2f} s, segment {t.get('segment_s', 0):.2f} s, patch plan "
            f"{t.get('plan_s', 0):.2f} s, read {t.get('read_s', 0):.2f} s in "
            f"{_readers_text(int(t.get('readers', 0)))}, encode {t.get('encode_s', 0):.2f} s on "
            f"{int(t.get('encoder_threads', 0))} thread(s), write {t.get('write_s', 0):.2f} s; waited {t.get('read_wait_s', 0):.2f} s on "
            "the readers")


def _rate(per_s: float) -> str:
    """Whole patches per second, or 3 significant digits below 100 (a large encoder on CPU: 0.223, not 0)."""
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _readers_text(n: int) -> str:
    return "the main process" if n == 0 else f"{n} reader process{'es' if n > 1 else ''}"



class _BatchEncoder:
    """Encodes uint8 patch batches into the slide's feature array, adding its time to ``encode_s``."""

    def __init__(self, encoder: Any, device: Any, amp: bool, feats: np.ndarray, timings: Dict[str, float],
                 bar: Any) -> None:
        self.encoder, self.device, self.feats, self.timings, self.bar = encoder, device, feats, timings, bar
        self.use_amp = amp and device.type == "cuda"

    def autocast(self) -> Any:
        import torch

        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def __call__(self, patches: Any, idx: np.ndarray) -> None:
        t0 = time.perf_counter()
        patches = patches.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.encoder(patches)
        self.feats[idx] = out.float().cpu().numpy()
        self.timings["encode_s"] += time.perf_counter() - t0
        self.bar.update(len(idx))


def _encode_grid(slide: Slide, grid: PatchGrid, encoder: Any, opts: ExtractOptions, device: Any,
                 desc: str) -> Tuple[np.ndarray, Dict[str, float]]:
    """Features of every patch of ``grid``, and the read/encode timings. This process reads on
    ``slide`` (the handle opened for the whole extraction); reader processes open their own."""
    import torch
    from tqdm.auto import tqdm

    host = opts.host_resize if opts.host_resize is not None else device.type == "cpu"
    spec = encoder.host_resize_spec(grid.patch_size, grid.patch_size) if host else None
    reader = PatchReader(slide.path, grid, max(1, int(opts.batch_size)), opts.run_reads, spec, opts.cache_mb,
                         slide=slide)
    feats = np.empty((len(grid), encoder.embed_dim), np.float32)
    bar = tqdm(total=len(grid), desc=desc, unit="patch", leave=False, disable=not opts.progress)
    prev_threads = torch.get_num_threads()
    t = {"read_s": 0.0, "encode_s": 0.0, "read_wait_s": 0.0}
    encode = _BatchEncoder(encoder, device, opts.amp, feats, t, bar)
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            rest, nw, threads = _probe(reader, encode, opts, desc)
            t["readers"], t["encoder_threads"] = float(nw), float(threads)
            if device.type == "cpu":
                torch.set_num_threads(threads)
            if rest:
                _encode_from_readers(reader, rest, nw, encode)
    finally:
        torch.set_num_threads(prev_threads)
        bar.close()
        reader.close()
    t["extract_s"] = time.perf_counter() - t_start
    if not np.isfinite(feats).all():
        raise StageError("encode", SlideChatError("encoder produced non-finite features", slide.path))
    return feats, t


def _probe(reader: PatchReader, encode: _BatchEncoder, opts: ExtractOptions, desc: str
           ) -> Tuple[List[np.ndarray], int, int]:
    """Read and encode a small first batch in this process (small, as the other cores idle meanwhile);
    from its measured costs, the reader processes and encoder threads for the rest (unless
    ``opts.num_workers`` fixes them). Returns ``(remaining batches, readers, encoder threads)``."""
    import torch

    device, t = encode.device, encode.timings
    auto = opts.num_workers is None
    prev_threads = torch.get_num_threads()
    head = reader.batches[0]
    probe_idx, head_rest = head[:16], head[16:]
    first, secs = read_batch(reader, probe_idx)
    if isinstance(first, ReadFailure):
        raise StageError("read", first.error())
    t["read_s"] += secs
    if auto and not getattr(encode.encoder, "_slidechat_warm", False):
        with encode.autocast():
            encode.encoder(torch.from_numpy(first[:1]).to(device))  # first-call costs out of the probe
        encode.encoder._slidechat_warm = True
    e0 = t["encode_s"]
    if auto and device.type == "cpu":
        # compare like with like: one reader process vs one encoder thread (CPU seconds per patch);
        # small encoders also run no faster, often slower, on contended extra threads
        torch.set_num_threads(1)
    encode(torch.from_numpy(first), probe_idx)
    torch.set_num_threads(prev_threads)
    n0 = len(probe_idx)
    rest = ([head_rest] if len(head_rest) else []) + reader.batches[1:]
    if auto:
        nw, threads = balance_workers(secs / n0, (t["encode_s"] - e0) / n0, 1 if device.type == "cpu"
                                      else prev_threads, device.type)
        logger.debug("%s: probe %.2f ms/patch read, %.2f ms/patch encode -> %d reader(s), %d "
                     "encoder thread(s)", desc, 1e3 * secs / n0, 1e3 * (t["encode_s"] - e0) / n0,
                     nw, threads)
    else:
        nw, threads = max(0, int(opts.num_workers)), prev_threads
        if device.type == "cpu" and nw > 0:  # leave the readers their cores
            threads = max(1, min(prev_threads, cpu_cores() - nw))
    return rest, min(nw, len(rest)), threads


def _encode_from_readers(reader: PatchReader, batches: List[np.ndarray], nw: int,
                         encode: _BatchEncoder) -> None:
    """Encode ``batches`` as ``nw`` reader processes deliver them (0: read in this process), timing
    the reads and the waits on the readers. Each batch is encoded before the next is asked for: its
    shared-memory slot is then reused (see ``stream_batches``)."""
    import torch

    t = encode.timings
    t_wait = time.perf_counter()
    for item in stream_batches(reader, batches, nw):
        t["read_wait_s"] += time.perf_counter() - t_wait
        if isinstance(item, ReadFailure):
            raise StageError("read", item.error())
        patches, idx, secs = item
        t["read_s"] += float(secs)
        encode(torch.from_numpy(patches), idx)
        t_wait = time.perf_counter()
    if nw == 0:  # reads happened inside the loop: not waiting on other processes
        t["read_wait_s"] = 0.0


def extract_slide(path: Path, encoder: Any, opts: ExtractOptions, device: Any, want_thumb: bool
                  ) -> SlideResult:
    """One slide's features in memory. The slide is opened once: resolution, tissue, grid and this
    process's patch reads all use that handle. Any failure is a :class:`StageError` naming its stage."""
    t0 = time.perf_counter()
    stage = "open"
    tm: Dict[str, float] = {}
    try:
        with Slide(path) as slide:
            stage = "resolution"
            res = resolve_resolution(slide, opts.base_mpp, opts.base_magnification,
                                     override=opts.override_metadata, mpp_source=opts.mpp_source)
            t1 = time.perf_counter()
            tm["open_s"] = t1 - t0
            stage = "tissue"
            slide.enable_direct_tiles(opts.cache_mb)  # tissue reads first, then this process's patch reads
            mask, thumb = _segment_and_thumbnail(slide, opts, want_thumb)
            t2 = time.perf_counter()
            tm["segment_s"] = t2 - t1
            stage = "patching"
            grid = plan_patches(slide, mask, res, opts.target_magnification, opts.target_mpp,
                                opts.patch_size, opts.tissue_threshold)
            dims = slide.dimensions
            tm["plan_s"] = time.perf_counter() - t2
            stage = "encode"
            feats, te = _encode_grid(slide, grid, encoder, opts, device, desc=slide_id(path)[:30])
            tm.update(te)
    except KeyboardInterrupt:
        raise
    except StageError:
        raise
    except Exception as e:
        raise StageError(stage, e) from e
    tm["total_s"] = time.perf_counter() - t0
    tm["patches_per_s"] = len(grid) / max(tm["total_s"], 1e-9)
    return SlideResult(slide_id(path), path, feats, grid.coords.copy(), grid, mask, dims, tm, thumb)


def _segment_and_thumbnail(slide: Slide, opts: ExtractOptions, want_thumb: bool
                           ) -> Tuple[TissueMask, Optional[np.ndarray]]:
    """Tissue mask and QC thumbnail from one low-resolution read of the slide (not two)."""
    import cv2

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
    enc = as_encoder(encoder, checkpoint).to(device).eval()
    try:
        r = extract_slide(Path(slide_path), enc, opts, device, want_thumb=False)
    except StageError as e:
        raise slide_error(e, Path(slide_path)) from e.cause
    info = {"slide": r.slide, "path": str(r.path), "dimensions": r.dimensions,
            "grid": r.grid.summary(), "coords_attrs": r.grid.coords_attrs(),
            "tissue_mask": r.mask, "timings": r.timings, **enc.provenance()}
    return r.features, r.coords, info


def slide_error(e: StageError, path: Path) -> SlideChatError:
    """The :class:`SlideChatError` a stage failure stands for (its own, or one naming the stage)."""
    c = e.cause
    if isinstance(c, SlideChatError):
        return c
    return SlideChatError(f"{e.stage} failed: {exception_text(c)}", path)


# ----------------------------------------------------------------------------------------------
# one slide's output files


@dataclass(frozen=True)
class OutputLayout:
    """Where a slide's H5, CSV and QC picture go, as folders relative to ``--out``.

    The default is slidechat's own (``h5_files/``, ``csv/``, ``qc/``). ``trident`` follows TRIDENT's
    job folder, ``<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5`` (mahmoodlab/TRIDENT,
    run_batch_of_slides.py: ``f"{float(args.mag):g}x_{patch_size}px_{overlap}px_overlap"``; trident/
    wsi_objects/WSI.py ``extract_patch_features``: ``features_<encoder>/<slide>.h5``), so its files and
    ours move between the two tools; the CSV and QC picture go next to it (``csv_<encoder>/``, ``qc/``).
    """

    h5: str = "h5_files"
    csv: str = "csv"
    qc: str = "qc"
    kind: str = "slidechat"

    @classmethod
    def trident(cls, encoder_name: str, magnification: float, patch_size: int, overlap: int = 0
                ) -> "OutputLayout":
        grid = f"{float(magnification):g}x_{int(patch_size)}px_{int(overlap)}px_overlap"
        name = _folder_safe(encoder_name)
        return cls(f"{grid}/features_{name}", f"{grid}/csv_{name}", f"{grid}/qc", "trident")

    @property
    def folders(self) -> Tuple[str, ...]:
        return (self.h5, self.csv, self.qc)

    @property
    def top_level(self) -> Tuple[str, ...]:
        """The entries directly under ``--out`` (what an earlier run of this layout leaves there)."""
        return tuple(dict.fromkeys(f.split("/")[0] for f in self.folders))

    def paths(self, out_dir: PathLike, sid: str) -> Dict[str, Path]:
        out = Path(out_dir)
        return {"h5": out / self.h5 / f"{sid}.h5", "csv": out / self.csv / f"{sid}.csv",
                "qc": out / self.qc / f"{sid}.png"}


DEFAULT_LAYOUT = OutputLayout()
#: the default layout's output folders under ``--out``, one file per slide in each
OUTPUT_FOLDERS = DEFAULT_LAYOUT.folders


def _folder_safe(name: str) -> str:
    """An encoder name as a folder name (``timm:vit_small`` -> ``timm_vit_small``)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def encoder_folder_name(encoder: Any) -> str:
    """TRIDENT's name for the encoder (the preset's ``trident_name``), else its own name."""
    if isinstance(encoder, PatchEncoder):
        preset = encoder.preset
        return (preset.trident_name if preset is not None else None) or encoder.name
    preset, _ = get_preset(str(encoder))
    return preset.trident_name or str(encoder)


def output_layout(kind: str, encoder: Any, opts: "ExtractOptions") -> OutputLayout:
    """The layout of a run: ``kind`` one of :data:`LAYOUTS`; ``encoder`` a name or a built encoder."""
    if kind not in LAYOUTS:
        raise SlideChatError(f"--layout must be one of {', '.join(LAYOUTS)}, got {kind!r}")
    if kind == "slidechat":
        return DEFAULT_LAYOUT
    return OutputLayout.trident(encoder_folder_name(encoder), opts.magnification, opts.patch_size)


def output_paths(out_dir: PathLike, sid: str, layout: OutputLayout = DEFAULT_LAYOUT) -> Dict[str, Path]:
    """The H5, CSV and QC paths of slide ``sid`` under an extraction's ``out_dir``."""
    return layout.paths(out_dir, sid)


def write_outputs(r: SlideResult, out_dir: Path, enc: Any, save_csv: bool, save_qc: bool,
                  layout: OutputLayout = DEFAULT_LAYOUT) -> None:
    """All of a slide's outputs, or none: each is written to a temporary file, then all are renamed,
    the H5 (the "done" marker that resume looks for) last. Any failure removes what this call made."""
    t0 = time.perf_counter()
    paths = output_paths(out_dir, r.slide, layout)
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
        coords_attrs, file_attrs = _h5_attrs(r, enc, paths["h5"], layout)
        write_feature_h5(temps["h5"], r.features, r.coords, coords_attrs, file_attrs, atomic=False)
        r.timings["write_s"] = time.perf_counter() - t0
        r.timings["total_s"] = r.timings.get("total_s", 0.0) + r.timings["write_s"]
        r.timings["patches_per_s"] = len(r.coords) / max(r.timings["total_s"], 1e-9)
        # TRIDENT's feature-dataset attributes (trident/wsi_objects/WSI.py extract_patch_features)
        _add_h5_attrs(temps["h5"], _timing_attrs(r.timings),
                      {"name": r.slide, "savetodir": str(paths["h5"].parent)})
        for key in ("csv", "qc", "h5"):
            if key in temps:
                os.replace(temps[key], paths[key])
                renamed.append(paths[key])
    except BaseException:
        for p in list(temps.values()) + renamed:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise


def _h5_attrs(r: SlideResult, enc: Any, h5_path: Path, layout: OutputLayout
              ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(coords attributes, root attributes)`` of a slide's H5: the grid in CLAM's and TRIDENT's words
    (TRIDENT's coords writer, trident/IO.py ``coords_to_h5``: ``patch_size``, ``patch_size_level0``,
    ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``,
    ``level0_width``, ``level0_height``), and the provenance: the encoder's preset, version,
    preprocessing, output rule and weights, and how the slide's resolution was settled."""
    coords_attrs = r.grid.coords_attrs()
    coords_attrs.update({"name": r.slide, "level0_dim": np.array(r.dimensions, np.int64),
                         "level0_width": int(r.dimensions[0]), "level0_height": int(r.dimensions[1]),
                         "savetodir": str(h5_path.parent.parent)})
    file_attrs = {"slide_id": r.slide, "slide_path": str(r.path), "slidechat_version": __version__,
                  "n_patches": int(len(r.coords)), "level0_width": int(r.dimensions[0]),
                  "level0_height": int(r.dimensions[1]), "tissue_method": r.mask.method,
                  "tissue_threshold": r.mask.threshold, **enc.provenance(),
                  "resolution_source": r.grid.mpp_source, "resolution_note": r.grid.resolution_note,
                  "output_layout": layout.kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return coords_attrs, file_attrs


def _timing_attrs(timings: Dict[str, float]) -> Dict[str, Any]:
    """Per-slide timing breakdown for the H5 provenance: ``timing_<key>`` root attributes (seconds) and
    ``timings`` (the same as JSON), so users see where extraction time went."""
    out: Dict[str, Any] = {f"timing_{k}": float(v) for k, v in timings.items()}
    out["timings"] = json.dumps({k: round(float(v), 6) for k, v in timings.items()})
    return out


def _add_h5_attrs(h5_path: Path, root: Dict[str, Any], features: Dict[str, Any]) -> None:
    """Attributes known only once the H5 is written: on the root, and on the ``features`` dataset."""
    import h5py

    with h5py.File(h5_path, "a") as f:
        for k, v in root.items():
            f.attrs[k] = v
        for k, v in features.items():
            f["features"].attrs[k] = v


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


