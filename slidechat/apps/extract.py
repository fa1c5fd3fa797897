"""Raw slides -> per-slide patch features in one output folder (``h5_files/``, ``csv/``, ``qc/``,
``failures*.csv``; or TRIDENT's folders, ``layout="trident"``): the extraction of one slide
(``features.extract``) on the slide runner (``apps.runner``).

A rerun skips slides whose H5 exists; a failing slide is recorded in ``failures*.csv`` and the run goes
on; several jobs may share one ``--out``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from slidechat.apps.runner import (SlideFailed, SlideTask, earlier_run_entries, failure_reason, remove_files,
                                   run_slides)
from slidechat.features.extract import (DEFAULT_LAYOUT, ExtractOptions, OutputLayout, SlideResult, StageError,
                                        as_encoder, extract_slide, format_timings, output_layout, output_paths,
                                        slide_error, write_outputs)
from slidechat.features.encoders import get_preset
from slidechat.features.encoders.base import require_checkpoint
from slidechat.features.io import load_features, write_slidechat_csv
from slidechat.utils.devices import resolve_device
from slidechat.utils.errors import SlideChatError, one_line
from slidechat.utils.outputs import check_output_folder, read_marker, write_marker
from slidechat.utils.paths import PathLike
from slidechat.wsi.slide import check_mpp_source

logger = logging.getLogger(__name__)

#: ``utils.outputs`` kind of an extraction folder
FEATURES_KIND = "feature extraction"


class _Extraction(SlideTask):
    """Feature extraction as the slide runner's per-slide work."""

    finished_word = "done"
    doing_word = "extracting"

    def __init__(self, out: Path, encoder: Any, checkpoint: Optional[PathLike], opts: ExtractOptions,
                 save_csv: bool, save_qc: bool, layout: OutputLayout = DEFAULT_LAYOUT) -> None:
        self.out, self.encoder, self.checkpoint, self.opts = out, encoder, checkpoint, opts
        self.save_csv, self.save_qc, self.layout = save_csv, save_qc, layout
        self.folders = layout.folders  # where the runner looks for a killed run's partial files
        self.device: Any = None

    def finished_file(self, sid: str) -> Path:
        return output_paths(self.out, sid, self.layout)["h5"]  # written last

    def counters(self) -> Dict[str, Any]:
        return {"n_patches": 0}

    def resume(self, sid: str) -> None:
        paths = output_paths(self.out, sid, self.layout)
        if self.save_csv and not paths["csv"].is_file():  # resume a run that lacked --save-csv
            write_slidechat_csv(paths["csv"], load_features(paths["h5"])[0])

    def prepare(self, todo: Sequence[Path], rank: int, world: int) -> None:
        self.device = resolve_device(self.opts.device)
        self.encoder = as_encoder(self.encoder, self.checkpoint).to(self.device).eval()
        logger.info("rank %d/%d: %d slide(s) to extract with %s on %s", rank, world, len(todo),
                    self.encoder.name, self.device)
        off = off_preset_setting(self.encoder, self.opts)
        if off:
            logger.warning(off)

    def run(self, path: Path, sid: str) -> SlideResult:
        try:
            r = extract_slide(path, self.encoder, self.opts, self.device, want_thumb=self.save_qc)
            try:
                write_outputs(r, self.out, self.encoder, self.save_csv, self.save_qc, self.layout)
            except Exception as e:
                raise StageError("write", e) from e
        except StageError as e:
            raise SlideFailed(e.stage, one_line(failure_reason(slide_error(e, path)))) from e.cause
        return r

    def discard(self, sid: str) -> None:
        gone = remove_files(list(output_paths(self.out, sid, self.layout).values()))
        if gone:  # a failed slide leaves none of its outputs (an old CSV/QC, or an H5 being overwritten)
            logger.info("%s: removed its earlier outputs (%s)", sid, ", ".join(str(g) for g in gone))

    def record(self, sid: str, result: SlideResult, summary: Dict[str, Any]) -> None:
        summary["n_patches"] += len(result.coords)
        summary.setdefault("timings", {})[sid] = dict(result.timings)
        logger.info("%s (%s): %s", sid, f"{result.grid.patch_size}px@{result.grid.target_magnification:g}x",
                    format_timings(result.timings, len(result.coords)))


def off_preset_setting(encoder: Any, opts: ExtractOptions) -> Optional[str]:
    """One warning line when the run's magnification or patch size differ from what the encoder's
    authors used (the preset's ``magnification`` / ``patch_px``), else None. Not an error: users
    choose, and SlideChat's own 224 px at 20x is a valid choice for any encoder."""
    preset = getattr(encoder, "preset", None)
    if preset is None or (preset.magnification is None and preset.patch_px is None):
        return None
    mag = opts.magnification
    # 3 %: the tolerance within which patching snaps a scale to the authors' integer one (wsi.patching)
    mag_off = preset.magnification is not None and abs(mag - preset.magnification) > 0.03 * preset.magnification
    size_off = preset.patch_px is not None and int(opts.patch_size) != int(preset.patch_px)
    if not (mag_off or size_off):
        return None
    theirs = " at ".join(v for v in (f"{preset.patch_px} px patches" if preset.patch_px else "",
                                     f"{preset.magnification:g}x" if preset.magnification else "") if v)
    return (f"encoder {preset.name}: its authors used {theirs}; this run extracts {opts.patch_size} px "
            f"patches at {mag:.3g}x (features are valid, but not the authors' setting: "
            "--patch-size / --magnification to match)")


