"""One box-coordinate layer: each Qwen VL family's native box convention <-> CytoChat's ``<region>``.

CytoChat writes ``<region>x1 y1 x2 y2</region>`` in pixels of the ORIGINAL image (the file on disk).
The Qwen VL families each write boxes their own way, so a model fine-tuned in its native convention,
or a base model, must be converted before it is scored against CytoChat's truth (and CytoChat's
training answers converted before they are trained on in a native convention). Conventions, with
where each was read:

* ``region`` (CytoChat): absolute float pixels of the original image; parsed by
  :func:`slidechat.evaluation.regions.parse_regions` (the one parser; it also reads Qwen2-VL boxes).
* ``qwen2_vl``: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
  integers on a 0-1000 scale of the image's width and height (the special tokens are in the Qwen2-VL
  tokenizer; the 0-1000 scale as in FACTS.md "Box conventions"). Relative, so no resize rule is needed;
  also parsed by :func:`~slidechat.evaluation.regions.parse_regions`.
* ``qwen2_5_vl``: absolute pixels on the image AFTER the processor's resize, usually JSON
  ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]``, possibly inside a ```json fence. Converting needs
  the size the model actually saw: :func:`model_input_size`.
* ``qwen3_vl``: the same JSON, but relative integers in 0-1000 again.

Verification, honestly stated: the JSON form and the absolute-on-resized (2.5) vs relative-0-1000 (3)
conventions were read in public third-party code and notes found by search (a ``qwen-vl-finetune``
grounding-format note in a QwenLM/Qwen3-VL fork saying Qwen3-VL uses relative 0-1000 and Qwen2.5-VL
absolute pixels; scripts converting COCO boxes to Qwen2.5-VL input coordinates with
``qwen_vl_utils.smart_resize``) and agree with FACTS.md; the official QwenLM cookbooks themselves were
NOT read in this session. The ```json fence and the float tolerance of the readers are assumptions
about what models emit, not documented rules.

Resize rule (what :func:`model_input_size` reproduces; checked against each family's own processor in
tests/test_vl_families.py): LLaMA-Factory first scales each image by
``sqrt(image_max_pixels / (w*h))`` when it has more pixels (and up to ``image_min_pixels`` when fewer),
truncating each side with ``int()``, then makes each side >= 28 and the aspect ratio <= 200 (its
``qwen2_vl`` mm plugin; :func:`slidechat.data.image_sizes.lf_resize_steps`, which
:func:`slidechat.data.images.scale_image` follows too). Then the processor's ``smart_resize`` (transformers
``models/qwen2_vl/image_processing_qwen2_vl.py``, read in 4.48 and in 5.25, which no longer refuses a
side shorter than ``factor`` and keeps sides >= ``factor`` when shrinking: round each side to
a multiple of ``factor``; if that exceeds ``max_pixels`` floor both sides of ``side / beta`` with
``beta = sqrt(h*w / max_pixels)``; if below ``min_pixels`` ceil ``side * beta`` with
``beta = sqrt(min_pixels / (h*w))``). ``factor`` = patch size x spatial merge: 14 x 2 = 28 for Qwen2-VL and
Qwen2.5-VL, 16 x 2 = 32 for Qwen3-VL (transformers' ``models/qwen3_vl`` folder has no image processor
of its own; copies of the released ``preprocessor_config.json`` quoted in public code set the Qwen2-VL
processor's ``patch_size`` to 16 and ``merge_size`` to 2).

min/max pixels of the processor, per family (:data:`RESIZE_RULES`): the values in the released
checkpoints' ``preprocessor_config.json`` (what ``AutoProcessor.from_pretrained`` applies), NOT the
transformers class defaults (``56*56`` / ``28*28*1280``). Qwen2-VL-7B-Instruct and Qwen2.5-VL-7B-Instruct:
``min_pixels 3136``, ``max_pixels 12845056``; Qwen3-VL: ``size = {"shortest_edge": 65536,
"longest_edge": 16777216}``. These were read from copies of those files quoted in public repositories,
not from the Hugging Face hub itself (no network access here): **not verified against the hub**.
They matter only when an image is outside them after LLaMA-Factory's scaling (its default
``image_max_pixels`` 768*768 is far below every max); pass ``processor_min_pixels`` /
``processor_max_pixels`` for a checkpoint configured otherwise.

Rounding: the writers emit integers, as the models do. A 0-1000 coordinate is off by at most
``0.5 / 1000 * W`` pixels of the original image after a round trip; a Qwen2.5-VL coordinate by at most
``0.5 * W / W'`` (``W'`` the model-input width). Readers accept floats.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from slidechat.data.image_sizes import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, lf_scaled_size
from slidechat.evaluation.regions import (QWEN_BOX_END, QWEN_BOX_START, QWEN_SCALE, Region, RegionParse,
                                          _snippet, normalize_label, parse_regions)
from slidechat.utils.errors import SlideChatError

Size = Tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class ResizeRule:
    """The processor's resize for one family: ``factor`` = patch x merge, pixel bounds of the released
    ``preprocessor_config.json`` (see the module doc for sources and what is unverified)."""

    factor: int
    min_pixels: int
    max_pixels: int


RESIZE_RULES: Dict[str, ResizeRule] = {
    "qwen2_vl": ResizeRule(28, 3136, 12845056),
    "qwen2_5_vl": ResizeRule(28, 3136, 12845056),
    "qwen3_vl": ResizeRule(32, 65536, 16777216),
}

BOX_FORMATS = ("region", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _check_size(image_size: Optional[Sequence[float]], where: Optional[str]) -> Tuple[float, float]:
    if image_size is None:
        raise SlideChatError("the image size is unknown and this box format needs it", where,
                             hint="give readable image paths (--image-dir) or --image-size W H")
    try:
        w, h = float(image_size[0]), float(image_size[1])
    except (TypeError, ValueError, IndexError):
        raise SlideChatError(f"image size {image_size!r} is not (width, height)", where) from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise SlideChatError(f"image size {image_size!r} must be two positive numbers", where)
    return w, h


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """``(height, width)`` after the Qwen VL image processor's resize (transformers 5's ``smart_resize`` of
    ``models/qwen2_vl/image_processing_qwen2_vl.py``, re-implemented so the box layer needs no
    transformers import). As there, an aspect ratio over 200 is refused; a side shorter than ``factor``
    is rounded (transformers 4.48 refused it; 5 rounds it, and keeps each side >= ``factor`` when
    shrinking).
    """
    if max(height, width) / min(height, width) > 200:
        raise SlideChatError(f"image {width}x{height}: aspect ratio over 200, refused by the processor")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_input_size(image_size: Size, family: str, image_max_pixels: Optional[int] = IMAGE_MAX_PIXELS,
                     image_min_pixels: Optional[int] = IMAGE_MIN_PIXELS,
                     processor_min_pixels: Optional[int] = None,
                     processor_max_pixels: Optional[int] = None) -> Size:
    """``(width, height)`` of the image the model of ``family`` sees: LLaMA-Factory's scaling (skipped
    with ``image_max_pixels=image_min_pixels=None``), then the processor's ``smart_resize``."""
    if family not in RESIZE_RULES:
        raise SlideChatError(f"unknown VL family {family!r}", hint=f"one of {sorted(RESIZE_RULES)}")
    rule = RESIZE_RULES[family]
    w, h = lf_scaled_size(image_size, image_max_pixels, image_min_pixels)
    rh, rw = smart_resize(h, w, rule.factor,
                          rule.min_pixels if processor_min_pixels is None else int(processor_min_pixels),
                          rule.max_pixels if processor_max_pixels is None else int(processor_max_pixels))
    return rw, rh


