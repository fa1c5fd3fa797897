"""SlideBench CSV I/O: read the three question formats, build prompts, find features, write answers.

The task comes from explicit columns, never from what is missing (or is forced with ``kind=``, which
``slidechat test --task mcq|caption`` sets):

* option columns (``A``, ``B``, ...) -> multiple-choice; ``Question`` and ``A``, ``B`` are then required
  (a file with options but no ``Question`` is an error naming it, not a caption file);
* no option columns but a caption column (``Caption``, ``Report``, ``Reference``, ``Text``) -> caption;
* neither -> an error asking for ``--task``. ``Answer`` alone never makes a caption file: in SlideBench it
  holds option letters; ``kind="caption"`` uses it as the reference when asked to.

A file without a header, or with a header and no rows, is an error naming the file (input or output).

Formats:

* ``tcga``  (SlideBench-VQA-TCGA): ``ID, Slide, Tumor, Broad Category, Narrow Category, Question,
  A, B, C, D, Answer``. Required: ``Slide, Question, A, B``.
* ``bcnb``  (SlideBench-VQA-BCNB): ``Slide`` (patient id), ``Task``, ``Question``, ``A``-``D``,
  ``Answer``; no ``Tumor``/``ID``. Required: ``Slide, Question, A, B``.
* ``vqa``   any other multiple-choice CSV with ``Slide, Question, A, B`` (+ optional ``C``.. ``J``).
* ``caption`` (SlideBench-Caption style): ``Slide`` plus an optional reference text column, the first
  of :data:`CAPTION_REF_COLUMNS` present (``Caption``, ``Report``, ``Answer``, ``Reference``,
  ``Text``). An optional ``Question`` column overrides the instruction per row.

All columns are read as text (``dtype=str``, no NA parsing): an empty cell stays ``""`` and is written
back as an empty cell, ``"None"``/``"NA"`` stay literal, numbers keep their spelling, column order is
kept. ``Answer`` is needed only for scoring, not for generating.

Output CSV (:class:`SlideBenchWriter`): the input columns untouched, then ``Output`` (generated text),
``Pred`` (parsed option letter, multiple-choice only, empty when unparseable) and ``Error`` (empty
unless the row failed, e.g. missing features). Rows are appended in input order and fsynced per batch.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from slidechat.data.answers import parse_choice
from slidechat.data.vocabulary import LETTERS
from slidechat.features.io import find_feature_file
from slidechat.model.constants import IMAGE_TOKEN
from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.utils.resumable import ResumableWriter

logger = logging.getLogger(__name__)

KINDS = ("tcga", "bcnb", "vqa", "caption")
#: what ``--task`` accepts: ``mcq`` (the flavour tcga/bcnb/vqa still comes from the columns) or ``caption``
TASKS = ("mcq", "caption")
MCQ_REQUIRED = ("Slide", "Question", "A", "B")
CAPTION_REF_COLUMNS = ("Caption", "Report", "Answer", "Reference", "Text")
#: columns that mark a caption file when the task is not forced (``Answer`` is not one: see module doc)
CAPTION_MARKER_COLUMNS = tuple(c for c in CAPTION_REF_COLUMNS if c != "Answer")
OUTPUT_COLUMN = "Output"
PRED_COLUMN = "Pred"
ERROR_COLUMN = "Error"
ADDED_COLUMNS = (OUTPUT_COLUMN, PRED_COLUMN, ERROR_COLUMN)

#: Instruction for caption CSVs without a ``Question`` column (override with ``caption_prompt=``).
DEFAULT_CAPTION_PROMPT = ("Please write a detailed pathology report describing this whole-slide image, "
                          "including the tissue type, the main findings and the diagnosis.")

#: Feature-path templates; any CSV column can be used as ``{Column}``; ``{feature_root}`` is given.
#: The first is the original tool's ``TCGA_patch_feat/{Tumor}/{Slide}``, used whenever a ``Tumor``
#: column exists; otherwise (BCNB: ``Slide`` is the patient id) the flat one.
TUMOR_TEMPLATE = "{feature_root}/{Tumor}/{Slide}"
FLAT_TEMPLATE = "{feature_root}/{Slide}"


@dataclass
class SlideBenchTable:
    """One SlideBench CSV as read: the frame (all text) plus what was detected about it."""

    path: Path
    kind: str
    df: pd.DataFrame
    option_columns: Tuple[str, ...] = ()
    ref_column: Optional[str] = None

    @property
    def is_mcq(self) -> bool:
        return self.kind != "caption"

    @property
    def columns(self) -> List[str]:
        return list(self.df.columns)

    def __len__(self) -> int:
        return len(self.df)

    @functools.cached_property
    def values(self) -> List[List[str]]:
        """All cells as text, row by row (pandas row access is far too slow to use per row)."""
        return [[_cell(v) for v in r] for r in self.df.itertuples(index=False, name=None)]

    def row(self, index: int) -> Dict[str, str]:
        return dict(zip(self.columns, self.values[index]))

    def options(self, index: int) -> Dict[str, str]:
        """Non-empty options of a row, letter -> text, in letter order."""
        r = self.row(index)
        return {c: r[c] for c in self.option_columns if r[c].strip()}

    def row_keys(self) -> List[str]:
        """``ID`` when the column exists and is unique, else the 0-based row index."""
        if "ID" in self.df.columns and self.df["ID"].is_unique:
            return [_cell(v) for v in self.df["ID"]]
        return [str(i) for i in range(len(self.df))]


def _cell(v: object) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def read_csv_text(path: PathLike) -> pd.DataFrame:
    """Every cell as text, no NA guessing (``""`` stays ``""``, ``"NA"`` stays ``"NA"``)."""
    p = Path(path)
    if not p.is_file():
        raise SlideChatError("file not found", p)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError as e:
        raise SlideChatError("empty file: no header row, no rows", p,
                             hint="a SlideBench CSV starts with a header line") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SlideChatError(f"not a readable CSV: {e}", p) from e
    dup = [c for c in df.columns if str(c).endswith(".1") and str(c)[:-2] in df.columns]
    if dup:
        raise SlideChatError(f"duplicated column names {[c[:-2] for c in dup]}", p)
    return df


def require_rows(df: pd.DataFrame, path: PathLike, what: str = "rows") -> None:
    """A header-only CSV is an error (one line naming the file), not an empty result."""
    if len(df) == 0:
        raise SlideChatError(f"no {what}: the file has a header and no rows", path,
                             hint=f"columns found: {[str(c) for c in df.columns]}")


def _mcq_flavour(cols: Sequence[str]) -> str:
    return "tcga" if "Tumor" in cols else "bcnb" if "Task" in cols else "vqa"


def detect_kind(columns: Sequence[str], path: Optional[PathLike] = None) -> str:
    """The task kind from explicit columns (see module doc); raises when the columns do not say."""
    cols = [str(c) for c in columns]
    if any(c in cols for c in LETTERS):
        return _mcq_flavour(cols)
    if any(c in cols for c in CAPTION_MARKER_COLUMNS):
        return "caption"
    raise SlideChatError(
        "cannot tell the task from the columns: no option columns (A, B, ...) for multiple-choice and no "
        f"caption column ({', '.join(CAPTION_MARKER_COLUMNS)})", path,
        hint=f"columns found: {cols}; pass --task mcq or --task caption")


def read_slidebench(path: PathLike, kind: Optional[str] = None,
                    ref_column: Optional[str] = None) -> SlideBenchTable:
    """Read and validate a SlideBench question CSV (or an output CSV of one).

    ``kind``: ``None`` (from the columns), ``"mcq"``/``"caption"`` (a forced task) or one of
    :data:`KINDS`. Missing required columns, no header or no rows are one-line errors naming the file.
    """
    p = Path(path)
    df = read_csv_text(p)
    cols = [str(c) for c in df.columns]
    if kind is None:
        kind = detect_kind(cols, p)
    elif kind == "mcq":
        kind = _mcq_flavour(cols)
    elif kind not in KINDS:
        raise SlideChatError(f"unknown SlideBench task {kind!r}", p, hint=f"one of {', '.join(TASKS)}")
    if kind == "caption":
        missing = [] if "Slide" in cols else ["Slide"]
        if ref_column is not None and ref_column not in cols:
            missing.append(ref_column)
        if missing:
            raise SlideChatError(f"missing required column(s) {missing} for a caption CSV", p,
                                 hint=f"columns found: {cols}")
        if ref_column is None:
            ref_column = next((c for c in CAPTION_REF_COLUMNS if c in cols), None)
        if ref_column == "Answer" and any(c in cols for c in LETTERS):
            logger.warning("%s: caption task forced on a file with option columns; 'Answer' is the reference",
                           p)
        require_rows(df, p)
        return SlideBenchTable(p, kind, df, (), ref_column)
    required = list(MCQ_REQUIRED) + (["Tumor"] if kind == "tcga" else []) + (
        ["Task"] if kind == "bcnb" else [])
    missing = [c for c in required if c not in cols]
    if missing:
        raise SlideChatError(f"missing required column(s) {missing} for a multiple-choice ({kind}) CSV",
                             p, hint=f"columns found: {cols}" + (
                                 "; if this is a caption file, pass --task caption" if "Question" in missing
                                 else ""))
    require_rows(df, p)
    options = tuple(c for c in LETTERS if c in cols)
    return SlideBenchTable(p, kind, df, options, None)


def caption_columns(df: pd.DataFrame, path: PathLike, ref_column: Optional[str] = None,
                    pred_column: str = OUTPUT_COLUMN) -> str:
    """The reference column for caption scoring of an output frame (rows and prediction column checked).

    Default: the first caption column (:data:`CAPTION_MARKER_COLUMNS`), else ``Answer`` -- but not in a
    file with option columns, whose ``Answer`` holds option letters (name it with ``ref_column`` to insist).
    """
    cols = [str(c) for c in df.columns]
    require_rows(df, path, "rows to score")
    ref = ref_column or next((c for c in CAPTION_MARKER_COLUMNS if c in cols and c != pred_column), None)
    if ref is None and "Answer" in cols and pred_column != "Answer":
        if any(c in cols for c in LETTERS):
            raise SlideChatError(
                "multiple-choice output (option columns A, B, ...): its Answer column holds option letters, "
                "not reference captions", path,
                hint="score it with `slidechat eval mcq`, or pass --ref-column Answer to insist")
        ref = "Answer"
    missing = [c for c in (pred_column, ref) if c is not None and c not in cols]
    if missing or ref is None:
        raise SlideChatError(f"missing column(s) {missing or ['<reference>']}", path,
                             hint=f"columns found: {cols}; choose them with --pred-column/--ref-column")
    return ref


# --------------------------------------------------------------------------- prompts

def build_mcq_prompt(question: str, options: Mapping[str, str]) -> str:
    """``<image>\\n{Question}\\nA. {A}\\nB. {B}...``: the released tool's format; empty options skipped."""
    lines = [f"{IMAGE_TOKEN}\n{question}"]
    for letter, text in options.items():
        text = _cell(text)
        if text.strip():
            lines.append(f"{letter}. {text}")
    return "\n".join(lines)


