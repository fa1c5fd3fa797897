"""The one slide runner: what every slide-by-slide application (extract, screen) does around its own
per-slide work.

Collect the slides -> shard them over ``rank``/``world_size`` (ids unique across the whole list) ->
skip the finished ones (their "done" file exists) -> per slide, under its own lock
(``.locks/<slide>.lock``): remove a killed run's ``.partial`` leftovers, run the work, and on failure
record one ``{slide, path, stage, reason}`` row and go on -> write ``failures.csv`` (atomically; one
per rank when sharded) -> a summary dict.

Several jobs may share one ``--out`` (a re-queued cluster job, or a job array run twice): a job leaves
a slide that another is working on (``busy``) or has finished to it, so the jobs split the work instead
of both redoing every slide. With ``overwrite``, a slide finished by another job during this run is not
redone either.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as _glob
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from slidechat.features.inputs import collect_slide_paths, limit as limit_items, rank_and_world, unique_shard
from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError, exception_text
from slidechat.utils.locks import FileLock, try_lock
from slidechat.utils.paths import PathLike
from slidechat.wsi.slide import slide_id

logger = logging.getLogger(__name__)

FAILURE_COLUMNS = ("slide", "path", "stage", "reason")
#: hidden folder of the per-slide locks that let several jobs share one ``--out``
LOCK_DIR = ".locks"


@dataclass(frozen=True)
class FailureRow:
    """One row of ``failures.csv``: a slide that failed, at which stage, and why."""

    slide: str
    path: str
    stage: str
    reason: str

    def as_dict(self) -> Dict[str, str]:
        return dataclasses.asdict(self)


class SlideFailed(Exception):
    """Raised by a task's :meth:`SlideTask.run` for a slide that failed at ``stage``; the run goes on.
    Chain the original error (``raise ... from e``): its traceback goes to the debug log."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage, self.reason = stage, reason


class SlideTask:
    """One application's per-slide work, as the runner sees it. Subclasses set the words and the
    output layout, and implement :meth:`finished_file` and :meth:`run`."""

    #: the output folders under ``--out``, where a killed run may have left ``.<slide>.*.partial`` files
    folders: Tuple[str, ...] = ()
    #: log words: "N slide(s) already <finished_word>", "another job ... is <doing_word> it"
    finished_word = "done"
    doing_word = "processing"

    def finished_file(self, sid: str) -> Path:
        """The output written last for a slide: it exists only when the slide is finished."""
        raise NotImplementedError

    def counters(self) -> Dict[str, Any]:
        """The summary's task-specific totals, at zero."""
        return {}

    def resume(self, sid: str) -> None:
        """A finished slide, under its lock, on a rerun (e.g. add an output an earlier run lacked)."""

    def prepare(self, todo: Sequence[Path], rank: int, world: int) -> None:
        """Load what the work needs (a model), called once and only when there is work."""

    def run(self, path: Path, sid: str) -> Any:
        """Do the slide's work and write its outputs; raise :class:`SlideFailed` on failure."""
        raise NotImplementedError

    def discard(self, sid: str) -> None:
        """A failed slide, under its lock: remove what must not outlive the failure."""

    def record(self, sid: str, result: Any, summary: Dict[str, Any]) -> None:
        """Add a finished slide's ``result`` to the summary (totals, a log line)."""


