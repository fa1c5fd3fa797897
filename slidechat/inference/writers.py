"""Result writers for the inference loop: append-only, fsynced per batch, resumable after kill -9.

Every writer follows one protocol (:class:`~slidechat.utils.resumable.ResultWriter`): items carry a 0-based ``position`` in the
input (SlideBench: ``index``), the writer is opened on the whole input and tells how many leading
positions are already written (``done``); the loop hands it the next pending items in order
(``write``), which appends them as one write + flush + ``fsync``; ``close`` releases the file.
Opening an existing output resumes it: a torn last record (kill -9 during a write) is cut off, a
record that does not belong to this input is refused (``--overwrite`` starts afresh). Writing in
input order makes "done" a prefix, so a resumed run neither repeats nor skips a row.

Writers:

* :class:`JsonlPredictionWriter` — LLaMA-Factory style predictions (``slidechat infer``), one JSON
  object per line, keys in this order::

      {"id": {"dataset": "cyto_test", "index": 3, "id": "abc"},   # row index in its file + id column
       "images": ["/abs/path/field.jpg"],                         # resolved image paths, in order
       "prompt": "system\\nYou are a helpful assistant.\\nuser\\n...\\nassistant\\n",
       "predict": "generated text",
       "label": "final assistant turn\\n"}

  ``prompt``/``predict``/``label`` are vllm_infer's fields. A failed row has ``"predict": ""`` and one
  more key, ``"error": "<file>: <reason>"``; successful rows have no ``error`` key. ``id.id`` is
  ``null`` when the dataset has no ``id`` column.
* :class:`~slidechat.data.slidebench.SlideBenchWriter` — SlideBench answer CSVs (``slidechat
  test`` / ``xtuner test``): input columns + ``Output`` (+ ``Pred``) + ``Error``. It lives with the
  SlideBench reader (it validates rows against the question table) and follows this protocol.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.utils.resumable import ResumableWriter

logger = logging.getLogger(__name__)


__all__ = ["JsonlPredictionWriter", "read_complete_jsonl", "JSONL_KEYS", "make_id", "check_run_settings"]

#: key order of a prediction line (``error`` only on failed rows)
JSONL_KEYS = ("id", "images", "prompt", "predict", "label")


def read_complete_jsonl(path: PathLike) -> Tuple[List[Dict[str, Any]], int, int]:
    """``(records, good_end, total_bytes)`` of a JSONL file written by :class:`JsonlPredictionWriter`.

    A record counts when its line ends with ``\\n``; a last line without one (kill -9 mid-write) is
    torn and left out (``good_end`` < ``total_bytes``). A complete line that is not a JSON object is
    corruption, not a torn write, and raises :class:`SlideChatError` naming the line.
    """
    p = Path(path)
    data = p.read_bytes()
    records: List[Dict[str, Any]] = []
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # torn tail
        lineno += 1
        raw = data[pos:nl]
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SlideChatError(f"line {lineno} is not valid JSON ({e})", p,
                                 hint="not an output of slidechat infer? use --overwrite to start fresh"
                                 ) from e
        if not isinstance(rec, dict):
            raise SlideChatError(f"line {lineno} is not a JSON object", p,
                                 hint="use --overwrite to start fresh")
        records.append(rec)
        pos = nl + 1
    return records, pos, len(data)


class JsonlPredictionWriter(ResumableWriter):
    """Resumable JSONL writer for LLaMA-Factory style predictions (format in the module doc).

    ``keys`` holds, for every input position, the ``(id, images)`` pair its line must carry: on
    resume each existing line is checked against it, so an output of another dataset (or another
    ``--max_samples``/order) is refused instead of being silently continued.

    Items given to :meth:`write` need ``position``, ``key`` (the ``id`` object), ``images`` (list of
    str), ``prompt``, ``label``, ``output`` (the prediction) and ``error`` (``None`` unless failed).
    """

    def __init__(self, path: PathLike, keys: Sequence[Tuple[Any, Sequence[str]]], *,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.keys = [(k, list(imgs)) for k, imgs in keys]
        self.open_output(b"", overwrite)

    def _validate_existing(self) -> int:
        records, good_end, total = read_complete_jsonl(self.path)
        if len(records) > len(self.keys):
            raise SlideChatError(f"existing output has {len(records)} lines but the input has only "
                                 f"{len(self.keys)} rows; it belongs to another input", self.path,
                                 hint="use --overwrite to start fresh")
        for j, rec in enumerate(records):
            key, images = self.keys[j]
            if rec.get("id") != key or rec.get("images") != images:
                raise SlideChatError(
                    f"line {j + 1} is for id {rec.get('id')} / images {rec.get('images')}, but input "
                    f"row {j + 1} is id {key} / images {images}; the output belongs to another input",
                    self.path, hint="use --overwrite to start fresh, or another --save_name")
        self.drop_torn_tail(total, good_end, "line")
        return len(records)

    def positions(self) -> int:
        return len(self.keys)

    @staticmethod
    def record(item: Any) -> Dict[str, Any]:
        """The JSON object written for one item (keys in :data:`JSONL_KEYS` order, + ``error``)."""
        rec: Dict[str, Any] = {"id": item.key, "images": list(item.images), "prompt": item.prompt,
                               "predict": "" if item.error is not None else item.output,
                               "label": item.label}
        if item.error is not None:
            rec["error"] = str(item.error)
        return rec

    def write(self, items: Sequence[Any]) -> None:
        """Append the next pending items (any order inside the batch; written in input order)."""
        items = sorted(items, key=lambda it: it.position)
        got = [it.position for it in items]
        expected = list(range(self.done, self.done + len(items)))
        if got != expected:
            raise SlideChatError(f"write() got rows {got}, expected the next pending rows {expected}",
                                 self.path)
        lines = []
        for it in items:
            if it.error is None and it.output is None:
                raise SlideChatError(f"row {it.position} has neither an output nor an error", self.path)
            key, images = self.keys[it.position]
            rec = self.record(it)
            if rec["id"] != key or rec["images"] != images:
                raise SlideChatError(f"row {it.position}: item id/images do not match the input",
                                     self.path)
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        self.append("".join(lines).encode("utf-8"))
        self.done += len(items)


def make_id(dataset: str, index: int, id_value: Optional[Any]) -> Dict[str, Any]:
    """The ``id`` object of a prediction line: dataset name, row index in its file, ``id`` column."""
    return {"dataset": dataset, "index": int(index), "id": None if id_value is None else id_value}


def settings_path(output: PathLike) -> Path:
    """``<output>.settings.json``: what produced an output, so a resume cannot mix two set-ups."""
    p = Path(output)
    return p.with_name(p.name + ".settings.json")


def check_run_settings(output: PathLike, settings: Mapping[str, Any], fresh: bool) -> None:
    """Record ``settings`` beside a fresh output; on resume refuse different ones.

    ``settings`` holds what changes the answers (model, adapter, template, sampling, image limits,
    engine...), not what only changes speed (batch size, device). A resumed output without a record
    (written by hand or by an older version) gets one, with a warning.
    """
    side = settings_path(output)
    current = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    if not fresh:
        if side.is_file():
            try:
                saved = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise SlideChatError(f"unreadable settings record ({e})", side,
                                     hint="use --overwrite to start fresh") from e
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            if diff:
                changes = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
                raise SlideChatError(f"the existing predictions were made with other settings ({changes})",
                                     output, hint="rerun with the same settings to resume, or use "
                                                  "--overwrite / another --save_name")
            return
        logger.warning("%s: no settings record beside the existing predictions; assuming they match "
                       "(writing %s)", output, side.name)
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n", encoding="utf-8")
