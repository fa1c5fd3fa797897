"""Synthetic cytology: fields of view and whole smears with known cells, boxes and labels.

Real cytology images cannot ship with the repository, yet the cytology copilot (training, inference,
scoring, slide screening, the demo) needs images whose truth is known exactly. This module draws
Papanicolaou-like smears procedurally: a pale glass background with scattered squamous cells
(translucent pink or blue-green polygonal cytoplasm, small round nucleus) and abnormal cells of three
classes that differ in simple, measurable ways (see :data:`CELL_CLASSES`):

* ``enlarged``  -- nucleus radius 7.5-9 µm instead of 2.8-3.8 µm (high nuclear-to-cytoplasmic ratio);
* ``dark``      -- hyperchromatic: normal-sized nucleus with a much darker stain (mean RGB ~ 40);
* ``irregular`` -- lobulated nuclear contour (radius modulated by 25-35 %), lower solidity.

Sizes are in micrometres, so the same cells can be drawn at any MPP. Every box is the exact
axis-aligned extent of the drawn cell polygon (cytoplasm and nucleus), in absolute pixel floats of
the image as written (``x1 y1 x2 y2``), clipped to the image -- CytoChat's ``<region>`` convention.

Outputs:

* :func:`write_fields_dataset` -- PNG fields + LLaMA-Factory datasets (``dataset_info.json`` with
  sharegpt entries, JSONL ``messages`` + ``images``) for MCQ (2-10 options, CytoChat's prompt style),
  "Locate all <class>." grounding, region description, short reports and the screening question, with
  a train/test split and ``fields.jsonl`` (the truth boxes of every field).
* :func:`write_cytology_slides` -- pyramidal Aperio-style TIFFs (written by
  :func:`slidechat.wsi.synthetic.write_pyramid`) with sparse smear regions, empty glass, and, on
  abnormal slides, clusters of abnormal cells; ``labels.csv`` (slide,label), ``manifest.csv``, and the
  truth of every cell (``truth_cells.csv``) and of every field of the default grid (``truth_fields.csv``).

Everything is a deterministic function of the seed; nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from slidechat.data.vocabulary import (GROUND_ABNORMAL_QUESTION, LETTERS, REGION_QUESTION, REPORT_QUESTION,
                                       SCREENING_OPTIONS, SCREENING_QUESTION, TASKS)
from slidechat.utils.atomic import atomic_path, atomic_write_text
from slidechat.utils.paths import PathLike
from slidechat.wsi.synthetic import SlideSpec, write_manifest, write_pyramid

logger = logging.getLogger(__name__)

#: Cell classes; index 0 is the normal class, the rest are abnormal.
CELL_CLASSES: Tuple[str, ...] = ("normal", "enlarged", "dark", "irregular")
ABNORMAL_CLASSES: Tuple[str, ...] = CELL_CLASSES[1:]
#: Short descriptions used in reports and MCQ options.
CLASS_DESCRIPTIONS: Dict[str, str] = {
    "normal": "normal squamous cells with small round nuclei",
    "enlarged": "atypical cells with enlarged nuclei",
    "dark": "atypical cells with dark, hyperchromatic nuclei",
    "irregular": "atypical cells with irregular nuclear contours",
}
#: Default field of view: 512 px at 0.5 µm/px (256 µm across).
DEFAULT_FIELD_SIZE = 512
DEFAULT_MPP = 0.5
GLASS_RGB = (238.0, 236.0, 230.0)



# ----------------------------------------------------------------------------------------------
# cells and boxes


@dataclass(frozen=True)
class Box:
    """A true cell box in absolute pixels of its image (floats), with the cell class."""

    x1: float
    y1: float
    x2: float
    y2: float
    cls: str

    @property
    def center(self) -> Tuple[float, float]:
        return (0.5 * (self.x1 + self.x2), 0.5 * (self.y1 + self.y2))

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def region(self) -> str:
        """``<region>x1 y1 x2 y2</region>`` with two decimals, as in CytoChat's benchmark files."""
        return f"<region>{_num(self.x1)} {_num(self.y1)} {_num(self.x2)} {_num(self.y2)}</region>"

    def as_list(self) -> List[float]:
        return [round(self.x1, 2), round(self.y1, 2), round(self.x2, 2), round(self.y2, 2)]