def processor_resize_kwargs(processor: object) -> Dict[str, int]:
    """``processor_min_pixels`` / ``processor_max_pixels`` of a loaded processor (its image processor's
    ``size``: ``shortest_edge`` / ``longest_edge`` in transformers 5, ``min_pixels`` / ``max_pixels``
    before), for a checkpoint configured otherwise than :data:`RESIZE_RULES`."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    get = (size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))) if size else None
    lo = get("shortest_edge") if get else None
    hi = get("longest_edge") if get else None
    lo = getattr(ip, "min_pixels", None) if lo is None else lo
    hi = getattr(ip, "max_pixels", None) if hi is None else hi
    if lo is None or hi is None:
        raise SlideChatError(f"{type(ip).__name__} has no min/max pixel bounds (not a Qwen VL image processor)")
    return {"processor_min_pixels": int(lo), "processor_max_pixels": int(hi)}


# --------------------------------------------------------------------------- JSON boxes (2.5-VL, 3-VL)

_JSON_OBJ = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}", re.DOTALL)
_BBOX_KEY = re.compile(r"\"bbox_2d\"")


def _parse_json_boxes(text: str) -> Tuple[List[Tuple[int, int, Optional[str], List[float]]], List[str]]:
    """``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` objects in ``text`` (inside a list, a ```json
    fence or alone), in the model's own coordinates; unreadable ones are listed, never guessed."""
    found: List[Tuple[int, int, Optional[str], List[float]]] = []
    malformed: List[str] = []
    covered: List[Tuple[int, int]] = []
    for m in _JSON_OBJ.finditer(text):
        covered.append(m.span())
        try:
            obj = json.loads(m.group(0))
        except ValueError as e:
            malformed.append(f"not valid JSON ({e.msg}): {_snippet(m.group(0))}")
            continue
        box = obj.get("bbox_2d")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        for v in box)):
            malformed.append(f"bbox_2d is not 4 numbers: {_snippet(m.group(0))}")
            continue
        lab = obj.get("label")
        label = normalize_label(lab) or None if isinstance(lab, str) else None
        found.append((m.start(), m.end(), label, [float(v) for v in box]))
    for k in _BBOX_KEY.finditer(text):
        if not any(s <= k.start() < e for s, e in covered):
            malformed.append(f"bbox_2d outside a complete JSON object (cut off?): {_snippet(text[k.start():])}")
    return found, malformed