def run_slides(slide_paths: Union[PathLike, Sequence[PathLike]], out: Path, task: SlideTask,
               overwrite: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
               limit: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Run ``task`` on this rank's unfinished slides into ``out``; see the module docstring.

    ``slide_paths``: paths, or a folder / glob / CSV-or-text list (see ``collect_slide_paths``).
    Returns the summary: ``out_dir``, ``rank``, ``world_size``, ``done``, ``skipped``, ``failed``
    (failure rows as dicts), ``busy`` (left to another job), the task's :meth:`~SlideTask.counters`,
    ``failures_file``, ``slides`` (this rank's slide ids), and ``seconds`` when there was work.
    """
    run_started = time.time()
    if isinstance(slide_paths, (str, os.PathLike)):
        paths = collect_slide_paths(slide_paths)
    else:
        paths = [Path(p) for p in slide_paths]
    rank, world = rank_and_world(rank, world_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fail_path = out / ("failures.csv" if world == 1 else f"failures_rank{rank}.csv")
    mine, failures = unique_shard(limit_items(paths, limit), rank, world)  # ids unique across the list
    summary: Dict[str, Any] = {"out_dir": str(out), "rank": rank, "world_size": world, "done": [],
                               "skipped": [], "failed": failures, "busy": [], **task.counters(),
                               "failures_file": str(fail_path), "slides": [slide_id(p) for p in mine]}
    todo = _unfinished(mine, out, task, overwrite, summary)
    if todo:
        task.prepare(todo, rank, world)
        t0 = time.perf_counter()
        for p in tqdm(todo, desc=f"slides (rank {rank})" if world > 1 else "slides", unit="slide",
                      disable=not progress or len(todo) < 2):
            _run_one(p, out, task, overwrite, run_started, summary, fail_path)
        summary["seconds"] = time.perf_counter() - t0
    write_failures(fail_path, summary["failed"], summary["busy"])
    return summary


def _unfinished(mine: Sequence[Path], out: Path, task: SlideTask, overwrite: bool,
                summary: Dict[str, Any]) -> List[Path]:
    """The slides of ``mine`` to work on; the finished ones go to ``summary["skipped"]`` (their
    leftovers removed, and :meth:`SlideTask.resume` run, when no other job holds them)."""
    todo = []
    for p in mine:
        sid = slide_id(p)
        if task.finished_file(sid).is_file() and not overwrite:
            with try_lock(lock_path(out, sid)) as got:
                if got:  # leftovers of a killed run only when no other job is writing this slide
                    remove_partials(out, sid, task.folders)
                    task.resume(sid)
            summary["skipped"].append(sid)
            continue
        todo.append(p)
    if summary["skipped"]:
        logger.info("rank %d: %d slide(s) already %s, skipped (use --overwrite to redo)", summary["rank"],
                    len(summary["skipped"]), task.finished_word)
    return todo


def _run_one(p: Path, out: Path, task: SlideTask, overwrite: bool, run_started: float,
             summary: Dict[str, Any], fail_path: Path) -> None:
    """One slide under its lock: busy, finished meanwhile, done, or one failure row (and the
    failures file rewritten at once, so a killed run still lists it)."""
    sid = slide_id(p)
    lock = FileLock(lock_path(out, sid))
    if not lock.acquire():
        logger.info("%s: another job on %s is %s it; left to that job", sid, out, task.doing_word)
        summary["busy"].append(sid)
        return
    try:
        done = task.finished_file(sid)
        if done.is_file() and (not overwrite or done.stat().st_mtime >= run_started):
            logger.info("%s: finished by another job on %s meanwhile; skipped", sid, out)
            summary["skipped"].append(sid)
            return
        remove_partials(out, sid, task.folders)  # only under the slide's lock: another job may be writing
        result = task.run(p, sid)
    except SlideFailed as e:
        logger.error("%s: %s failed: %s", sid, e.stage, e.reason)
        logger.debug("traceback", exc_info=e.__cause__ or e)
        task.discard(sid)
        summary["failed"].append(FailureRow(sid, str(p), e.stage, e.reason).as_dict())
        write_failures(fail_path, summary["failed"], summary["busy"])
        return
    finally:
        lock.release()
    summary["done"].append(sid)
    task.record(sid, result, summary)


def failure_reason(e: BaseException) -> str:
    """A failure row's reason: a SlideChatError's reason (and hint), else the error's type and text."""
    if isinstance(e, SlideChatError):
        return e.reason + (f" ({e.hint})" if e.hint else "")
    return exception_text(e)


def remove_partials(out_dir: Path, sid: str, folders: Sequence[str]) -> int:
    """Remove ``.partial`` leftovers of this slide only (other ranks may be writing theirs)."""
    n = 0
    for sub in folders:
        for p in (out_dir / sub).glob(f".{_glob.escape(sid)}.*.partial"):
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
    return n


def remove_files(paths: Sequence[Path]) -> List[Path]:
    """Remove those of ``paths`` that exist; the ones removed."""
    gone = []
    for p in paths:
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
    return gone


def lock_path(out_dir: Path, name: str) -> Path:
    return out_dir / LOCK_DIR / f"{name}.lock"


def is_failures_csv(path: Path) -> bool:
    """Whether ``path`` is a failures file we wrote (its header is :data:`FAILURE_COLUMNS`)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return tuple(next(csv.reader(fh), ())) == FAILURE_COLUMNS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def earlier_run_entries(folder: PathLike, layout: Collection[str]) -> Optional[set]:
    """The entries of an earlier run's ``--out`` written before the output marker (the names of its
    ``layout`` and our ``failures*.csv``), or ``None`` when the folder is empty or holds anything else
    (not ours). The ``legacy`` rule of ``utils.outputs.check_output_folder``."""
    folder = Path(folder)
    names = {e for e in os.listdir(folder) if not e.startswith(".")}
    if not names:
        return None
    for e in names:
        p = folder / e
        if e in layout:
            continue
        if e.startswith("failures") and e.endswith(".csv") and p.is_file() and is_failures_csv(p):
            continue
        return None
    return names


def write_failures(path: Path, failures: Sequence[Mapping[str, str]], others: Sequence[str] = ()) -> None:
    """Write this run's ``failures``, keeping the rows already there for the slides in ``others``
    (slides another job on the same ``--out`` handles). Serialised by a lock, so two jobs never drop
    each other's rows."""
    keep = set(others)
    with FileLock(lock_path(path.parent, path.name)):
        rows: List[Mapping[str, str]] = []
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
