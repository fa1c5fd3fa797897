"""Boxes in model text: CytoChat's ``<region>x1 y1 x2 y2</region>`` and Qwen2-VL's native boxes.

One tolerant parser, :func:`parse_regions`, used by every cytology scorer (grounding, referring
expressions, slide screening). It reads what a model actually writes and never guesses:

* ``<region>x1 y1 x2 y2</region>``: absolute pixel floats of the image as given (CytoChat). Numbers may
  be separated by spaces, commas, semicolons or wrapped in ``()``/``[]``; swapped corners are put in
  order (``x1 <= x2``, ``y1 <= y2``). A missing closing tag is accepted when something follows the
  fourth number (another region, a sentence); a truncated closing tag (``</region``, ``</``) counts as
  closed. A region that runs into the end of the text without a closing tag is *malformed*: the last
  number may have been cut by the token limit (``348.0`` of ``348.04``), so it is not used.
* Qwen2-VL native: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  on a 0-1000 scale of the image; converted to pixels with ``image_size=(width, height)``. Several
  boxes after one ``object_ref`` all take its label. Without the image size this is an error, not a
  guess. Text decoded with special tokens skipped (LLaMA-Factory's default) has lost these markers:
  ``(x1,y1),(x2,y2)`` pairs outside any marker are reported as malformed with that hint.
* Labels: the text before a ``<region>`` in the forms CytoChat uses, ``"hsil 3 is located at"``,
  ``"hsil 3:"`` or just ``"hsil"`` (at most three words); instance numbers dropped, lower case ->
  ``"hsil"``. Anything else (``"Give a brief description of region."``, ``"Answer:"``) gives
  ``label=None``; the scorer then uses the class the question asked for, never a class guessed
  from prose.

Anything that opens a region but cannot be read (wrong count of numbers, words inside, cut off) is
listed in :attr:`RegionParse.malformed` as ``"reason: snippet"`` and counted by the scorers.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from slidechat.utils.errors import SlideChatError

REGION_OPEN = "<region>"
REGION_CLOSE = "</region>"
QWEN_REF_START, QWEN_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
QWEN_BOX_START, QWEN_BOX_END = "<|box_start|>", "<|box_end|>"
QWEN_SCALE = 1000.0

_NUM = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# characters allowed between the numbers of a box body
_BODY_CHARS = re.compile(r"[\d\s.,;()\[\]+\-]*")
_SEP_ONLY = re.compile(r"^[\s,;()\[\]]*$")
_OPEN_RE = re.compile(r"<\s*region\s*>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"<\s*/\s*region\s*>|<\s*/\s*(?:r(?:e(?:g(?:i(?:o(?:n)?)?)?)?)?)?\s*$",
                       re.IGNORECASE)
_QWEN_TOKEN = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
_BARE_QWEN = re.compile(r"\(\s*\d+\s*,\s*\d+\s*\)\s*,\s*\(\s*\d+\s*,\s*\d+\s*\)")
_LABEL_FORMS = (
    # "hsil 3 is located at", "ASC-US cells are found in"
    re.compile(r"^(?P<label>[a-z][\w\-+/ ]*?)(?:\s+\d+)?\s+(?:is|are)\s+(?:located|found|seen|present|"
               r"detected|shown)\s+(?:at|in)\s*:?$"),
    # "hsil 3", "hsil" (at most three words: "there are two" is not a label)
    re.compile(r"^(?P<label>[a-z][\w\-+/]*(?: [a-z][\w\-+/]*){0,2}?)(?:\s+\d+)?$"),
)
#: words that introduce a box without naming a class ("Answer: <region>…")
_NOT_LABELS = {"and", "or", "at", "in", "the", "a", "an", "region", "regions", "box", "boxes", "bbox", "is",
               "are", "located", "with", "of", "answer", "the answer", "location", "locations", "position",
               "coordinates", "result", "output", "here", "it", "they", "cell", "cells", "object", "objects"}


@dataclass(frozen=True)
class Region:
    """An axis-aligned box in image pixels (``x1 <= x2``, ``y1 <= y2``) with an optional class label."""

    label: Optional[str]
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def box(self) -> Tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


@dataclass
class RegionParse:
    """Boxes read from one text, in order of appearance, plus what could not be read."""

    boxes: List[Region] = field(default_factory=list)
    malformed: List[str] = field(default_factory=list)
    #: ``(start, end)`` character span of each box in the text, parallel to :attr:`boxes` (used to
    #: rewrite a box in place, :mod:`slidechat.evaluation.boxes`)
    spans: List[Tuple[int, int]] = field(default_factory=list)


def _snippet(text: str, n: int = 80) -> str:
    t = " ".join(text.split())
    return t if len(t) <= n else t[: n - 1] + "…"


def normalize_label(text: str) -> str:
    """Lower case, NFKC, single spaces, outer punctuation stripped: ``" HSIL "`` -> ``"hsil"``."""
    t = unicodedata.normalize("NFKC", str(text)).lower()
    t = " ".join(t.split())
    return t.strip(" .,;:!?\"'`*")


def label_before(segment: str) -> Optional[str]:
    """The class label written right before a box (``"hsil 3 is located at"`` -> ``"hsil"``), or None."""
    clause = re.split(r"[.;!?\n]", segment)[-1]
    # normalize_label also drops a trailing ":" ("hsil 3:" -> "hsil 3")
    clause = normalize_label(clause.replace("*", "").replace("`", "")) if clause.strip() else ""
    if not clause:
        return None
    clause = re.sub(r"^(?:and|or|then|also)\s+", "", clause)
    for form in _LABEL_FORMS:
        m = form.match(clause)
        if m:
            label = " ".join(m.group("label").split())
            if label and label not in _NOT_LABELS and not label.isdigit():
                return label
            return None
    return None


def _body_numbers(body: str) -> Tuple[Optional[List[float]], str]:
    """Four numbers from a box body, or ``(None, reason)``."""
    rest = _NUM.sub(" ", body)
    if not _SEP_ONLY.match(rest):
        bad = " ".join(rest.split())
        return None, f"unexpected text {bad[:30]!r} in box"
    nums = [float(x) for x in _NUM.findall(body)]
    if len(nums) != 4:
        return None, f"{len(nums)} number(s), expected 4"
    return nums, ""


def _ordered(label: Optional[str], v: Sequence[float]) -> Region:
    x1, y1, x2, y2 = v
    return Region(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _parse_cytochat(text: str, found: List[Tuple[int, int, Region]], malformed: List[str],
                    spans: List[Tuple[int, int]]) -> None:
    opens = list(_OPEN_RE.finditer(text))
    prev_end = 0
    for k, m in enumerate(opens):
        start = m.end()
        next_open = opens[k + 1].start() if k + 1 < len(opens) else len(text)
        window = text[start:next_open]
        close = _CLOSE_RE.search(window)
        seg_label = label_before(text[prev_end:m.start()])
        if close is not None:
            body, end = window[: close.start()], start + close.end()
            nums, why = _body_numbers(body)
        else:
            body = _BODY_CHARS.match(window).group(0)
            end = start + len(body)
            if not window[len(body):].strip() and next_open == len(text):
                nums, why = None, "no closing tag at the end of the text (cut off?)"
            else:  # "1 2 3 4. hsil 2 ..." -> closed by what follows
                nums, why = _body_numbers(body)
        spans.append((m.start(), end))
        prev_end = end
        if nums is None:
            malformed.append(f"{why}: {_snippet(text[m.start():end])}")
        else:
            found.append((m.start(), end, _ordered(seg_label, nums)))


def _parse_qwen(text: str, image_size: Optional[Tuple[float, float]], found: List[Tuple[int, int, Region]],
                malformed: List[str], spans: List[Tuple[int, int]], source: Optional[str]) -> None:
    tokens = list(_QWEN_TOKEN.finditer(text))
    label: Optional[str] = None
    i = 0
    last_end = 0
    while i < len(tokens):
        t = tokens[i]
        kind = t.group(1)
        if kind == "object_ref_start":
            if i + 1 < len(tokens) and tokens[i + 1].group(1) == "object_ref_end":
                label = normalize_label(text[t.end():tokens[i + 1].start()]) or None
                last_end = tokens[i + 1].end()
                i += 2
            else:
                malformed.append(f"object_ref without its end marker: {_snippet(text[t.start():])}")
                label = None
                i += 1
            continue
        if kind != "box_start":
            i += 1  # a stray object_ref_end / box_end
            continue
        if text[last_end:t.start()].strip(" ,;\n"):
            label = None  # a box after other words does not inherit an earlier object_ref's label
        end_tok = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1].group(1) == "box_end" else None
        if end_tok is not None:
            body, end = text[t.end():end_tok.start()], end_tok.end()
            i += 2
        else:
            body = _BODY_CHARS.match(text[t.end():]).group(0)
            end = t.end() + len(body)
            i += 1
        spans.append((t.start(), end))
        last_end = end
        snippet = _snippet(text[t.start():end])
        if end_tok is None and not text[end:].strip():
            malformed.append(f"no box_end at the end of the text (cut off?): {snippet}")
            continue
        nums, why = _body_numbers(body)
        if nums is None:
            malformed.append(f"{why}: {snippet}")
            continue
        if image_size is None:
            raise SlideChatError(
                "Qwen2-VL boxes are on a 0-1000 scale and the image size is unknown", source,
                hint="give readable image paths or --image-size W H")
        w, h = image_size
        px = [nums[0] * w / QWEN_SCALE, nums[1] * h / QWEN_SCALE,
              nums[2] * w / QWEN_SCALE, nums[3] * h / QWEN_SCALE]
        found.append((t.start(), end, _ordered(label, px)))


def parse_regions(text: Optional[str], image_size: Optional[Tuple[float, float]] = None,
                  source: Optional[str] = None) -> RegionParse:
    """All boxes in ``text`` (CytoChat ``<region>`` and Qwen2-VL native), in order of appearance.

    ``image_size=(width, height)`` is needed only to convert Qwen2-VL's 0-1000 boxes; ``source`` names
    the file/row in the error raised when it is missing.
    """
    out = RegionParse()
    if text is None or (isinstance(text, float) and text != text):
        return out
    text = str(text)
    found: List[Tuple[int, int, Region]] = []
    spans: List[Tuple[int, int]] = []
    _parse_cytochat(text, found, out.malformed, spans)
    _parse_qwen(text, image_size, found, out.malformed, spans, source)
    found.sort(key=lambda x: x[0])
    out.boxes = [b for _, _, b in found]
    out.spans = [(s, e) for s, e, _ in found]
    # "(x1,y1),(x2,y2)" outside any marker: native boxes decoded with special tokens skipped
    masked = list(text)
    for s, e in spans:
        masked[s:e] = " " * (e - s)
    for m in _BARE_QWEN.finditer("".join(masked)):
        out.malformed.append("box without <|box_start|> markers (decoded with special tokens "
                             f"skipped?): {_snippet(m.group(0))}")
    return out


# --------------------------------------------------------------------------- geometry

def iou(a: Region | Sequence[float], b: Region | Sequence[float]) -> float:
    """Intersection over union of two boxes (continuous coordinates; 0 when the union is empty)."""
    ax1, ay1, ax2, ay2 = a.box if isinstance(a, Region) else a
    bx1, by1, bx2, by2 = b.box if isinstance(b, Region) else b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def iou_matrix(a: Sequence[Region], b: Sequence[Region]) -> np.ndarray:
    """``len(a) x len(b)`` IoU matrix."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    A = np.asarray([r.box for r in a], dtype=np.float64)
    B = np.asarray([r.box for r in b], dtype=np.float64)
    iw = np.clip(np.minimum(A[:, None, 2], B[None, :, 2]) - np.maximum(A[:, None, 0], B[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(A[:, None, 3], B[None, :, 3]) - np.maximum(A[:, None, 1], B[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(A[:, 2] - A[:, 0], 0, None) * np.clip(A[:, 3] - A[:, 1], 0, None)
    area_b = np.clip(B[:, 2] - B[:, 0], 0, None) * np.clip(B[:, 3] - B[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out

