"""Raw slides -> per-slide patch features in one output folder (``h5_files/``, ``csv/``, ``qc/``,
``failures*.csv``): the extraction of one slide (``features.extract``) on the slide runner
(``apps.runner``).

A rerun skips slides whose H5 exists; a failing slide is recorded in ``failures*.csv`` and the run goes
on; several jobs may share one ``--out``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from slidechat.apps.runner import (SlideFailed, SlideTask, earlier_run_entries, failure_reason, remove_files,
                                   run_slides)
from slidechat.features.extract import (OUTPUT_FOLDERS, ExtractOptions, SlideResult, StageError, as_encoder,
                                        extract_slide, format_timings, output_paths, slide_error, write_outputs)
from slidechat.features.io import load_features, write_slidechat_csv
from slidechat.utils.devices import resolve_device
from slidechat.utils.errors import SlideChatError, one_line
from slidechat.utils.outputs import check_output_folder, read_marker, write_marker
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

#: ``utils.outputs`` kind of an extraction folder
FEATURES_KIND = "feature extraction"


class _Extraction(SlideTask):
    """Feature extraction as the slide runner's per-slide work."""

    folders = OUTPUT_FOLDERS
    finished_word = "done"
    doing_word = "extracting"

    def __init__(self, out: Path, encoder: Any, checkpoint: Optional[PathLike], opts: ExtractOptions,
                 save_csv: bool, save_qc: bool) -> None:
        self.out, self.encoder, self.checkpoint, self.opts = out, encoder, checkpoint, opts
        self.save_csv, self.save_qc = save_csv, save_qc
        self.device: Any = None

    def finished_file(self, sid: str) -> Path:
        return output_paths(self.out, sid)["h5"]  # written last

    def counters(self) -> Dict[str, Any]:
        return {"n_patches": 0}

    def resume(self, sid: str) -> None:
        paths = output_paths(self.out, sid)
        if self.save_csv and not paths["csv"].is_file():  # resume a run that lacked --save-csv
            write_slidechat_csv(paths["csv"], load_features(paths["h5"])[0])

    def prepare(self, todo: Sequence[Path], rank: int, world: int) -> None:
        self.device = resolve_device(self.opts.device)
        self.encoder = as_encoder(self.encoder, self.checkpoint).to(self.device).eval()
        logger.info("rank %d/%d: %d slide(s) to extract with %s on %s", rank, world, len(todo),
                    self.encoder.name, self.device)

    def run(self, path: Path, sid: str) -> SlideResult:
        try:
            r = extract_slide(path, self.encoder, self.opts, self.device, want_thumb=self.save_qc)
            try:
                write_outputs(r, self.out, self.encoder, self.save_csv, self.save_qc)
            except Exception as e:
                raise StageError("write", e) from e
        except StageError as e:
            raise SlideFailed(e.stage, one_line(failure_reason(slide_error(e, path)))) from e.cause
        return r

    def discard(self, sid: str) -> None:
        gone = remove_files(list(output_paths(self.out, sid).values()))
        if gone:  # a failed slide leaves none of its outputs (an old CSV/QC, or an H5 being overwritten)
            logger.info("%s: removed its earlier outputs (%s)", sid, ", ".join(str(g) for g in gone))

    def record(self, sid: str, result: SlideResult, summary: Dict[str, Any]) -> None:
        summary["n_patches"] += len(result.coords)
        summary.setdefault("timings", {})[sid] = dict(result.timings)
        logger.info("%s (%s): %s", sid, f"{result.grid.patch_size}px@{result.grid.target_magnification:g}x",
                    format_timings(result.timings, len(result.coords)))


def check_output_dir(out_dir: PathLike) -> Path:
    """The output-folder rule (``utils.outputs``) for extraction, checked before any work: create
    ``out_dir``, prove it writable, and mark it as ours -- or raise one clear error.

    A new or empty folder, or one holding an earlier extraction (resumed: finished slides are skipped),
    is accepted; a non-empty folder holding anything else is refused (``--overwrite`` redoes slides,
    it does not make a user's folder ours), so a user's ``failures.csv`` is never overwritten.
    """
    legacy = partial(earlier_run_entries, layout=OUTPUT_FOLDERS)  # a file named like one is refused below
    out = check_output_folder(out_dir, FEATURES_KIND, legacy=legacy, create=True,
                              refuse_hint="extract into a new or empty folder, or into an earlier "
                                          "extraction's --out to resume it")
    for sub in OUTPUT_FOLDERS:
        q = out / sub
        if q.exists() and not q.is_dir():
            raise SlideChatError("exists and is not a folder (it must hold outputs)", q)
    if read_marker(out) is None:
        write_marker(out, FEATURES_KIND)
    return out


def extract_slides(slide_paths: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                   encoder: Any = "conch_v1", checkpoint: Optional[PathLike] = None,
                   save_csv: bool = False, save_qc: bool = True, overwrite: bool = False,
                   rank: Optional[int] = None, world_size: Optional[int] = None,
                   limit: Optional[int] = None, **options: Any) -> Dict[str, Any]:
    """Extract many slides into ``out_dir`` (``h5_files/``, ``csv/``, ``qc/``, ``failures*.csv``).

    ``slide_paths``: paths, or a folder / glob / CSV-or-text list (see ``collect_slide_paths``).
    Slides are sharded round-robin over ``rank``/``world_size`` (default: torchrun's env). Slides whose
    H5 exists are skipped unless ``overwrite``; jobs sharing ``out_dir`` split the slides (see
    ``apps.runner``). ``options`` are :class:`ExtractOptions` fields. Returns a summary dict with
    ``done``, ``skipped``, ``failed`` (list of {slide, path, stage, reason}), ``busy``, ``n_patches``,
    ``failures_file``.
    """
    opts = ExtractOptions.from_kwargs(**options)
    out = check_output_dir(out_dir)  # before any work: a bad --out fails in a second
    task = _Extraction(out, encoder, checkpoint, opts, save_csv, save_qc)
    summary = run_slides(slide_paths, out, task, overwrite=overwrite, rank=rank, world_size=world_size,
                         limit=limit, progress=opts.progress)
    _log_summary(summary)
    return summary


def _log_summary(s: Dict[str, Any]) -> None:
    busy = f", {len(s['busy'])} left to another job" if s.get("busy") else ""
    logger.info("extraction summary (rank %d): %d done, %d skipped%s, %d failed, %d patches -> %s%s",
                s["rank"], len(s["done"]), len(s["skipped"]), busy, len(s["failed"]), s["n_patches"],
                s["out_dir"], f"; failures in {s['failures_file']}" if s["failed"] else "")
