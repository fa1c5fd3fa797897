"""Read cytology predictions to score, and tell which task each row is.

Three inputs, detected from the file:

* ``slidechat infer`` JSONL: ``{"id", "images", "prompt", "predict", "label"}`` (+ ``"error"`` on rows
  that failed: counted as failures and listed, never silently scored). ``id`` may be the writer's
  ``{"dataset", "index", "id"}`` object (rows are then named by ``id.id``, else ``dataset#index``).
* LLaMA-Factory's ``generated_predictions.jsonl``: ``{"prompt", "predict", "label"}`` only.
* CytoChat's benchmark spreadsheets (``.xlsx``): ``Image``, ``Prompt``, ``Lable`` (sic; ``Label`` too),
  optional ``Task`` and ``Class number``. The grounding sheet stores CytoChat's own output inside
  ``Prompt`` as a Python-literal dict ``{'prompt', 'images', 'predict', 'label'}`` (read with
  ``ast.literal_eval``, never executed); the VQA sheet stores a multi-turn prompt as a list of
  strings. A predictions column (``predict``/``Predict``/``Prediction``/``Output``) is used when
  present; CytoChat's MCQ, REC, report and VQA sheets have none (labels only).

Prompts decoded by LLaMA-Factory look like ``"system\\n...\\nuser\\n{question}\\nassistant\\n"``;
:func:`user_question` takes the last user turn out of that (or of raw ChatML).

Tasks (:func:`detect_task`, from the question and the label): ``mcq`` ("Just answer the option." or an
option list), ``grounding`` ("Locate all ..."), ``region`` ("Give a brief description of region" /
a ``<region>`` in the question, or a label that is one ``<region>``), ``report`` ("Describe the
cytology diagnosis results", "report"), ``vqa`` (a multi-turn prompt or a question ending in "?").
Anything else fits no task; :func:`select_task` refuses such rows, and files mixing tasks, unless
``--task`` says which rows to score.

Spreadsheets are checked before openpyxl parses them (:func:`check_spreadsheet`): an ``.xlsx`` is a zip
whose XML can inflate a thousandfold, and openpyxl parses about 1-5 MB of sheet XML a second, so a
small file declaring gigabytes would keep ``slidechat eval`` busy for an hour. The members' declared
uncompressed sizes (``zipfile`` never inflates a member past its declared size) must total at most
``$SLIDECHAT_MAX_SHEET_MB`` (default :data:`DEFAULT_SHEET_MB` MB: a 10,000-row sheet of long reports is
about 20 MB of XML), and no member over 1 MB may be compressed more than :data:`MAX_SHEET_RATIO` times
(sheet XML of real text compresses 5-20 times).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

TASKS = ("mcq", "grounding", "region", "report", "vqa")
#: which detected tasks each scorer (``slidechat eval <scorer>``) accepts
SCORER_TASKS: Dict[str, Tuple[str, ...]] = {"mcq": ("mcq",), "grounding": ("grounding",),
                                            "region": ("region",), "report": ("report", "vqa")}
PRED_COLUMNS = ("predict", "Predict", "prediction", "Prediction", "Output", "output")
LABEL_COLUMNS = ("Lable", "Label", "label", "lable")
#: ``$SLIDECHAT_MAX_SHEET_MB`` overrides :data:`DEFAULT_SHEET_MB` (uncompressed MB of a spreadsheet).
SHEET_LIMIT_ENV = "SLIDECHAT_MAX_SHEET_MB"
DEFAULT_SHEET_MB = 64
MAX_SHEET_RATIO = 100
_RATIO_FLOOR = 1 << 20  # small members may compress well; only large ones are held to the ratio


@dataclass
class CytoRecord:
    """One prediction row, whatever file it came from."""

    index: int
    where: str  # "line 3" / "row 4" for messages
    key: str
    prompt: str
    question: str
    predict: Optional[str]
    label: str
    images: List[str] = field(default_factory=list)
    error: str = ""
    fields: Dict[str, Any] = field(default_factory=dict)
    turns: int = 1


@dataclass
class CytoFile:
    path: Path
    format: str  # "slidechat-jsonl" | "llamafactory-jsonl" | "cytochat-xlsx"
    records: List[CytoRecord]
    notes: List[str] = field(default_factory=list)


_TURN = re.compile(r"(?:^|\n)(?:<\|im_start\|>)?user\n(.*?)(?:<\|im_end\|>)?\n"
                   r"(?:<\|im_start\|>)?assistant\n?", re.DOTALL)
_VISION = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)*<\|vision_end\|>|<image>")


def user_question(prompt: str) -> str:
    """The last user turn of a decoded ChatML prompt, without image tokens (else the prompt itself)."""
    turns = _TURN.findall(prompt)
    q = turns[-1] if turns else prompt
    return _VISION.sub("", q).strip()


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v)


_REASONING = re.compile(r"\A\s*<think>.*?</think>\s*", re.S)


def strip_reasoning(predict: str) -> str:
    """The answer part of a prediction: a leading ``<think>...</think>`` block (Qwen3 / Qwen3-VL reasoning
    templates; vllm_infer keeps it in ``predict``) is not the answer and is dropped before scoring.
    Anything else, an unclosed ``<think>`` included, is scored as written."""
    return _REASONING.sub("", predict, count=1)


def _images(v: Any) -> List[str]:
    if v is None or (isinstance(v, float) and v != v) or v == "":
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return [str(v)]


def _row_id(v: Any) -> str:
    """``slidechat infer`` writes ``{"dataset", "index", "id"}``; a plain id is used as is."""
    if isinstance(v, dict):
        if v.get("id") not in (None, ""):
            return str(v["id"])
        if "index" in v:
            return f"{v['dataset']}#{v['index']}" if v.get("dataset") else f"#{v['index']}"
        return ""
    return _text(v)


def read_predictions(path: PathLike, sheet: Optional[str] = None) -> CytoFile:
    """Read a JSONL (ours or LLaMA-Factory's) or a CytoChat xlsx into :class:`CytoRecord` rows."""
    p = Path(path)
    if not p.is_file():
        raise SlideChatError("file not found", p)
    suffix = p.suffix.lower()
    if suffix in (".xlsx", ".xlsm", ".xls"):
        return _read_xlsx(p, sheet)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(p)
    raise SlideChatError(f"cannot read {p.suffix or 'a file without suffix'} predictions", p,
                         hint="give a .jsonl (slidechat infer / LLaMA-Factory) or a CytoChat .xlsx")


def _read_jsonl(p: Path) -> CytoFile:
    """Predictions JSONL (or a JSON list) through the project's one JSON/JSONL row reader."""
    # lazy: PIL (through the dataset reader's image checks) is kept off `slidechat eval`'s parser start-up
    from slidechat.data.llamafactory import read_raw_rows

    records: List[CytoRecord] = []
    ours = False
    numbered = []
    unit = "line"
    for index, lineno, obj, error in read_raw_rows(p, kind="predictions file"):
        if error is not None:
            raise SlideChatError(f"line {lineno} is not valid JSON: {error}", p)
        if lineno is None:  # a JSON list
            unit = "item"
        numbered.append((index + 1 if lineno is None else lineno, obj))
    for n, o in numbered:
        where = f"{unit} {n}"
        if not isinstance(o, dict):
            raise SlideChatError(f"{where}: expected a JSON object, got {type(o).__name__}", p)
        if "prompt" not in o or "label" not in o:
            raise SlideChatError(f"{where}: missing {[k for k in ('prompt', 'label') if k not in o]}", p,
                                 hint="expected {prompt, predict, label} (LLaMA-Factory) or slidechat "
                                      "infer's {id, images, prompt, predict, label, error}")
        ours = ours or "id" in o or "error" in o or "images" in o
        prompt_v = o["prompt"]
        turns = 1
        if isinstance(prompt_v, list):
            turns = len(prompt_v)
            prompt = "\n".join(_text(x) for x in prompt_v)
            question = user_question(_text(prompt_v[-1])) if prompt_v else ""
        else:
            prompt = _text(prompt_v)
            question = user_question(prompt)
            turns = max(1, len(_TURN.findall(prompt)))
        err = _text(o.get("error")).strip()
        pred = o.get("predict")
        records.append(CytoRecord(
            index=len(records), where=where, key=_row_id(o.get("id")) or where, prompt=prompt,
            question=question, predict=None if pred is None else strip_reasoning(_text(pred)),
            label=_text(o["label"]),
            images=_images(o.get("images")), error=err, turns=turns,
            fields={k: o[k] for k in ("task", "Task", "Class number", "classes") if k in o}))
    if not records:
        raise SlideChatError("no rows", p)
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):  # ids not unique: name rows by line
        for r in records:
            r.key = r.where
    return CytoFile(p, "slidechat-jsonl" if ours else "llamafactory-jsonl", records)