def check_output_dir(out_dir: PathLike, layout: OutputLayout = DEFAULT_LAYOUT) -> Path:
    """The output-folder rule (``utils.outputs``) for extraction, checked before any work: create
    ``out_dir``, prove it writable, and mark it as ours -- or raise one clear error.

    A new or empty folder, or one holding an earlier extraction (resumed: finished slides are skipped),
    is accepted; a non-empty folder holding anything else is refused (``--overwrite`` redoes slides,
    it does not make a user's folder ours), so a user's ``failures.csv`` is never overwritten.
    """
    legacy = partial(earlier_run_entries, layout=layout.top_level)  # a file named like one is refused below
    out = check_output_folder(out_dir, FEATURES_KIND, legacy=legacy, create=True,
                              refuse_hint="extract into a new or empty folder, or into an earlier "
                                          "extraction's --out to resume it")
    for sub in layout.folders:
        q = out / sub
        if q.exists() and not q.is_dir():
            raise SlideChatError("exists and is not a folder (it must hold outputs)", q)
    if read_marker(out) is None:
        write_marker(out, FEATURES_KIND)
    return out


def check_encoder_arguments(encoder: Any, checkpoint: Optional[PathLike]) -> None:
    """The registry's own errors for an encoder name and its missing ``--checkpoint``, raised before
    any slide is listed (the encoder itself is built only when there is work)."""
    if isinstance(encoder, str):
        preset, _ = get_preset(encoder)
        if preset.needs_checkpoint:
            require_checkpoint(checkpoint, encoder)


def check_run(out_dir: PathLike, encoder: Any = "conch_v1", checkpoint: Optional[PathLike] = None,
              layout: str = "slidechat", **options: Any) -> Tuple[Path, ExtractOptions, OutputLayout]:
    """Everything that can be checked before any work (options, encoder name and weights file, output
    layout, ``--out``), so a bad flag fails in a second: ``(out, options, layout)``."""
    opts = ExtractOptions.from_kwargs(**options)
    check_mpp_source(opts.mpp_source)  # before any slide, not as every slide's failure
    where = output_layout(layout, encoder, opts)
    out = check_output_dir(out_dir, where)  # first of the files' checks: nothing else is worth doing without
    check_encoder_arguments(encoder, checkpoint)
    return out, opts, where


def extract_slides(slide_paths: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                   encoder: Any = "conch_v1", checkpoint: Optional[PathLike] = None,
                   save_csv: bool = False, save_qc: bool = True, overwrite: bool = False,
                   rank: Optional[int] = None, world_size: Optional[int] = None,
                   limit: Optional[int] = None, layout: str = "slidechat", **options: Any) -> Dict[str, Any]:
    """Extract many slides into ``out_dir`` (``h5_files/``, ``csv/``, ``qc/``, ``failures*.csv``; with
    ``layout="trident"``, TRIDENT's ``<mag>x_<size>px_0px_overlap/features_<encoder>/``).

    ``slide_paths``: paths, or a folder / glob / CSV-or-text list (see ``collect_slide_paths``).
    Slides are sharded round-robin over ``rank``/``world_size`` (default: torchrun's env). Slides whose
    H5 exists are skipped unless ``overwrite``; jobs sharing ``out_dir`` split the slides (see
    ``apps.runner``). ``options`` are :class:`ExtractOptions` fields. Returns a summary dict with
    ``done``, ``skipped``, ``failed`` (list of {slide, path, stage, reason}), ``busy``, ``n_patches``,
    ``failures_file``.
    """
    out, opts, where = check_run(out_dir, encoder, checkpoint, layout, **options)
    task = _Extraction(out, encoder, checkpoint, opts, save_csv, save_qc, where)
    summary = run_slides(slide_paths, out, task, overwrite=overwrite, rank=rank, world_size=world_size,
                         limit=limit, progress=opts.progress)
    _log_summary(summary)
    return summary


def _log_summary(s: Dict[str, Any]) -> None:
    busy = f", {len(s['busy'])} left to another job" if s.get("busy") else ""
    logger.info("extraction summary (rank %d): %d done, %d skipped%s, %d failed, %d patches -> %s%s",
                s["rank"], len(s["done"]), len(s["skipped"]), busy, len(s["failed"]), s["n_patches"],
                s["out_dir"], f"; failures in {s['failures_file']}" if s["failed"] else "")
