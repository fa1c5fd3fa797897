"""Synthetic cytology: boxes on the drawn cells, classes separable by simple statistics, valid
LLaMA-Factory rows in CytoChat's prompt shapes, and slides OpenSlide opens with consistent truth."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from slidechat.data import synthetic_cytology as sc

GLASS = np.array(sc.GLASS_RGB)


def _foreground(img: np.ndarray, tol: float = 14.0) -> np.ndarray:
    """Pixels that differ from the glass colour by more than the grain."""
    return np.abs(img.astype(np.float32) - GLASS).max(axis=2) > tol


def test_boxes_lie_on_the_drawn_cells() -> None:
    rng = np.random.default_rng(3)
    for k in range(4):
        img, boxes = sc.make_field(rng, 256, abnormal_classes=["dark", "enlarged", "irregular"][: k],
                                   mpp=1.0)
        arr = np.asarray(img)
        assert arr.shape == (256, 256, 3) and arr.dtype == np.uint8
        assert sum(b.cls != "normal" for b in boxes) == k
        fg = _foreground(arr)
        covered = np.zeros_like(fg)
        for b in boxes:
            assert 0 <= b.x1 < b.x2 <= 256 and 0 <= b.y1 < b.y2 <= 256
            x1, y1 = int(math.floor(b.x1)), int(math.floor(b.y1))
            x2, y2 = int(math.ceil(b.x2)), int(math.ceil(b.y2))
            covered[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = True
            inner = fg[y1:y2, x1:x2]
            assert inner.mean() > 0.4, b  # the box is mostly cell
            # tight: each 3-px strip along an unclipped edge touches the cell
            if b.x1 > 0:
                assert fg[y1:y2, x1:x1 + 3].any(), b
            if b.x2 < 256:
                assert fg[y1:y2, x2 - 3:x2].any(), b
            if b.y1 > 0:
                assert fg[y1:y1 + 3, x1:x2].any(), b
            if b.y2 < 256:
                assert fg[y2 - 3:y2, x1:x2].any(), b
        # nothing is drawn outside the boxes
        assert not (fg & ~covered).any()


def _nucleus_stats(arr: np.ndarray, b: sc.Box, mpp: float) -> Dict[str, float]:
    """Area (µm²), mean grey level and solidity of the largest dark blob in the box."""
    import cv2

    x1, y1, x2, y2 = int(b.x1), int(b.y1), int(math.ceil(b.x2)), int(math.ceil(b.y2))
    crop = arr[y1:y2, x1:x2].astype(np.float32)
    grey = crop.mean(axis=2)
    mask = (grey < 140).astype(np.uint8)
    n, lab, st, _ = cv2.connectedComponentsWithStats(mask, 8)
    assert n >= 2, f"no nucleus in {b}"
    big = 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))
    m = (lab == big).astype(np.uint8)
    cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(max(cnts, key=cv2.contourArea))
    area = float(m.sum())
    return {"area_um2": area * mpp * mpp, "grey": float(grey[m > 0].mean()),
            "solidity": area / max(float(cv2.contourArea(hull)) + len(hull) / 2.0, 1.0)}


def test_classes_are_distinguishable_by_simple_statistics() -> None:
    rng = np.random.default_rng(11)
    mpp = 0.5
    right, total = 0, 0
    per: Dict[str, List[str]] = {}
    for k in range(12):
        cls = sc.ABNORMAL_CLASSES[k % 3]
        img, boxes = sc.make_field(rng, 512, abnormal_classes=[cls] * 3, n_normal=4, mpp=mpp)
        arr = np.asarray(img)
        for b in boxes:
            s = _nucleus_stats(arr, b, mpp)
            if s["grey"] < 70:
                guess = "dark"
            elif s["area_um2"] > math.pi * 6.5 ** 2:
                guess = "enlarged"
            elif s["solidity"] < 0.9:
                guess = "irregular"
            else:
                guess = "normal"
            per.setdefault(b.cls, []).append(guess)
            right += guess == b.cls
            total += 1
    assert set(per) == set(sc.CELL_CLASSES)
    assert right / total >= 0.95, {c: sorted(g) for c, g in per.items()}


def test_fields_are_deterministic_by_seed() -> None:
    a = sc.make_field(np.random.default_rng(5), 128, mpp=2.0, seed=1)
    b = sc.make_field(np.random.default_rng(5), 128, mpp=2.0, seed=1)
    c = sc.make_field(np.random.default_rng(6), 128, mpp=2.0, seed=1)
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a[1] != c[1]


MCQ_RE = re.compile(r"^Please answer the multiple-choice question based on the image \[([^\]]+)\], and "
                    r"select the best option from the following options \[(.+)\]\. Just answer the "
                    r"option\.$")
GROUND_RE = re.compile(r"(\w+) (\d+) is located at <region>([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)</region>\.")


@pytest.fixture(scope="module")
def fields_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cyto_fields")
    sc.write_fields_dataset(out, n_fields=16, seed=2, size=256, mpp=1.0, test_fraction=0.25)
    return out


def test_dataset_rows_are_valid_llamafactory(fields_dataset: Path) -> None:
    from slidechat.data.llamafactory import read_llamafactory

    info = json.loads((fields_dataset / "dataset_info.json").read_text())
    for task in sc.TASKS:
        assert f"cyto_{task}_train" in info
    assert "cyto_train" in info and "cyto_test" in info
    truth = {json.loads(ln)["image"]: json.loads(ln)
             for ln in (fields_dataset / "fields.jsonl").read_text().splitlines()}
    assert len(truth) == 16
    assert sum(t["split"] == "test" for t in truth.values()) == 4
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt"
        rows = read_llamafactory(name, fields_dataset)
        n_lines = len((fields_dataset / entry["file_name"]).read_text().splitlines())
        assert len(rows) == n_lines > 0
        split = name.rsplit("_", 1)[1]
        for ex in rows:
            assert len(ex.images) == 1 and ex.images[0].is_file()
            rel = ex.images[0].relative_to(fields_dataset).as_posix()
            assert truth[rel]["split"] == split
            assert [m["role"] for m in ex.messages] == ["user", "assistant"]
            assert ex.messages[0]["content"].startswith("<image>")
    # all-task files hold exactly the per-task rows
    for split in ("train", "test"):
        ids = {ex.id for ex in read_llamafactory(f"cyto_{split}", fields_dataset)}
        per_task = {ex.id for t in sc.TASKS if f"cyto_{t}_{split}" in info
                    for ex in read_llamafactory(f"cyto_{t}_{split}", fields_dataset)}
        assert ids == per_task


def _rows(path: Path) -> List[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_answers_follow_the_truth_in_cytochat_shapes(fields_dataset: Path) -> None:
    truth = {t["image"]: t for t in _rows(fields_dataset / "fields.jsonl")}
    n_opts = set()
    for split in ("train", "test"):
        for r in _rows(fields_dataset / f"cyto_mcq_{split}.jsonl") + \
                _rows(fields_dataset / f"cyto_screening_{split}.jsonl"):
            q, a = r["messages"][0]["content"][len("<image>"):], r["messages"][1]["content"]
            m = MCQ_RE.match(q)
            assert m, q
            opts = m.group(2).split(", ")
            assert 2 <= len(opts) <= 10
            n_opts.add(len(opts))
            assert [o[:2] for o in opts] == [f"{sc.LETTERS[i]}." for i in range(len(opts))]
            assert a.endswith(".") and a[:-1] in opts, (a, opts)
            t = truth[r["images"][0]]
            n_ab = sum(b["cls"] != "normal" for b in t["boxes"])
            if "Screening" in m.group(1):
                assert a == ("B.Abnormal." if t["label"] == "abnormal" else "A.Normal.")
                assert (t["label"] == "abnormal") == (n_ab > 0)
            if m.group(1) == "Number of Atypical Cells":
                assert a == f"{sc.LETTERS[min(n_ab, 4)]}.{['0', '1', '2', '3', '4 or more'][min(n_ab, 4)]}."
        for r in _rows(fields_dataset / f"cyto_grounding_{split}.jsonl"):
            q, a = r["messages"][0]["content"], r["messages"][1]["content"]
            t = truth[r["images"][0]]
            want = [b for b in t["boxes"] if b["cls"] != "normal"]
            if q != "<image>" + sc.GROUND_ABNORMAL_QUESTION:
                cls = re.fullmatch(r"<image>Locate all (\w+)\.", q).group(1)
                want = [b for b in want if b["cls"] == cls]
            got = GROUND_RE.findall(a)
            assert len(got) == len(want) > 0
            assert sorted((g[0], [float(v) for v in g[2:]]) for g in got) == \
                sorted((b["cls"], b["box"]) for b in want)
        for r in _rows(fields_dataset / f"cyto_region_{split}.jsonl"):
            q, a = r["messages"][0]["content"], r["messages"][1]["content"]
            m = re.fullmatch(r"<image>Give a brief description of region\.<region>([\d. ]+)</region>", q)
            box = [float(v) for v in m.group(1).split()]
            match = [b for b in truth[r["images"][0]]["boxes"] if b["box"] == box]
            assert len(match) == 1 and match[0]["cls"] == a
    assert {2, 3, 4, 5, 10} <= n_opts


def test_fields_dataset_is_deterministic(tmp_path: Path, fields_dataset: Path) -> None:
    sc.write_fields_dataset(tmp_path, n_fields=16, seed=2, size=256, mpp=1.0, test_fraction=0.25)
    for name in ("fields.jsonl", "cyto_train.jsonl", "dataset_info.json"):
        assert (tmp_path / name).read_bytes() == (fields_dataset / name).read_bytes()
    img = sorted((fields_dataset / "images" / "train").glob("*.png"))[0]
    assert (tmp_path / "images" / "train" / img.name).read_bytes() == img.read_bytes()


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cyto_slides")
    sc.write_cytology_slides(out, n_slides=4, seed=1, width=1536, height=1280, base_mpp=0.5,
                             field_size=256)
    return out


def _csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_slides_open_with_openslide(slides_dir: Path) -> None:
    import openslide

    labels = _csv(slides_dir / "labels.csv")
    assert len(labels) == 4
    for row in labels:
        s = openslide.OpenSlide(str(slides_dir / "slides" / f"{row['slide']}.svs"))
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert s.dimensions == (1536, 1280)
        assert s.level_count >= 1
        s.close()


def test_slide_labels_match_the_truth(slides_dir: Path) -> None:
    import openslide

    labels = {r["slide"]: r["label"] for r in _csv(slides_dir / "labels.csv")}
    assert sorted(labels.values()) == ["abnormal", "abnormal", "normal", "normal"]
    cells = _csv(slides_dir / "truth_cells.csv")
    fields = _csv(slides_dir / "truth_fields.csv")
    for slide, lab in labels.items():
        mine = [c for c in cells if c["slide"] == slide]
        n_ab = sum(c["cls"] != "normal" for c in mine)
        assert (n_ab > 0) == (lab == "abnormal"), slide
        f = [r for r in fields if r["slide"] == slide]
        assert len(f) == (1536 // 256) * (1280 // 256)
        assert sum(int(r["n_abnormal"]) for r in f) == n_ab  # every cell centre lies in one field
        assert sum(int(r["n_cells"]) for r in f) <= len(mine)
        s = openslide.OpenSlide(str(slides_dir / "slides" / f"{slide}.svs"))
        # the pixels agree with the truth: boxed cells are drawn, empty fields are glass
        for c in mine[:20]:
            x1, y1 = int(float(c["x1"])), int(float(c["y1"]))
            w, h = int(float(c["x2"])) - x1, int(float(c["y2"])) - y1
            reg = np.asarray(s.read_region((x1, y1), 0, (max(w, 1), max(h, 1))).convert("RGB"))
            assert _foreground(reg, 20).mean() > 0.3, c
        for r in f:
            if int(r["n_cells"]) == 0:
                reg = np.asarray(s.read_region((int(r["x"]), int(r["y"])), 0, (256, 256)).convert("RGB"))
                assert _foreground(reg, 20).mean() < 0.2
        s.close()


def test_slides_are_deterministic(tmp_path: Path, slides_dir: Path) -> None:
    sc.write_cytology_slides(tmp_path, n_slides=4, seed=1, width=1536, height=1280, base_mpp=0.5,
                             field_size=256)
    for name in ("labels.csv", "truth_cells.csv", "truth_fields.csv"):
        assert (tmp_path / name).read_bytes() == (slides_dir / name).read_bytes()