def sheet_limit_bytes(max_mb: Optional[float] = None) -> int:
    """The spreadsheet size limit in bytes: ``max_mb``, else ``$SLIDECHAT_MAX_SHEET_MB``, else the default."""
    if max_mb is None:
        env = os.environ.get(SHEET_LIMIT_ENV, "").strip()
        try:
            max_mb = float(env) if env else float(DEFAULT_SHEET_MB)
        except ValueError:
            max_mb = -1.0
        if not max_mb > 0:
            raise SlideChatError(f"${SHEET_LIMIT_ENV}={env!r} is not a positive number of MB")
    return int(float(max_mb) * 2 ** 20)


def check_spreadsheet(path: PathLike, max_mb: Optional[float] = None,
                      max_ratio: float = MAX_SHEET_RATIO) -> None:
    """Refuse an ``.xlsx`` whose members would inflate past the size limit or by more than ``max_ratio``,
    from the zip's directory alone (nothing is decompressed); see the module doc for the limits."""
    p = Path(path)
    limit = sheet_limit_bytes(max_mb)
    hint = f"set {SHEET_LIMIT_ENV}=<MB> to raise the limit if the file is genuine"
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise SlideChatError(f"not an .xlsx workbook (not a zip archive: {e})", p,
                             hint="save the sheet as .xlsx (Excel 2007+)") from None
    total = sum(max(0, i.file_size) for i in infos)
    if total > limit:
        raise SlideChatError(f"spreadsheet inflates to {total / 2 ** 20:,.0f} MB of XML, over the limit of "
                             f"{limit / 2 ** 20:,.0f} MB", p, hint=hint)
    for i in infos:
        if i.file_size > _RATIO_FLOOR and i.file_size > max_ratio * max(i.compress_size, 1):
            raise SlideChatError(f"spreadsheet member {i.filename} is compressed "
                                 f"{i.file_size / max(i.compress_size, 1):,.0f} times "
                                 f"(limit {max_ratio:g}): a zip bomb, not a spreadsheet", p, hint=hint)