def _num(v: float) -> str:
    return f"{round(float(v), 2):g}" if abs(v) < 1e6 else f"{v:.2f}"


@dataclass(frozen=True)
class Cell:
    """One drawn cell: polygons in level-0 pixels (``cyto`` and ``nucleus``: (K, 2) arrays)."""

    cls: str
    cx: float
    cy: float
    cyto: np.ndarray
    nucleus: np.ndarray
    cyto_rgb: Tuple[float, float, float]
    nuc_rgb: Tuple[float, float, float]

    def bounds(self) -> Tuple[float, float, float, float]:
        pts = np.concatenate([self.cyto, self.nucleus])
        return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()),
                float(pts[:, 1].max()))

    def radius(self) -> float:
        return float(np.hypot(self.cyto[:, 0] - self.cx, self.cyto[:, 1] - self.cy).max())

    def box(self, width: Optional[float] = None, height: Optional[float] = None,
            offset: Tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> Box:
        """Box in the coordinates of an image whose top-left is ``offset`` (level-0 px), clipped."""
        x1, y1, x2, y2 = self.bounds()
        ox, oy = offset
        x1, x2 = (x1 - ox) / scale, (x2 - ox) / scale
        y1, y2 = (y1 - oy) / scale, (y2 - oy) / scale
        if width is not None:
            x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        if height is not None:
            y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        return Box(x1, y1, x2, y2, self.cls)


_K = 48  # polygon vertices
_THETA = np.linspace(0, 2 * np.pi, _K, endpoint=False)
_CYTO_COLOURS = ((224.0, 168.0, 192.0), (168.0, 204.0, 206.0), (214.0, 186.0, 200.0))


def _smooth_profile(rng: np.random.Generator, amp: float, n_harm: int = 3) -> np.ndarray:
    prof = np.ones(_K)
    for k in range(2, 2 + n_harm):
        prof += amp / k * rng.uniform(-1, 1) * np.sin(k * _THETA + rng.uniform(0, 2 * np.pi))
    return prof


def make_cell(rng: np.random.Generator, cls: str, cx: float, cy: float, mpp: float = DEFAULT_MPP) -> Cell:
    """Draw the geometry and colours of one cell of class ``cls`` centred at (cx, cy) pixels."""
    if cls not in CELL_CLASSES:
        raise ValueError(f"unknown cell class {cls!r}; choose from {CELL_CLASSES}")
    u = 1.0 / mpp  # px per µm
    if cls == "normal":
        R, aspect = rng.uniform(17, 24), rng.uniform(0.65, 1.0)
    else:
        R, aspect = rng.uniform(14, 19), rng.uniform(0.75, 1.0)
    ang = rng.uniform(0, np.pi)
    prof = _smooth_profile(rng, 0.12)
    ex, ey = R * np.cos(_THETA) * prof, R * aspect * np.sin(_THETA) * prof
    cyto = np.stack([ex * np.cos(ang) - ey * np.sin(ang), ex * np.sin(ang) + ey * np.cos(ang)], 1) * u
    jit = rng.uniform(-8, 8, 3)
    if cls == "normal":
        r, nprof, base = rng.uniform(2.8, 3.8), _smooth_profile(rng, 0.05), (100.0, 84.0, 150.0)
    elif cls == "enlarged":
        r, nprof, base = rng.uniform(7.5, 9.0), _smooth_profile(rng, 0.06), (96.0, 78.0, 146.0)
    elif cls == "dark":
        r, nprof, base = rng.uniform(3.8, 5.0), _smooth_profile(rng, 0.05), (36.0, 20.0, 58.0)
        jit = jit * 0.4
    else:  # irregular: lobulated contour
        r, base = rng.uniform(4.5, 5.5), (92.0, 74.0, 142.0)
        k = int(rng.integers(3, 6))
        nprof = (1.0 + rng.uniform(0.25, 0.35) * np.sin(k * _THETA + rng.uniform(0, 2 * np.pi))
                 + 0.12 * np.sin((k + 2) * _THETA + rng.uniform(0, 2 * np.pi)))
    room = max(0.0, R * aspect - r * float(nprof.max()) - 1.5)
    off = rng.uniform(-0.3, 0.3, 2) * room
    nuc = np.stack([(off[0] + r * nprof * np.cos(_THETA)), (off[1] + r * nprof * np.sin(_THETA))], 1) * u
    cyto_rgb = tuple(float(c) for c in np.array(_CYTO_COLOURS[int(rng.integers(len(_CYTO_COLOURS)))])
                     + rng.uniform(-6, 6, 3))
    nuc_rgb = tuple(float(c) for c in np.clip(np.array(base) + jit, 0, 255))
    return Cell(cls, float(cx), float(cy), cyto + [cx, cy], nuc + [cx, cy], cyto_rgb, nuc_rgb)


def render_cells(cells: Sequence[Cell], x0: float, y0: float, w: int, h: int, downsample: float = 1.0,
                 seed: int = 0, glass: Sequence[float] = GLASS_RGB) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the region with level-0 top-left (x0, y0) at ``downsample``.

    Cytoplasm is translucent (overlaps darken), nuclei nearly opaque; polygons are anti-aliased with
    sub-pixel precision, so the same cells render consistently at every pyramid level. A little
    grain (seeded by the region) keeps the images from being unnaturally flat.
    """
    import cv2

    d = float(downsample)
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.asarray(glass, np.float32)
    shift = 4
    f = float(1 << shift)
    for c in cells:
        bx1, by1, bx2, by2 = c.bounds()
        rx1, ry1 = int(math.floor((bx1 - x0) / d)) - 1, int(math.floor((by1 - y0) / d)) - 1
        rx2, ry2 = int(math.ceil((bx2 - x0) / d)) + 2, int(math.ceil((by2 - y0) / d)) + 2
        cx1, cy1, cx2, cy2 = max(rx1, 0), max(ry1, 0), min(rx2, w), min(ry2, h)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        roi = img[cy1:cy2, cx1:cx2]
        for poly, rgb, opacity in ((c.cyto, c.cyto_rgb, 0.6), (c.nucleus, c.nuc_rgb, 0.95)):
            m = np.zeros(roi.shape[:2], np.uint8)
            # continuous coords (pixel i covers [i, i+1)) -> OpenCV coords (pixel centres on integers)
            pts = (poly - [x0, y0]) / d - [cx1, cy1] - 0.5
            cv2.fillPoly(m, [np.round(pts * f).astype(np.int32)], 255, cv2.LINE_AA, shift)
            a = (m.astype(np.float32) * (opacity / 255.0))[..., None]
            roi *= 1 - a
            roi += a * np.asarray(rgb, np.float32)
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(x0), int(y0), int(d * 16)])
    img += rng.normal(0, 2.0, (h, w, 1)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _fits(cell: Cell, width: float, height: float, others: Iterable[Cell]) -> bool:
    """Whether ``cell``'s nucleus lies at least 1 px inside the image and its cytoplasm circle clears
    every one of ``others`` by more than 1 px (the placement rule of fields and slides)."""
    nx1, ny1 = cell.nucleus.min(0)
    nx2, ny2 = cell.nucleus.max(0)
    if nx1 < 1 or ny1 < 1 or nx2 > width - 1 or ny2 > height - 1:
        return False
    rad = cell.radius()
    return all(math.hypot(cell.cx - o.cx, cell.cy - o.cy) > rad + o.radius() + 1.0 for o in others)


def _place_cells(rng: np.random.Generator, classes: Sequence[str], width: float, height: float,
                 mpp: float, margin: float = 0.0, max_tries: int = 200) -> List[Cell]:
    """Place cells of the given classes without overlap; nuclei stay inside [margin, size - margin]."""
    cells: List[Cell] = []
    for cls in classes:
        for _ in range(max_tries):
            cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            cell = make_cell(rng, cls, cx, cy, mpp)
            if _fits(cell, width, height, cells):
                cells.append(cell)
                break
    return cells


def make_field(rng: np.random.Generator, size: int = DEFAULT_FIELD_SIZE,
               abnormal_classes: Optional[Sequence[str]] = None, n_normal: Optional[int] = None,
               mpp: float = DEFAULT_MPP, abnormal_probability: float = 0.5,
               seed: Optional[int] = None) -> Tuple[Any, List[Box]]:
    """One field of view: ``(PIL.Image RGB size x size, boxes)``.

    ``abnormal_classes`` lists one class per abnormal cell (``[]`` = a normal field); ``None`` draws a
    normal field or, with ``abnormal_probability``, 1-3 cells of one abnormal class. ``n_normal``
    defaults to 2-14 cells per 256 µm x 256 µm. Cells are drawn in micrometres (``mpp`` µm/px), so a
    smaller ``size`` at a larger ``mpp`` gives small fields for tests. Boxes are returned in drawing
    order (the field may hold fewer cells than asked when they do not fit).
    """
    from PIL import Image

    fields = make_field_cells(rng, size, abnormal_classes, n_normal, mpp, abnormal_probability)
    img = render_cells(fields, 0.0, 0.0, size, size, 1.0,
                       seed=int(rng.integers(1 << 31)) if seed is None else seed)
    return Image.fromarray(img), [c.box(size, size) for c in fields]


def make_field_cells(rng: np.random.Generator, size: int = DEFAULT_FIELD_SIZE,
                     abnormal_classes: Optional[Sequence[str]] = None, n_normal: Optional[int] = None,
                     mpp: float = DEFAULT_MPP, abnormal_probability: float = 0.5) -> List[Cell]:
    """The cells of :func:`make_field` (without rendering)."""
    scale = (size * mpp / 256.0) ** 2
    if abnormal_classes is None:
        if rng.random() < abnormal_probability:
            cls = ABNORMAL_CLASSES[int(rng.integers(len(ABNORMAL_CLASSES)))]
            abnormal_classes = [cls] * int(rng.integers(1, 4))
        else:
            abnormal_classes = []
    for c in abnormal_classes:
        if c not in ABNORMAL_CLASSES:
            raise ValueError(f"unknown abnormal class {c!r}; choose from {ABNORMAL_CLASSES}")
    if n_normal is None:
        n_normal = max(1, int(round(rng.integers(2, 15) * scale)))
    classes = list(abnormal_classes) + ["normal"] * n_normal
    order = rng.permutation(len(classes))
    cells = _place_cells(rng, [classes[i] for i in order], size, size, mpp)
    return cells


# ----------------------------------------------------------------------------------------------
# conversations (CytoChat's prompt style)


def mcq_prompt(topic: str, options: Sequence[str]) -> str:
    """CytoChat's MCQ prompt: ``... based on the image [topic], ... options [A.x, B.y]. Just answer...``"""
    if not 2 <= len(options) <= 10:
        raise ValueError(f"an MCQ needs 2-10 options, got {len(options)}")
    opts = ", ".join(f"{LETTERS[i]}.{o}" for i, o in enumerate(options))
    return (f"Please answer the multiple-choice question based on the image [{topic}], and select the "
            f"best option from the following options [{opts}]. Just answer the option.")


def mcq_answer(options: Sequence[str], index: int) -> str:
    """``A.Normal.`` -- letter, option text and a full stop, like the benchmark labels."""
    return f"{LETTERS[index]}.{options[index]}."


def field_label(boxes: Sequence[Box]) -> str:
    """``abnormal`` when any abnormal cell is in the field."""
    return "abnormal" if any(b.cls != "normal" for b in boxes) else "normal"


def grounding_answer(boxes: Sequence[Box], classes: Optional[Iterable[str]] = None) -> str:
    """``dark 1 is located at <region>..</region>. dark 2 is located at ...`` (reading order per class)."""
    wanted = list(classes) if classes is not None else list(ABNORMAL_CLASSES)
    parts: List[str] = []
    for cls in wanted:
        mine = sorted((b for b in boxes if b.cls == cls), key=lambda b: (b.y1, b.x1))
        parts += [f"{cls} {i} is located at {b.region()}." for i, b in enumerate(mine, 1)]
    return " ".join(parts) if parts else "No such cells are found."


def field_report(boxes: Sequence[Box]) -> str:
    """A short descriptive report of one field."""
    n = len(boxes)
    ab = [b.cls for b in boxes if b.cls != "normal"]
    if not ab:
        return (f"Smear shows {n} squamous cell{'s' if n != 1 else ''} with small round nuclei, "
                f"negative for intraepithelial lesion.")
    counts = {c: ab.count(c) for c in ABNORMAL_CLASSES if c in ab}
    what = ", ".join(f"{k} {CLASS_DESCRIPTIONS[c]}" for c, k in counts.items())
    return f"Smear shows {n} cells, including {what}; abnormal, further review is recommended."


def _conv(image: str, question: str, answer: str, rid: str) -> Dict[str, Any]:
    return {"id": rid, "messages": [{"role": "user", "content": "<image>" + question},
                                    {"role": "assistant", "content": answer}], "images": [image]}


def field_conversations(image: str, boxes: Sequence[Box], rng: np.random.Generator,
                        field_id: str) -> Dict[str, List[Dict[str, Any]]]:
    """LLaMA-Factory sharegpt rows for one field, per task (see :data:`TASKS`)."""
    rows: Dict[str, List[Dict[str, Any]]] = {t: [] for t in TASKS}
    label = field_label(boxes)
    ab_boxes = [b for b in boxes if b.cls != "normal"]
    rows["screening"].append(_conv(image, SCREENING_QUESTION,
                                   mcq_answer(SCREENING_OPTIONS, int(label == "abnormal")),
                                   f"{field_id}_screening"))
    # MCQ: 4 options (dominant abnormality), 5 (abnormal count), 3 (cellularity), 10 (cell count)
    kinds = ["Negative", "Enlarged nuclei", "Hyperchromatic nuclei", "Irregular nuclear contours"]
    present = [c for c in ABNORMAL_CLASSES if any(b.cls == c for b in ab_boxes)]
    dom = 0 if not present else 1 + ABNORMAL_CLASSES.index(
        max(present, key=lambda c: (sum(b.cls == c for b in ab_boxes), -ABNORMAL_CLASSES.index(c))))
    rows["mcq"].append(_conv(image, mcq_prompt("Nuclear Atypia of Cytology Field", kinds),
                             mcq_answer(kinds, dom), f"{field_id}_mcq_atypia"))
    cnt = ["0", "1", "2", "3", "4 or more"]
    rows["mcq"].append(_conv(image, mcq_prompt("Number of Atypical Cells", cnt),
                             mcq_answer(cnt, min(len(ab_boxes), 4)), f"{field_id}_mcq_count"))
    cel = ["Low", "Moderate", "High"]
    n = len(boxes)
    rows["mcq"].append(_conv(image, mcq_prompt("Cellularity of Cytology Field", cel),
                             mcq_answer(cel, 0 if n <= 4 else (1 if n <= 8 else 2)),
                             f"{field_id}_mcq_cellularity"))
    tot = [str(k) for k in range(3, 12)] + ["12 or more"]
    if n >= 3:
        rows["mcq"].append(_conv(image, mcq_prompt("Number of Cells in the Field", tot),
                                 mcq_answer(tot, min(n, 12) - 3), f"{field_id}_mcq_cells"))
    # grounding: every abnormal class present, plus "all abnormal cells" on abnormal fields
    for cls in present:
        rows["grounding"].append(_conv(image, f"Locate all {cls}.", grounding_answer(boxes, [cls]),
                                       f"{field_id}_ground_{cls}"))
    if ab_boxes:
        rows["grounding"].append(_conv(image, GROUND_ABNORMAL_QUESTION, grounding_answer(boxes),
                                       f"{field_id}_ground_abnormal"))
    # region description: every abnormal cell, and up to two normal cells
    normals = [b for b in boxes if b.cls == "normal"]
    pick = list(ab_boxes) + [normals[i] for i in rng.permutation(len(normals))[:2]]
    for j, b in enumerate(pick):
        rows["region"].append(_conv(image, REGION_QUESTION + b.region(), b.cls, f"{field_id}_region{j}"))
    rows["report"].append(_conv(image, REPORT_QUESTION, field_report(boxes), f"{field_id}_report"))
    return rows


# ----------------------------------------------------------------------------------------------
# fields dataset


def _write_jsonl(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def dataset_info_entry(file_name: str) -> Dict[str, Any]:
    """A sharegpt ``dataset_info.json`` entry with CytoChat's column and tag names."""
    return {"file_name": file_name, "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant"}}


def write_fields_dataset(out_dir: PathLike, n_fields: int = 200, seed: int = 0,
                         size: int = DEFAULT_FIELD_SIZE, mpp: float = DEFAULT_MPP,
                         test_fraction: float = 0.2, abnormal_probability: float = 0.5,
                         prefix: str = "cyto") -> Path:
    """Write ``n_fields`` fields and their LLaMA-Factory datasets; returns ``dataset_info.json``.

    Layout under ``out_dir``: ``images/{train,test}/<id>.png``; ``<prefix>_<task>_<split>.jsonl`` for
    each task in :data:`TASKS` plus ``<prefix>_<split>.jsonl`` (all tasks); ``dataset_info.json``
    registering each file under its stem; ``fields.jsonl`` (per field: image, split, size, mpp, label,
    boxes). Fields are split by field (a field's rows never appear in both splits).
    """
    if n_fields < 1:
        raise ValueError("n_fields must be >= 1")
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 7321])
    n_test = int(round(n_fields * test_fraction))
    if 0 < test_fraction and n_fields >= 2:
        n_test = min(max(n_test, 1), n_fields - 1)
    split_of = ["test"] * n_test + ["train"] * (n_fields - n_test)
    split_of = [split_of[i] for i in rng.permutation(n_fields)]
    rows: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    truth: List[Dict[str, Any]] = []
    for i in range(n_fields):
        frng = np.random.default_rng([seed, 11, i])
        split = split_of[i]
        fid = f"{prefix}_field_{i:05d}"
        rel = f"images/{split}/{fid}.png"
        img, boxes = make_field(frng, size, mpp=mpp, abnormal_probability=abnormal_probability,
                                seed=seed * 100003 + i)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        with atomic_path(out / rel) as tmp:
            img.save(tmp, format="PNG")
        for task, rs in field_conversations(rel, boxes, frng, fid).items():
            rows.setdefault((task, split), []).extend(rs)
        truth.append({"id": fid, "image": rel, "split": split, "size": size, "mpp": mpp,
                      "label": field_label(boxes),
                      "boxes": [{"box": b.as_list(), "cls": b.cls} for b in boxes]})
    info: Dict[str, Any] = {}
    for split in ("train", "test"):
        every: List[Dict[str, Any]] = []
        for task in TASKS:
            rs = rows.get((task, split), [])
            if not rs:
                continue
            name = f"{prefix}_{task}_{split}"
            _write_jsonl(out / f"{name}.jsonl", rs)
            info[name] = dataset_info_entry(f"{name}.jsonl")
            every.extend(rs)
        if every:
            order = np.random.default_rng([seed, 99, len(split)]).permutation(len(every))
            name = f"{prefix}_{split}"
            _write_jsonl(out / f"{name}.jsonl", [every[i] for i in order])
            info[name] = dataset_info_entry(f"{name}.jsonl")
    _write_jsonl(out / "fields.jsonl", truth)
    atomic_write_text(out / "dataset_info.json", json.dumps(info, indent=2) + "\n")
    logger.info("wrote %d fields (%d test) and %d datasets to %s", n_fields, n_test, len(info), out)
    return out / "dataset_info.json"