def build_caption_prompt(instruction: Optional[str] = None) -> str:
    """``<image>\\n{instruction}`` (default :data:`DEFAULT_CAPTION_PROMPT`)."""
    return f"{IMAGE_TOKEN}\n{instruction if instruction else DEFAULT_CAPTION_PROMPT}"


def build_prompt(table: SlideBenchTable, index: int, caption_prompt: Optional[str] = None) -> str:
    """Prompt for one row; for caption CSVs a non-empty ``Question`` cell wins over ``caption_prompt``."""
    r = table.row(index)
    if table.is_mcq:
        return build_mcq_prompt(r["Question"], table.options(index))
    q = r.get("Question", "")
    return build_caption_prompt(q if q.strip() else caption_prompt)


# --------------------------------------------------------------------------- features

def default_template(columns: Sequence[str]) -> str:
    return TUMOR_TEMPLATE if "Tumor" in columns else FLAT_TEMPLATE


def template_fields(template: str) -> List[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def check_template(template: str, columns: Sequence[str], path: Optional[PathLike] = None) -> None:
    """Fail before any work when the template names a column the CSV lacks."""
    unknown = [f for f in template_fields(template) if f != "feature_root" and f not in columns]
    if unknown:
        raise SlideChatError(f"feature template {template!r} uses {unknown}, not columns of the CSV",
                             path, hint=f"columns: {list(columns)}")


def resolve_feature_path(row: Mapping[str, str], template: str, feature_root: PathLike = ""
                         ) -> Tuple[Optional[Path], Optional[str]]:
    """(existing feature file, None) or (None, reason); ``.h5`` preferred over ``.csv``/``.pt``.

    The slide value may already carry a suffix. A missing file is a per-row error, not an exception.
    """
    values = {k: _cell(v) for k, v in row.items()}
    values["feature_root"] = os.fspath(feature_root)
    try:
        stem = template.format_map(values)
    except KeyError as e:
        raise SlideChatError(f"feature template {template!r} uses {e}, not a column of the CSV") from e
    found = find_feature_file(stem)
    if found is None:
        return None, f"feature file not found: {stem}(.h5|.csv|.pt)"
    return found, None


# --------------------------------------------------------------------------- writer

@dataclass
class SlideBenchItem:
    """One pending row: what the generator needs, and where it puts its answer."""

    index: int  # 0-based row of the input CSV
    key: str  # ID or row index, for messages
    row: Dict[str, str]
    prompt: str
    feature_path: Optional[Path]
    error: Optional[str] = None  # set when the row cannot be run (e.g. missing features)
    options: Dict[str, str] = field(default_factory=dict)
    output: Optional[str] = None  # filled by the caller

    @property
    def ok(self) -> bool:
        return self.error is None


def shard_path(out_path: PathLike, rank: int, world_size: int) -> Path:
    p = Path(out_path)
    return p.with_name(f"{p.stem}.rank{rank}-of-{world_size}{p.suffix}")


def _csv_writer(fh: Any) -> Any:
    """RFC 4180 records (CRLF): the csv module quotes only the characters of its line terminator,
    so with a bare "\n" terminator a lone "\r" in a model's answer went out unquoted and split the
    row for every reader."""
    return csv.writer(fh, lineterminator="\r\n")


def _csv_line(values: Sequence[str]) -> str:
    buf = io.StringIO()
    _csv_writer(buf).writerow(values)
    return buf.getvalue()


_CSV_FIELD_LIMIT = 2**31 - 1  # the largest value the csv module accepts on every platform


def _complete_records(data: bytes, ncols: int) -> Tuple[List[List[str]], int]:
    """Parse CSV bytes into complete records; returns (records, byte offset after the last one).

    A record counts only when its last line ends with a newline and (after the header) it has
    ``ncols`` fields, so a record torn anywhere (inside a quoted multi-line field included) is left out.
    """
    lines = data.splitlines(keepends=True)
    state = {"consumed": 0, "last_nl": True}

    def feed() -> Iterator[str]:
        for ln in lines:
            state["consumed"] += len(ln)
            state["last_nl"] = ln.endswith(b"\n")
            yield ln.decode("utf-8", errors="replace")

    records: List[List[str]] = []
    good_end = 0
    reader = csv.reader(feed())
    # the csv module refuses fields over 128 KiB by default: a long question would read as a torn
    # record and resuming would cut the file there
    old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error:
                break
            if not state["last_nl"] or (records and len(rec) != ncols):  # header: any width
                break
            records.append(rec)
            good_end = state["consumed"]
    finally:
        csv.field_size_limit(old_limit)
    return records, good_end


class SlideBenchWriter(ResumableWriter):
    """Resumable, append-only answer writer for one SlideBench CSV (one process per output file).

    Caller protocol::

        with SlideBenchWriter(table, "out.csv", feature_root="feats") as w:
            for batch in w.pending_batches(8):
                runnable = [it for it in batch if it.ok]
                for it, text in zip(runnable, generate(runnable)):
                    it.output = text
                w.write(batch)  # every item of the batch, failed ones too

    ``write`` must receive exactly the next pending rows (any order inside the batch); rows are
    appended in input order and flushed + fsynced, so a killed run loses at most the batch in flight.
    Re-opening resumes after the last complete row (a torn last record is cut off); ``overwrite=True``
    starts fresh. An output written for another input raises :class:`SlideChatError`. This is the
    :class:`slidechat.utils.resumable.ResultWriter` protocol, so the shared inference loop
    (:func:`slidechat.inference.loop.run_inference`) drives it like the JSONL writer.

    Concurrency: one writer per file, enforced with an advisory ``flock`` where available. For several
    ranks, give each ``shard=(rank, world_size)``: it handles rows ``rank, rank+world, ...`` and writes
    ``shard_path(out, rank, world)``; :func:`merge_shards` then builds the single output.
    """

    def __init__(self, table: SlideBenchTable, out_path: PathLike, *, overwrite: bool = False,
                 feature_root: Optional[PathLike] = None, feature_template: Optional[str] = None,
                 caption_prompt: Optional[str] = None,
                 shard: Optional[Tuple[int, int]] = None) -> None:
        self.table = table
        clash = [c for c in ADDED_COLUMNS if c in table.columns]
        if clash:
            raise SlideChatError(f"input already has column(s) {clash}; pass the question CSV, "
                                 "not an output CSV", table.path)
        self.added = [OUTPUT_COLUMN, PRED_COLUMN, ERROR_COLUMN] if table.is_mcq else [
            OUTPUT_COLUMN, ERROR_COLUMN]
        self.columns = table.columns + self.added
        self.final_path = Path(out_path)
        if shard is not None:
            rank, world = shard
            if not (0 <= rank < world):
                raise SlideChatError(f"bad shard {shard}: need 0 <= rank < world_size")
            self.indices = list(range(rank, len(table), world))
            self.path = shard_path(out_path, rank, world)
        else:
            self.indices = list(range(len(table)))
            self.path = self.final_path
        self.feature_root = feature_root
        self.feature_template = feature_template or default_template(table.columns)
        if feature_root is not None:
            check_template(self.feature_template, table.columns, table.path)
        self.caption_prompt = caption_prompt
        self._keys = table.row_keys()
        self.open_output(_csv_line(self.columns).encode("utf-8"), overwrite)

    # -- resuming
    def _validate_existing(self) -> int:
        data = self.path.read_bytes()
        records, good_end = _complete_records(data, len(self.columns))
        if not records:
            if not _csv_line(self.columns).encode("utf-8").startswith(data):
                raise SlideChatError("existing file is not an output of this input (unreadable header)",
                                     self.path, hint="use --overwrite to start fresh")
            with atomic_path(self.path) as tmp:  # the header itself was torn: nothing was done
                tmp.write_text(_csv_line(self.columns), encoding="utf-8")
            return 0
        if records[0] != self.columns:
            raise SlideChatError(
                "existing output has different columns than this input would produce; it belongs to "
                "another input", self.path, hint=f"expected {self.columns}, found {records[0]}; "
                "use --overwrite to start fresh")
        rows = records[1:]
        if len(rows) > len(self.indices):
            raise SlideChatError(f"existing output has {len(rows)} rows but the input has only "
                                 f"{len(self.indices)}; it belongs to another input", self.path,
                                 hint="use --overwrite to start fresh")
        n_in = len(self.table.columns)
        for j, rec in enumerate(rows):
            i = self.indices[j]
            expected = self.table.values[i]
            if rec[:n_in] != expected:
                bad = next(c for c, a, b in zip(self.table.columns, rec, expected) if a != b)
                raise SlideChatError(
                    f"output row {j + 1} (key {self._keys[i]}) differs from input row {i + 1} in "
                    f"column {bad!r}; the output belongs to another input", self.path,
                    hint="use --overwrite to start fresh")
        self.drop_torn_tail(len(data), good_end, "record")
        return len(rows)

    # -- the loop
    def positions(self) -> int:
        return len(self.indices)

    def make_item(self, index: int) -> SlideBenchItem:
        row = self.table.row(index)
        feat, err = (None, None)
        if self.feature_root is not None:
            feat, err = resolve_feature_path(row, self.feature_template, self.feature_root)
        return SlideBenchItem(index=index, key=self._keys[index], row=row,
                              prompt=build_prompt(self.table, index, self.caption_prompt),
                              feature_path=feat, error=err,
                              options=self.table.options(index) if self.table.is_mcq else {})

    def pending_batches(self, batch_size: int) -> Iterator[List[SlideBenchItem]]:
        """Batches of not-yet-written rows in input order; write each before taking the next."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        while self.done < len(self.indices):
            start = self.done
            idx = self.indices[start:start + batch_size]
            yield [self.make_item(i) for i in idx]
            if self.done == start:
                raise SlideChatError("pending_batches: the previous batch was not written", self.path,
                                     hint="call writer.write(batch) inside the loop")

    def write(self, items: Sequence[SlideBenchItem], outputs: Optional[Sequence[str]] = None) -> None:
        """Append the next pending rows (``outputs`` optionally gives the texts in item order)."""
        items = list(items)
        if outputs is not None:
            if len(outputs) != len(items):
                raise ValueError(f"{len(outputs)} outputs for {len(items)} items")
            for it, o in zip(items, outputs):
                it.output = o
        items.sort(key=lambda it: it.index)
        expected = self.indices[self.done:self.done + len(items)]
        got = [it.index for it in items]
        if got != expected:
            raise SlideChatError(f"write() got rows {got}, expected the next pending rows {expected}",
                                 self.path)
        buf = io.StringIO()
        w = _csv_writer(buf)
        for it in items:
            vals = list(self.table.values[it.index])
            if it.error is None and it.output is None:
                raise SlideChatError(f"row {it.key} has neither an output nor an error", self.path)
            out = "" if it.error is not None else _cell(it.output)
            added = {OUTPUT_COLUMN: out, ERROR_COLUMN: it.error or ""}
            if self.table.is_mcq:
                pred = parse_choice(out, self.table.options(it.index)) if it.error is None else None
                added[PRED_COLUMN] = pred or ""
            w.writerow(vals + [added[c] for c in self.added])
        self.append(buf.getvalue().encode("utf-8"))
        self.done += len(items)


def merge_shards(table: SlideBenchTable, out_path: PathLike, world_size: int,
                 remove_shards: bool = False) -> Path:
    """Interleave complete shard outputs back into input order and write ``out_path`` atomically."""
    frames = []
    for rank in range(world_size):
        sp = shard_path(out_path, rank, world_size)
        if not sp.exists():
            raise SlideChatError("shard output missing", sp)
        n_expected = len(range(rank, len(table), world_size))
        df = read_csv_text(sp)
        if len(df) != n_expected:
            raise SlideChatError(f"shard has {len(df)} of {n_expected} rows; finish it first", sp)
        frames.append(df)
    cols = list(frames[0].columns)
    if any(list(f.columns) != cols for f in frames):
        raise SlideChatError("shards have different columns", out_path)
    order = []
    for rank, f in enumerate(frames):
        for j in range(len(f)):
            order.append((rank + j * world_size, rank, j))
    order.sort()
    if [o[0] for o in order] != list(range(len(table))):
        raise SlideChatError("shards do not cover the input exactly once", out_path)
    shard_values = [[[_cell(v) for v in r] for r in f.itertuples(index=False, name=None)] for f in frames]
    merged_rows = [shard_values[r][j] for _, r, j in order]
    n_in = len(table.columns)
    if [r[:n_in] for r in merged_rows] != table.values or cols[:n_in] != table.columns:
        raise SlideChatError("merged shards do not match the input rows", out_path)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            w = _csv_writer(fh)
            w.writerow(cols)
            w.writerows(merged_rows)
    if remove_shards:
        for rank in range(world_size):
            shard_path(out_path, rank, world_size).unlink()
    return out


def read_output(path: PathLike, kind: Optional[str] = None) -> SlideBenchTable:
    """Read an output CSV (input columns + ``Output``...) as a table; ``Output`` is required."""
    t = read_slidebench(path, kind=kind)
    if OUTPUT_COLUMN not in t.columns:
        raise SlideChatError(f"missing column {OUTPUT_COLUMN!r}; is this a test output CSV?", path,
                             hint=f"columns found: {t.columns}")
    return t