def _read_xlsx(p: Path, sheet: Optional[str]) -> CytoFile:
    df, label_col, pred_col = _xlsx_sheet(p, sheet)
    cols = list(df.columns)
    records: List[CytoRecord] = []
    notes: List[str] = []
    label_mismatch = 0
    for i, row in enumerate(df.to_dict("records")):
        where = f"row {i + 2}"  # spreadsheet row number (header = 1)
        label = _text(row[label_col])
        predict: Optional[str] = None if pred_col is None else strip_reasoning(_text(row[pred_col]))
        cell = _read_prompt_cell(_text(row["Prompt"]), where, p, predict, pred_col, _images(row.get("Image")),
                                 label)
        label_mismatch += cell.label_differs
        fields = {}
        for c in ("Task", "Class number"):
            if c in cols and _text(row[c]).strip():
                fields[c] = _text(row[c]).strip()
        records.append(CytoRecord(index=i, where=where, key=where, prompt=cell.prompt,
                                  question=user_question(cell.last_turn), predict=cell.predict, label=label,
                                  images=cell.images, fields=fields, turns=cell.turns))
    if not records:
        raise SlideChatError("no rows", p)
    image_keys = [", ".join(r.images) for r in records]
    if "Image" in cols and all(image_keys) and len(set(image_keys)) == len(image_keys):
        for r, k in zip(records, image_keys):  # CytoChat's Image column names the row when unique
            r.key = k
    if label_mismatch:
        notes.append(f"{label_mismatch} row(s): the label inside Prompt differs from the {label_col} column; "
                     f"{label_col} is used as the truth")
        logger.warning("%s: %s", p, notes[-1])
    return CytoFile(p, "cytochat-xlsx", records, notes)