# ----------------------------------------------------------------------------------------------
# whole cytology slides


class CellIndex:
    """Cells bucketed on a coarse grid so a tile finds the cells it must draw quickly."""

    def __init__(self, cells: Sequence[Cell], bucket: float = 256.0) -> None:
        self.cells = list(cells)
        self.bucket = float(bucket)
        self.grid: Dict[Tuple[int, int], List[int]] = {}
        for i, c in enumerate(self.cells):
            x1, y1, x2, y2 = c.bounds()
            for bx in range(int(x1 // bucket), int(x2 // bucket) + 1):
                for by in range(int(y1 // bucket), int(y2 // bucket) + 1):
                    self.grid.setdefault((bx, by), []).append(i)

    def query(self, x1: float, y1: float, x2: float, y2: float) -> List[Cell]:
        b = self.bucket
        found = set()
        for bx in range(int(x1 // b), int(x2 // b) + 1):
            for by in range(int(y1 // b), int(y2 // b) + 1):
                found.update(self.grid.get((bx, by), ()))
        return [self.cells[i] for i in sorted(found)]


@dataclass
class CytologySlide:
    """A generated smear: its cells (level-0 px) and label."""

    name: str
    label: str
    width: int
    height: int
    base_mpp: float
    cells: List[Cell]
    seed: int


def _density_map(rng: np.random.Generator, width: int, height: int, cell: float) -> np.ndarray:
    """Smooth smear density in [0, 1] on a grid of ``cell`` level-0 px; about a third is empty glass."""
    from scipy.ndimage import gaussian_filter, zoom

    gw, gh = max(2, math.ceil(width / cell)), max(2, math.ceil(height / cell))
    coarse = rng.standard_normal((max(2, gh // 4 + 2), max(2, gw // 4 + 2)))
    f = zoom(coarse, (gh / coarse.shape[0], gw / coarse.shape[1]), order=3)[:gh, :gw]
    f = gaussian_filter(f, 1.0)
    f = (f - f.mean()) / max(f.std(), 1e-6)
    return np.clip((f + 0.45) / 1.6, 0, 1)


def make_cytology_slide(name: str, label: str, width: int = 4096, height: int = 4096,
                        base_mpp: float = DEFAULT_MPP, seed: int = 0,
                        n_abnormal: Optional[int] = None) -> CytologySlide:
    """Cells of one smear. Abnormal slides get ``n_abnormal`` (default 4-16) abnormal cells of one or
    two classes, clustered round 1-3 foci (each abnormal cell replaces a normal cell in place)."""
    if label not in ("normal", "abnormal"):
        raise ValueError(f"slide label must be 'normal' or 'abnormal', got {label!r}")
    rng = np.random.default_rng([seed, 4242])
    u = 1.0 / base_mpp
    dens = _density_map(rng, width, height, 64 * u)
    cell_px = 64 * u
    # candidate centres, accepted with the local density; non-overlap via a spatial hash
    area_um = width * height * base_mpp ** 2
    n_try = int(area_um / 1400)
    cells: List[Cell] = []
    grid: Dict[Tuple[int, int], List[int]] = {}
    gsz = 50 * u
    for _ in range(n_try):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() > dens[min(int(cy // cell_px), dens.shape[0] - 1), min(int(cx // cell_px),
                                                                              dens.shape[1] - 1)]:
            continue
        c = make_cell(rng, "normal", cx, cy, base_mpp)
        gx, gy = int(cx // gsz), int(cy // gsz)
        near = (cells[j] for ix in range(gx - 1, gx + 2) for iy in range(gy - 1, gy + 2)
                for j in grid.get((ix, iy), ()))
        if _fits(c, width, height, near):
            grid.setdefault((gx, gy), []).append(len(cells))
            cells.append(c)
    if label == "abnormal" and cells:
        k = int(rng.integers(4, 17)) if n_abnormal is None else int(n_abnormal)
        k = min(k, len(cells))
        classes = list(rng.choice(ABNORMAL_CLASSES, size=int(rng.integers(1, 3)), replace=False))
        centres = np.array([[c.cx, c.cy] for c in cells])
        foci = centres[rng.choice(len(cells), size=int(rng.integers(1, 4)), replace=False)]
        chosen: List[int] = []
        per = math.ceil(k / len(foci))
        for f in foci:
            d = np.hypot(centres[:, 0] - f[0], centres[:, 1] - f[1])
            near = [int(j) for j in np.argsort(d, kind="stable") if int(j) not in chosen]
            chosen += near[:min(per, k - len(chosen))]
        for j in chosen:
            old = cells[j]
            cls = classes[int(rng.integers(len(classes)))]
            # abnormal cells are drawn smaller than normal ones, so they fit where the normal cell was
            cells[j] = make_cell(rng, cls, old.cx, old.cy, base_mpp)
    return CytologySlide(name, label, width, height, base_mpp, cells, seed)


def field_truth(cells: Sequence[Cell], x: float, y: float, size0: float) -> Dict[str, int]:
    """Counts of cells whose centre lies in the level-0 square [x, x+size0) x [y, y+size0)."""
    inside = [c for c in cells if x <= c.cx < x + size0 and y <= c.cy < y + size0]
    out = {"n_cells": len(inside), "n_abnormal": sum(c.cls != "normal" for c in inside)}
    for cls in ABNORMAL_CLASSES:
        out[f"n_{cls}"] = sum(c.cls == cls for c in inside)
    return out


def write_cytology_slide(path: PathLike, slide: CytologySlide, tile: int = 256, quality: int = 85) -> Path:
    """Write ``slide`` as a pyramidal Aperio-style TIFF (OpenSlide vendor ``aperio``, MPP set)."""
    spec = SlideSpec(slide.name, "normal", slide.width, slide.height, slide.base_mpp, seed=slide.seed,
                     tile=tile, quality=quality, variant="cytology")
    index = CellIndex(slide.cells, bucket=256.0)

    def render(x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        cells = index.query(x0 - 1, y0 - 1, x0 + w * ds + 1, y0 + h * ds + 1)
        return render_cells(cells, x0, y0, w, h, ds, seed=slide.seed)

    return write_pyramid(path, spec, render)


def write_cytology_slides(out_dir: PathLike, n_slides: int = 8, seed: int = 0, width: int = 4096,
                          height: int = 4096, base_mpp: float = DEFAULT_MPP,
                          abnormal_fraction: float = 0.5, field_size: int = DEFAULT_FIELD_SIZE,
                          field_mpp: Optional[float] = None, prefix: str = "cyto",
                          n_abnormal: Optional[int] = None) -> Path:
    """Write ``n_slides`` smears; returns ``<out_dir>/labels.csv`` (slide,label).

    Exactly ``round(n_slides * abnormal_fraction)`` slides are abnormal (positions shuffled by seed).
    Also written: ``slides/<slide>.svs``; ``manifest.csv`` (the extraction manifest layout);
    ``truth_cells.csv`` (slide,x1,y1,x2,y2,cls in level-0 px, one row per cell); ``truth_fields.csv``
    (slide,x,y,size_level0,n_cells,n_abnormal,n_<class>...: the non-overlapping grid of
    ``field_size`` px at ``field_mpp`` (default ``base_mpp``), row-major, as ``slidechat screen`` tiles).
    """
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 1717])
    n_ab = int(round(n_slides * abnormal_fraction))
    labels = ["abnormal"] * n_ab + ["normal"] * (n_slides - n_ab)
    labels = [labels[i] for i in rng.permutation(n_slides)]
    fmpp = base_mpp if field_mpp is None else float(field_mpp)
    size0 = int(round(field_size * fmpp / base_mpp))
    manifest, label_rows, cell_rows, field_rows = [], [], [], []
    for i, lab in enumerate(labels):
        name = f"{prefix}_{i:03d}"
        sl = make_cytology_slide(name, lab, width, height, base_mpp, seed=seed * 1000 + i,
                                 n_abnormal=n_abnormal)
        path = out / "slides" / f"{name}.svs"
        write_cytology_slide(path, sl)
        manifest.append({"slide": name, "path": str(path), "label": lab, "mpp": f"{base_mpp:g}",
                         "magnification": f"{10.0 / base_mpp:g}", "width": str(width),
                         "height": str(height), "mask_path": "", "variant": "cytology"})
        label_rows.append({"slide": name, "label": lab})
        for c in sl.cells:
            b = c.box(width, height)
            cell_rows.append({"slide": name, "x1": f"{b.x1:.2f}", "y1": f"{b.y1:.2f}",
                              "x2": f"{b.x2:.2f}", "y2": f"{b.y2:.2f}", "cls": c.cls})
        for y in range(0, height - size0 + 1, size0):
            for x in range(0, width - size0 + 1, size0):
                field_rows.append({"slide": name, "x": x, "y": y, "size_level0": size0,
                                   **field_truth(sl.cells, x, y, size0)})
        logger.info("wrote %s (%s, %d cells, %d abnormal)", name, lab, len(sl.cells),
                    sum(c.cls != "normal" for c in sl.cells))
    write_manifest(out / "manifest.csv", manifest)

    def write_csv(path: Path, rows: List[Dict[str, Any]], cols: Sequence[str]) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(cols))
                w.writeheader()
                w.writerows(rows)

    write_csv(out / "truth_cells.csv", cell_rows, ["slide", "x1", "y1", "x2", "y2", "cls"])
    write_csv(out / "truth_fields.csv", field_rows,
              ["slide", "x", "y", "size_level0", "n_cells", "n_abnormal"]
              + [f"n_{c}" for c in ABNORMAL_CLASSES])
    write_csv(out / "labels.csv", label_rows, ["slide", "label"])
    return out / "labels.csv"
