"""Slide-level cytology screening: aggregators, AUC/CI/Youden against independent computations, the
cellular-content detector, option probabilities vs a manual softmax on the tiny Qwen2-VL, resume,
failures and model-free re-aggregation."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from slidechat.evaluation import screening as ev
from slidechat.utils.errors import SlideChatError
from tolerances import FP32_EPS


# ----------------------------------------------------------------------------------------------
# aggregators and metrics (no model)


def test_aggregators_on_hand_made_scores() -> None:
    s = [0.1, 0.9, 0.4, 0.7, 0.2, 0.95, 0.05]
    assert ev.aggregate(s, "max") == pytest.approx(0.95)
    assert ev.aggregate(s, "topk_mean", k=3) == pytest.approx((0.95 + 0.9 + 0.7) / 3)
    assert ev.aggregate(s, "topk_mean", k=50) == pytest.approx(sum(s) / len(s))  # fewer fields than k
    assert ev.aggregate(s, "fraction_above", threshold=0.5) == pytest.approx(3 / 7)
    assert ev.aggregate(s, "fraction_above", threshold=0.95) == pytest.approx(1 / 7)  # >= counts
    assert ev.aggregate(s, "count_grounded", grounded_counts=[2, None, 0, 3, None, None, None]) == 5
    with pytest.raises(SlideChatError, match="ground"):
        ev.aggregate(s, "count_grounded")
    with pytest.raises(SlideChatError, match="no field of this slide was grounded"):
        ev.aggregate(s, "count_grounded", grounded_counts=[None] * 7)
    with pytest.raises(SlideChatError, match="unknown aggregator"):
        ev.aggregate(s, "median")
    with pytest.raises(SlideChatError):
        ev.aggregate([], "max")
    with pytest.raises(SlideChatError, match="NaN"):
        ev.aggregate([0.1, float("nan")], "max")


def _auc_by_pairs(y: List[int], s: List[float]) -> float:
    """Mann-Whitney definition: P(score of a positive > score of a negative) + 1/2 P(tie)."""
    pos = [v for v, t in zip(s, y) if t == 1]
    neg = [v for v, t in zip(s, y) if t == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_the_mann_whitney_definition() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(4, 40))
        y = [int(v) for v in rng.integers(0, 2, n)]
        y[0], y[1] = 0, 1
        s = [float(v) for v in np.round(rng.random(n) + 0.3 * np.array(y), 1)]  # rounding makes ties
        assert ev.roc_auc(y, s) == pytest.approx(_auc_by_pairs(y, s), abs=1e-12)
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert ev.roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert ev.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(SlideChatError, match="both classes"):
        ev.roc_auc([1, 1], [0.2, 0.3])


def test_bootstrap_ci_against_an_independent_bootstrap() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0] * 30 + [1] * 20)
    s = rng.normal(0, 1, 50) + 1.0 * y
    lo, hi = ev.bootstrap_auc_ci(y, s, n_boot=3000, seed=3)
    auc = _auc_by_pairs(list(y), list(s))
    assert 0 <= lo < auc < hi <= 1
    # independent stratified bootstrap with another generator and the pairwise AUC
    r2 = np.random.default_rng(12345)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = []
    for _ in range(1500):
        idx = np.concatenate([r2.choice(pos, len(pos)), r2.choice(neg, len(neg))])
        boots.append(_auc_by_pairs(list(y[idx]), list(s[idx])))
    lo2, hi2 = np.quantile(boots, [0.025, 0.975])
    assert lo == pytest.approx(lo2, abs=0.035) and hi == pytest.approx(hi2, abs=0.035)
    # perfectly separated classes: every resample is perfect
    assert ev.bootstrap_auc_ci([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9], n_boot=200) == (1.0, 1.0)


def test_youden_threshold_and_operating_point() -> None:
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.35, 0.6, 0.4, 0.5, 0.7, 0.8, 0.9]
    # brute force over every candidate threshold, written independently
    best = max(sorted(set(s), reverse=True),
               key=lambda t: (sum(v >= t and c == 1 for v, c in zip(s, y)) / 5
                              + sum(v < t and c == 0 for v, c in zip(s, y)) / 4))
    thr = ev.youden_threshold(y, s)
    assert thr == best == 0.4
    sens, spec = ev.sensitivity_specificity(y, s, thr)
    assert (sens, spec) == (1.0, 0.75)
    m = ev.evaluate_slides(y, s, n_boot=100)
    assert m.threshold == 0.4 and m.threshold_source == "youden"
    assert m.auc == pytest.approx(_auc_by_pairs(y, s))
    m2 = ev.evaluate_slides(y, s, threshold=0.65, n_boot=100)
    assert (m2.sensitivity, m2.specificity, m2.threshold_source) == (0.6, 1.0, "given")
    fpr, tpr, _ = ev.roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(_auc_by_pairs(y, s))  # area under the curve = AUC


def test_labels_csv_errors_name_the_row(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("slide,label\na,normal\nb,maybe\n")
    with pytest.raises(SlideChatError, match=r"row 3.*maybe"):
        ev.read_labels_csv(p)
    p.write_text("slide,label\na,normal\na,abnormal\n")
    with pytest.raises(SlideChatError, match="twice"):
        ev.read_labels_csv(p)
    p.write_text("name,label\na,normal\n")
    with pytest.raises(SlideChatError, match="slide,label"):
        ev.read_labels_csv(p)
    p.write_text("slide,label\na,Normal\nb,ABNORMAL\nc,1\n")
    assert ev.read_labels_csv(p) == {"a": 0, "b": 1, "c": 1}


def test_save_figure_is_atomic_and_closes_the_figure(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slidechat.utils.atomic import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    out = save_figure(fig, tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    fig, _ = plt.subplots()
    with pytest.raises(ValueError):  # a failed save leaves neither a partial file nor an open figure
        save_figure(fig, tmp_path / "g.png", format="no-such-format")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"] and not plt.fignum_exists(fig.number)


# ----------------------------------------------------------------------------------------------
# slides, detector, model


@pytest.fixture(scope="module")
def cyto(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    from slidechat.data import synthetic_cytology as sc

    root = tmp_path_factory.mktemp("screen")
    sc.write_cytology_slides(root / "set", n_slides=4, seed=3, width=1024, height=1024, base_mpp=0.5,
                             field_size=256, field_mpp=1.0, n_abnormal=10)
    blank = sc.CytologySlide("cyto_blank", "normal", 1024, 1024, 0.5, [], 9)
    sc.write_cytology_slide(root / "bad" / "cyto_blank.svs", blank)
    (root / "bad" / "cyto_corrupt.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    return {"root": root, "slides": root / "set" / "slides", "labels": root / "set" / "labels.csv",
            "truth": root / "set" / "truth_fields.csv", "blank": root / "bad" / "cyto_blank.svs",
            "corrupt": root / "bad" / "cyto_corrupt.svs"}


def _read_csv(p: Path) -> List[Dict[str, str]]:
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cellular_detector_keeps_cell_rich_fields_and_drops_blank_ones(cyto: Dict[str, Path]) -> None:
    from slidechat.data.synthetic_cytology import write_cytology_slides
    from slidechat.apps.screening import ScreenOptions
    from slidechat.wsi.cellularity import plan_fields
    from slidechat.wsi.patching import plan_patches
    from slidechat.wsi.slide import Slide, resolve_resolution
    from slidechat.wsi.tissue import segment_tissue

    out = cyto["root"] / "detector"
    write_cytology_slides(out, n_slides=2, seed=5, width=2048, height=2048, field_size=256)
    truth = _read_csv(out / "truth_fields.csv")
    opts = ScreenOptions(field_size=256, target_mpp=0.5)
    n_rich = n_blank = 0
    seg_kept_rich = 0
    for name in ("cyto_000", "cyto_001"):
        with Slide(out / "slides" / f"{name}.svs") as s:
            plan = plan_fields(s, opts)
            kept = {(int(x), int(y)) for x, y in plan.grid.coords}
            assert plan.n_candidates == 64
            # the histology segmentation keeps a patch only when >= 50 % of it is tissue
            try:
                grid = plan_patches(s, segment_tissue(s), resolve_resolution(s), None, 0.5, 256)
                seg = {(int(x), int(y)) for x, y in grid.coords}
            except SlideChatError:
                seg = set()
        for r in truth:
            if r["slide"] != name:
                continue
            xy = (int(r["x"]), int(r["y"]))
            if int(r["n_cells"]) >= 3:
                n_rich += 1
                assert xy in kept, r
                seg_kept_rich += xy in seg
            elif int(r["n_cells"]) == 0:
                # no cell centre inside: blank unless a neighbour's cytoplasm reaches in
                n_blank += 1
        blank_kept = sum(1 for r in truth if r["slide"] == name and int(r["n_cells"]) == 0
                         and (int(r["x"]), int(r["y"])) in kept)
        blank_all = sum(1 for r in truth if r["slide"] == name and int(r["n_cells"]) == 0)
        assert blank_kept <= 0.35 * blank_all, (blank_kept, blank_all)
    assert n_rich >= 20 and n_blank >= 10
    # why not histology segmentation: it loses many of the cell-rich fields of a smear
    print("cell-rich fields kept: detector", n_rich, "of", n_rich, "; histology segmentation", seg_kept_rich)
    assert seg_kept_rich <= 0.8 * n_rich, (seg_kept_rich, n_rich)
    # an empty slide has no cellular field: a named error
    with Slide(cyto["blank"]) as s, pytest.raises(SlideChatError, match="no field with cellular content"):
        plan_fields(s, opts)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory):
    from slidechat.apps.screening import ScreenOptions
    from slidechat.inference.field_scorer import FieldModel
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    folder = make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl") / "model", seed=0)
    opts = ScreenOptions(field_size=256, target_mpp=1.0, batch_size=3, progress=False, n_boot=200,
                         ground_top=1, max_new_tokens=12, gallery_k=3)
    return FieldModel(folder, opts=opts)


def test_option_probabilities_equal_a_manual_softmax(scorer) -> None:
    import torch
    from PIL import Image

    from slidechat.data.synthetic_cytology import make_field

    rng = np.random.default_rng(0)
    images = [make_field(rng, 256, mpp=1.0)[0] for _ in range(3)] + \
        [Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))]
    probs, mass = scorer.option_probs(images)
    tok = scorer.processor.tokenizer
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    assert scorer.option_ids == [a, b]
    # manual: the stock forward (fresh M-RoPE deltas), one image at a time, last-position logits
    from slidechat.data.qwen2vl_batch import prepare_generation_batch

    for i, im in enumerate(images):
        batch = prepare_generation_batch(scorer.processor, [scorer.prompt_text], [[im]])
        scorer.model.rope_deltas = None
        with torch.inference_mode():
            logits = scorer.model(**batch, use_cache=False).logits[0, -1].double()
        want = torch.softmax(logits[[a, b]], 0).numpy()
        # batched (padded) vs alone: float noise on the logits, each reduction (K <= 64 in the tiny model) within
        # K * eps of max|logit|, two layers. A probability moves by at most max|logit change| and the option mass by
        # twice that relative to itself. Observed: 1e-7 on the probabilities; the four images' probabilities
        # differ by >= 3e-4, so mixed-up rows or a wrong last position still fail.
        noise = 2 * 64 * FP32_EPS * float(logits.abs().max())
        assert probs[i] == pytest.approx(want, abs=noise)
        assert mass[i] == pytest.approx(float(torch.softmax(logits, 0)[[a, b]].sum()), rel=2 * noise)
    assert np.allclose(probs.sum(1), 1.0)  # two probabilities: 1 to within a few eps
    assert np.array_equal(scorer.abnormal_score(probs), probs[:, 1])  # a sum over one column is exact


def test_screen_resume_failures_and_reaggregation(cyto: Dict[str, Path], scorer, tmp_path: Path) -> None:
    from slidechat.cli.main import main
    from slidechat.apps.screening import reaggregate, screen_slides

    slides = sorted(cyto["slides"].glob("*.svs"))
    inputs = slides + [cyto["corrupt"], cyto["blank"]]
    out = tmp_path / "screen"
    s1 = screen_slides(inputs, out, labels=cyto["labels"], opts=scorer.opts, scorer=scorer)
    assert sorted(s1["done"]) == sorted(p.stem for p in slides)
    fails = _read_csv(out / "failures.csv")
    assert [f["slide"] for f in fails] == ["cyto_corrupt", "cyto_blank"]
    assert all(f["reason"] for f in fails) and "cellular content" in fails[1]["reason"]
    assert list(fails[0]) == ["slide", "path", "stage", "reason"]
    for p in slides:
        rows = _read_csv(out / "fields" / f"{p.stem}.csv")
        assert rows and all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
        assert all(r["score"] == r["p_B"] for r in rows)  # the same float (B alone is abnormal), the same %.6f
        assert sum(r["n_grounded"] != "" for r in rows) == 1  # ground_top=1
        for name in ("heatmaps", "galleries"):
            assert (out / name / f"{p.stem}.png").stat().st_size > 1000
        assert "Screening report" in (out / "reports" / f"{p.stem}.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_slides"] == 4 and metrics["n_abnormal"] == 2
    assert (out / "roc.png").is_file()
    table = _read_csv(out / "slides.csv")
    assert [r["rank"] for r in table] == ["1", "2", "3", "4"]

    # resume: only the slide whose table is gone is redone; the others are not touched
    victim, kept = out / "fields" / f"{slides[0].stem}.csv", out / "fields" / f"{slides[1].stem}.csv"
    before = kept.read_bytes()
    victim.unlink()
    (out / "fields" / f".{slides[0].stem}.csv.x.partial").write_text("half")
    s2 = screen_slides(slides, out, opts=scorer.opts, scorer=scorer)
    assert s2["done"] == [slides[0].stem] and sorted(s2["skipped"]) == sorted(p.stem for p in slides[1:])
    assert kept.read_bytes() == before and victim.is_file()
    assert not list((out / "fields").glob(".*.partial"))

    # re-aggregation needs no model: every aggregator from the saved tables, checked by hand
    tables = {p.stem: _read_csv(out / "fields" / f"{p.stem}.csv") for p in slides}
    for method in ("max", "topk_mean", "fraction_above"):
        opts = type(scorer.opts)(aggregator=method, top_k=2, field_threshold=0.3, n_boot=100)
        res = reaggregate(out, labels=cyto["labels"], opts=opts)
        for sid, rows in tables.items():
            sc = sorted((float(r["score"]) for r in rows), reverse=True)
            want = {"max": sc[0], "topk_mean": float(np.mean(sc[:2])),
                    "fraction_above": sum(v >= 0.3 for v in sc) / len(sc)}[method]
            assert res["scores"][sid] == pytest.approx(want)
    res = reaggregate(out, opts=type(scorer.opts)(aggregator="count_grounded"))
    for sid, rows in tables.items():
        assert res["scores"][sid] == sum(int(r["n_grounded"]) for r in rows if r["n_grounded"] != "")
    assert main(["screen", "--reaggregate", str(out), "--aggregator", "max", "--labels",
                 str(cyto["labels"]), "--n-boot", "50", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["aggregator"] == "max"
    # a screened slide missing from the labels is an error naming the labels file
    partial = tmp_path / "partial_labels.csv"
    partial.write_text("slide,label\n" + f"{slides[0].stem},normal\n")
    with pytest.raises(SlideChatError, match="no label"):
        reaggregate(out, labels=partial)


def test_sharding_splits_slides(cyto: Dict[str, Path], scorer, tmp_path: Path) -> None:
    from slidechat.apps.screening import screen_slides

    slides = sorted(cyto["slides"].glob("*.svs"))
    opts = type(scorer.opts)(**{**scorer.opts.__dict__, "ground_top": 0, "gallery_k": 1})
    done = []
    for rank in (0, 1):
        s = screen_slides(slides, tmp_path, opts=opts, scorer=scorer, rank=rank, world_size=2)
        assert (tmp_path / f"failures_rank{rank}.csv").is_file()
        assert "metrics" not in s
        done += s["done"]
    assert sorted(done) == sorted(p.stem for p in slides)