def _xlsx_sheet(p: Path, sheet: Optional[str]) -> Tuple[Any, str, Optional[str]]:
    """``(frame with string column names, label column, prediction column or None)`` of a benchmark sheet."""
    import pandas as pd

    check_spreadsheet(p)
    try:
        df = pd.read_excel(p, sheet_name=sheet or 0, dtype=object, engine="openpyxl")
    except Exception as e:  # openpyxl raises many types for broken files
        raise SlideChatError(f"cannot read the spreadsheet: {e}", p) from None
    cols = [str(c) for c in df.columns]
    df.columns = cols
    label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
    if "Prompt" not in cols or label_col is None:
        raise SlideChatError("not a CytoChat benchmark sheet: needs Prompt and Lable/Label columns", p,
                             hint=f"columns found: {cols}")
    return df, label_col, next((c for c in PRED_COLUMNS if c in cols), None)


@dataclass
class _PromptCell:
    """What a sheet's Prompt cell says: the prompt, its last user turn, the number of turns, and the
    prediction / images / label a dict-shaped cell may carry."""

    prompt: str
    last_turn: str
    turns: int
    predict: Optional[str]
    images: List[str]
    label_differs: bool = False


def _read_prompt_cell(raw: str, where: str, p: Path, predict: Optional[str], pred_col: Optional[str],
                      images: List[str], label: str) -> _PromptCell:
    """A Prompt cell: plain text, a Python dict literal (``prompt``, and optionally ``predict``,
    ``images``, ``label``) or a list of turns."""
    cell = _PromptCell(raw, raw, 1, predict, images)
    stripped = raw.strip()
    if stripped.startswith("{"):
        try:
            d = ast.literal_eval(stripped)
        except (ValueError, SyntaxError) as e:
            raise SlideChatError(f"{where}: Prompt looks like a dict but is not a Python literal "
                                 f"({type(e).__name__})", p) from None
        if not isinstance(d, dict) or "prompt" not in d:
            raise SlideChatError(f"{where}: Prompt dict has no 'prompt' key", p)
        cell.prompt = cell.last_turn = _text(d["prompt"])
        if "predict" in d:
            if predict is not None and predict.strip() and predict.strip() != _text(d["predict"]).strip():
                raise SlideChatError(f"{where}: both a {pred_col} column and a predict inside Prompt, "
                                     "and they differ", p)
            cell.predict = strip_reasoning(_text(d["predict"]))
        if d.get("images"):
            cell.images = _images(d["images"])
        cell.label_differs = "label" in d and _text(d["label"]).strip() != label.strip()
    elif stripped.startswith("["):
        try:
            lst = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            lst = None
        if isinstance(lst, list) and lst and all(isinstance(x, str) for x in lst):
            cell.turns = len(lst)
            cell.prompt = "\n".join(lst)
            cell.last_turn = lst[-1]
    return cell


# --------------------------------------------------------------------------- task detection

_OPTION_LIST = re.compile(r"\[\s*A\s*[.)][^\]]*,\s*B\s*[.)]")
_LINE_OPTIONS = re.compile(r"^\s*\(?A\s*[.)]\s*\S.*\n\s*\(?B\s*[.)]\s*\S", re.MULTILINE)
_REGION_TAG = re.compile(r"<\s*region\s*>|<\|box_start\|>", re.IGNORECASE)
_REPORT_CUES = re.compile(r"\b(?:describe the cytology|diagnosis results?|report|describe|summari[sz]e)\b",
                          re.IGNORECASE)


def detect_task(question: str, label: str, turns: int = 1) -> Optional[str]:
    """The task a row belongs to, from its question and label; None when nothing fits."""
    q = question or ""
    if re.search(r"just answer the option", q, re.IGNORECASE) or _OPTION_LIST.search(q) \
            or _LINE_OPTIONS.search(q):
        return "mcq"
    if re.search(r"\blocate all\b", q, re.IGNORECASE):
        return "grounding"
    if re.search(r"brief description of (?:the )?region", q, re.IGNORECASE) or _REGION_TAG.search(q):
        return "region"
    if _REGION_TAG.search(label or ""):
        return "region"
    if turns > 1:
        return "vqa"
    if _REPORT_CUES.search(q):
        return "report"
    if q.strip().endswith("?"):
        return "vqa"
    return None