def _ordered(label: Optional[str], v: Sequence[float]) -> Region:
    x1, y1, x2, y2 = v
    return Region(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _fmt(v: float) -> str:
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


# --------------------------------------------------------------------------- the registry

BoxesIn = Union[str, Sequence[Region], None]


@dataclass(frozen=True)
class BoxFormat:
    """One convention: ``to_pixels`` reads text (or boxes in the format's coordinates) into original-image
    pixels; ``from_pixels`` writes original-pixel regions in the format. ``scale(image_size, **resize)``
    gives the (sx, sy) with ``format_coord = pixel * s``."""

    name: str
    markers: Tuple[str, ...]
    scale: Callable[..., Tuple[float, float]]
    needs_size: bool

    def present(self, text: Optional[str]) -> bool:
        """Whether ``text`` holds a box in this format (so the image size is needed)."""
        return bool(text) and any(m in str(text) for m in self.markers)

    def to_pixels(self, text_or_boxes: BoxesIn, image_size: Optional[Size] = None,
                  source: Optional[str] = None, **resize: Optional[int]) -> RegionParse:
        """Boxes in original-image pixels. Text: the format's boxes plus any ``<region>`` (already
        pixels), in order of appearance; a sequence of :class:`Region`: taken as this format's
        coordinates and scaled."""
        if text_or_boxes is None or isinstance(text_or_boxes, str):
            return self._parse(text_or_boxes, image_size, source, resize)
        sx, sy = self.scale(image_size, source=source, **resize)
        return RegionParse(boxes=[_ordered(r.label, (r.x1 / sx, r.y1 / sy, r.x2 / sx, r.y2 / sy))
                                  for r in text_or_boxes])

    def _parse(self, text: Optional[str], image_size: Optional[Size], source: Optional[str],
               resize: Dict[str, Optional[int]]) -> RegionParse:
        if self.name in ("region", "qwen2_vl"):
            if self.name == "qwen2_vl" and self.present(text):
                _check_size(image_size, source)
            return parse_regions(text, image_size, source=source)
        base = parse_regions(text, image_size, source=source)  # <region> pixels (and any Qwen2-VL box tokens)
        if not text:
            return base
        found, malformed = _parse_json_boxes(str(text))
        if not found:
            base.malformed.extend(malformed)
            return base
        sx, sy = self.scale(image_size, source=source, **resize)
        items = [(s, e, b) for s, e, b in zip([s for s, _ in base.spans], [e for _, e in base.spans],
                                              base.boxes)]
        items += [(s, e, _ordered(lab, (v[0] / sx, v[1] / sy, v[2] / sx, v[3] / sy)))
                  for s, e, lab, v in found]
        items.sort(key=lambda x: x[0])
        return RegionParse(boxes=[b for _, _, b in items], malformed=base.malformed + malformed,
                           spans=[(s, e) for s, e, _ in items])

    def from_pixels(self, regions: Sequence[Region], image_size: Optional[Size] = None,
                    source: Optional[str] = None, **resize: Optional[int]) -> str:
        """``regions`` (original pixels) written in this format: ``<region>`` sentences as CytoChat
        writes them, Qwen2-VL box tokens (with the label as ``object_ref``), or a JSON list."""
        if self.name == "region":
            return ". ".join(_region_sentence(r, i) for i, r in enumerate(_numbered(regions))) + \
                ("." if regions else "")
        sx, sy = self.scale(image_size, source=source, **resize)
        if self.name == "qwen2_vl":
            # boxes right after an object_ref all take its label (regions.parse_regions, as Qwen2-VL
            # writes several boxes of one object), so an unlabelled box after a labelled one is set off
            # by ". " to stay unlabelled
            parts, labelled = [], False
            for r in regions:
                sep = ". " if (r.label is None and labelled) else ""
                labelled = r.label is not None or (labelled and not sep)
                parts.append(sep + (f"<|object_ref_start|>{r.label}<|object_ref_end|>" if r.label else "")
                             + _qwen2_box(self._ints(r, sx, sy, image_size)))
            return "".join(parts)
        out = []
        for r in regions:
            d: Dict[str, object] = {"bbox_2d": self._ints(r, sx, sy, image_size)}
            if r.label:
                d["label"] = r.label
            out.append(d)
        return json.dumps(out)

    @staticmethod
    def _ints(r: Region, sx: float, sy: float, image_size: Optional[Size]) -> List[int]:
        """Integers in the format's range (0-1000, or 0..W'/H' of the model input), clamped."""
        w, h = _check_size(image_size, None)
        hi_x, hi_y = round(w * sx), round(h * sy)
        return [int(min(max(round(r.x1 * sx), 0), hi_x)), int(min(max(round(r.y1 * sy), 0), hi_y)),
                int(min(max(round(r.x2 * sx), 0), hi_x)), int(min(max(round(r.y2 * sy), 0), hi_y))]


def _numbered(regions: Sequence[Region]) -> List[Tuple[Region, int]]:
    seen: Dict[Optional[str], int] = {}
    out = []
    for r in regions:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append((r, seen[r.label]))
    return out


def _region_body(r: Region) -> str:
    return f"<region>{_fmt(r.x1)} {_fmt(r.y1)} {_fmt(r.x2)} {_fmt(r.y2)}</region>"


def _region_sentence(item: Tuple[Region, int], _i: int) -> str:
    r, n = item
    return f"{r.label} {n} is located at {_region_body(r)}" if r.label else _region_body(r)


def _qwen2_box(v: Sequence[int]) -> str:
    return f"{QWEN_BOX_START}({v[0]},{v[1]}),({v[2]},{v[3]}){QWEN_BOX_END}"


def _relative_scale(image_size: Optional[Size], source: Optional[str] = None, **_: Optional[int]
                    ) -> Tuple[float, float]:
    w, h = _check_size(image_size, source)
    return QWEN_SCALE / w, QWEN_SCALE / h


def _identity(image_size: Optional[Size] = None, source: Optional[str] = None, **_: Optional[int]
              ) -> Tuple[float, float]:
    return 1.0, 1.0


def _model_input_scale(image_size: Optional[Size], source: Optional[str] = None, **resize: Optional[int]
                       ) -> Tuple[float, float]:
    """Qwen2.5-VL: model-input size / original size, from :func:`model_input_size`."""
    w, h = _check_size(image_size, source)
    mw, mh = model_input_size((int(round(w)), int(round(h))), "qwen2_5_vl", **_resize_kw(resize))
    return mw / w, mh / h


def _resize_kw(resize: Dict[str, Optional[int]]) -> Dict[str, Optional[int]]:
    allowed = ("image_max_pixels", "image_min_pixels", "processor_min_pixels", "processor_max_pixels")
    bad = [k for k in resize if k not in allowed]
    if bad:
        raise SlideChatError(f"unknown resize option(s) {bad}", hint=f"allowed: {list(allowed)}")
    out: Dict[str, Optional[int]] = {"image_max_pixels": IMAGE_MAX_PIXELS,
                                     "image_min_pixels": IMAGE_MIN_PIXELS}
    out.update(resize)
    return out


FORMATS: Dict[str, BoxFormat] = {
    "region": BoxFormat("region", (), _identity, False),
    "qwen2_vl": BoxFormat("qwen2_vl", (QWEN_BOX_START,), _relative_scale, True),
    "qwen2_5_vl": BoxFormat("qwen2_5_vl", ("bbox_2d",), _model_input_scale, True),
    "qwen3_vl": BoxFormat("qwen3_vl", ("bbox_2d",), _relative_scale, True),
}


def box_format(name: str) -> BoxFormat:
    """The registered :class:`BoxFormat` called ``name``; an unknown name is a one-line error."""
    if name not in FORMATS:
        raise SlideChatError(f"unknown box format {name!r}", hint=f"one of {list(BOX_FORMATS)}")
    return FORMATS[name]


def to_pixels(text_or_boxes: BoxesIn, fmt: str, image_size: Optional[Size] = None,
              source: Optional[str] = None, **resize: Optional[int]) -> RegionParse:
    """Shortcut: ``box_format(fmt).to_pixels(...)``."""
    return box_format(fmt).to_pixels(text_or_boxes, image_size, source=source, **resize)


def from_pixels(regions: Sequence[Region], fmt: str, image_size: Optional[Size] = None,
                source: Optional[str] = None, **resize: Optional[int]) -> str:
    """Shortcut: ``box_format(fmt).from_pixels(...)``."""
    return box_format(fmt).from_pixels(regions, image_size, source=source, **resize)


# --------------------------------------------------------------------------- training answers

def convert_text(text: str, src: str, dst: str, image_size: Optional[Size] = None,
                 source: Optional[str] = None, **resize: Optional[int]) -> str:
    """Rewrite the boxes of one answer from format ``src`` to ``dst`` (original pixels in between).

    ``region`` <-> ``qwen2_vl``: each box is replaced where it stands and the prose is kept (a text
    round trip changes only the numbers, by the rounding in the module doc). To or from the JSON
    formats (``qwen2_5_vl``, ``qwen3_vl``) the whole answer becomes the JSON list (the form of the
    Qwen cookbooks), or, back, CytoChat's ``"hsil 1 is located at <region>…</region>."`` sentences:
    prose around the boxes is not kept. A text without boxes is returned unchanged; a malformed box is
    an error (training data must be exact).
    """
    if src == dst:
        return text
    parsed = box_format(src).to_pixels(text, image_size, source=source, **resize)
    if parsed.malformed:
        raise SlideChatError(f"malformed box(es) in an answer: {parsed.malformed[:2]}", source)
    if not parsed.boxes:
        return text
    inline = {src, dst} <= {"region", "qwen2_vl"}
    if not inline:
        return box_format(dst).from_pixels(parsed.boxes, image_size, source=source, **resize)
    out, last = [], 0
    for (s, e), r in zip(parsed.spans, parsed.boxes):
        out.append(text[last:s])
        if dst == "region":
            out.append(_region_body(r))
        else:
            sx, sy = box_format(dst).scale(image_size, source=source)
            out.append(_qwen2_box(BoxFormat._ints(r, sx, sy, image_size)))
        last = e
    out.append(text[last:])
    return "".join(out)


def convert_dataset_rows(rows: List[dict], src: str, dst: str, image_size: Callable[[dict], Optional[Size]],
                         source: Optional[str] = None, **resize: Optional[int]) -> Tuple[List[dict], int]:
    """Rewrite the assistant answers of LLaMA-Factory sharegpt rows (``messages``/``role``/``content`` or
    ``conversations``/``from``/``value``) from ``src`` to ``dst``; ``image_size(row)`` gives the row's
    original image size. Returns the new rows and the number of answers changed."""
    out, changed = [], 0
    for i, row in enumerate(rows):
        where = f"{source or 'dataset'}: row {i + 1}"
        key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
        if key is None or not isinstance(row[key], list):
            raise SlideChatError(f"row {i + 1}: no messages/conversations list", source,
                                 hint="a LLaMA-Factory sharegpt dataset is expected")
        new = dict(row)
        turns = []
        size: Optional[Size] = None
        asked = False
        needs = box_format(src).needs_size or box_format(dst).needs_size
        for t in row[key]:
            if not isinstance(t, dict):
                raise SlideChatError(f"row {i + 1}: a turn is not an object", source)
            role = t.get("role", t.get("from"))
            ck = "content" if "content" in t else "value"
            txt = t.get(ck)
            if role in ("assistant", "gpt") and isinstance(txt, str) and (
                    box_format(src).present(txt) or (src == "region" and "<region>" in txt.lower())):
                if needs and not asked:
                    size, asked = image_size(row), True
                conv = convert_text(txt, src, dst, size, source=where, **resize)
                if conv != txt:
                    changed += 1
                t = dict(t)
                t[ck] = conv
            turns.append(t)
        new[key] = turns
        out.append(new)
    return out, changed


__all__ = ["BOX_FORMATS", "FORMATS", "RESIZE_RULES", "BoxFormat", "ResizeRule", "box_format", "convert_text",
           "convert_dataset_rows", "from_pixels", "model_input_size", "smart_resize",
           "to_pixels"]