def select_task(file: CytoFile, scorer: str, task: Optional[str] = None
                ) -> Tuple[List[CytoRecord], Dict[str, List[CytoRecord]], Dict[str, int]]:
    """Rows the ``scorer`` should score, grouped by task, and counts of the rows left out.

    Without ``task``: every row must be detected as a task the scorer accepts, else a SlideChatError
    names the first offending row and the task counts (a file of mixed tasks, or rows fitting no
    task, are refused, never silently switched). With ``task``: rows detected as ``task``, and rows
    fitting no task, are scored as ``task``; rows detected as another task are left out and counted.
    """
    accepted = SCORER_TASKS[scorer]
    if task is not None and task not in accepted:
        raise SlideChatError(f"--task {task} cannot be scored by 'slidechat eval {scorer}'", file.path,
                             hint=f"this scorer takes {list(accepted)}")
    detected = [detect_task(r.question, r.label, r.turns) for r in file.records]
    counts = Counter(t or "no task" for t in detected)
    desc = ", ".join(f"{n} {t}" for t, n in counts.most_common())
    if task is None and not any(t in accepted for t in detected) and all(t is not None for t in detected):
        raise SlideChatError(f"no {'/'.join(accepted)} rows: the file holds {desc}", file.path,
                             hint=f"use 'slidechat eval {_scorer_of(counts.most_common(1)[0][0])}'")
    by: Dict[str, List[CytoRecord]] = {}
    skipped: Dict[str, int] = {}
    for r, t in zip(file.records, detected):
        if task is not None:
            if t is None or t == task:
                by.setdefault(task, []).append(r)
            else:
                skipped[t] = skipped.get(t, 0) + 1
            continue
        if t is None:
            raise SlideChatError(f"{r.where} fits no task (question {_short(r.question)!r})", file.path,
                                 hint=f"pass --task {accepted[0]} to score such rows as {accepted[0]}")
        if t not in accepted:
            raise SlideChatError(
                f"rows of mixed tasks ({desc}); {r.where} is {t}, not {'/'.join(accepted)}", file.path,
                hint=f"pass --task {accepted[0]} to score only those rows, or use "
                     f"'slidechat eval {_scorer_of(t)}'")
        by.setdefault(t, []).append(r)
    selected = [r for rs in by.values() for r in rs]
    if not selected:
        raise SlideChatError(f"no {'/'.join(accepted) if task is None else task} rows ({desc})", file.path)
    return selected, by, skipped


def _scorer_of(task: str) -> str:
    return next(s for s, ts in SCORER_TASKS.items() if task in ts)


def _short(text: str, n: int = 80) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def require_predictions(file: CytoFile, records: Sequence[CytoRecord]) -> None:
    """A file without any prediction (CytoChat's label-only sheets) cannot be scored: say so."""
    missing = [r for r in records if r.predict is None and not r.error]
    if missing and len(missing) == len(records):
        raise SlideChatError(
            "no predictions to score: the file has prompts and labels only", file.path,
            hint="add a 'predict' column / key (e.g. run slidechat infer on it)")
    if missing:
        raise SlideChatError(f"{missing[0].where} has no prediction ({len(missing)} row(s) without one)",
                             file.path)


def image_size_of(record: CytoRecord, base_dir: Optional[Path], fallback: Optional[Tuple[int, int]],
                  source: Path) -> Optional[Tuple[int, int]]:
    """``(width, height)`` of the row's first image when readable, else ``fallback`` (``--image-size``).

    Header only, through the one image loader; no pixel is decoded, so no pixel limit applies here.
    """
    from slidechat.wsi.imageio import image_size  # lazy: PIL, kept off `slidechat eval`'s parser start-up

    for im in record.images[:1]:
        cand = Path(im)
        if not cand.is_absolute() and base_dir is not None:
            cand = base_dir / cand
        if cand.is_file():
            try:
                return image_size(cand, check_limit=False)
            except SlideChatError as e:
                if fallback is None:
                    raise SlideChatError(f"{record.where}: cannot read image {cand}: {e.reason}",
                                         source) from None
    return fallback
