"""Cytology scorers on hand-written cases: regions, grounding, referring expressions, MCQ, reports, inputs.

Every expected number here is worked out by hand in the comments (or by an independent brute force),
not read back from the scorer.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

from slidechat.cli.main import main
from slidechat.data.answers import parse_choice
from slidechat.evaluation.cytology import score_file
from slidechat.evaluation.cytology_io import detect_task, read_predictions, select_task, user_question
from slidechat.evaluation.grounding import GroundingItem, match_boxes, score_grounding
from slidechat.evaluation.mcq import label_letter, options_from_prompt
from slidechat.evaluation.referring import ReferringItem, canonical_class, read_class, score_referring
from slidechat.evaluation.regions import Region, iou, iou_matrix, parse_regions
from slidechat.utils.errors import SlideChatError

EX = Path(__file__).resolve().parents[1] / "dataset" / "cytology_eval"
SYS = "system\nYou are a helpful assistant.\nuser\n{}\nassistant\n"


def R(x1, y1, x2, y2, label=None):
    return Region(label, float(x1), float(y1), float(x2), float(y2))


# --------------------------------------------------------------------------- regions

def test_regions_cytochat_tolerant_forms():
    text = ("HSIL 1 is located at <region>10 20 30 40</region>. "
            "hsil 2 is located at <region> 50,60 ,  70 ,80 </region>. "          # commas, spaces
            "lsil 3 is located at <region>300 200 100 50</region>. "             # swapped corners
            "hsil 4 is located at <region>1 2 3 4. hsil 5 is located at "        # missing closing tag
            "<region>(5, 6), (7, 8)</region "                                    # bracketed, cut tag
            )
    p = parse_regions(text)
    assert p.malformed == []
    assert [b.label for b in p.boxes] == ["hsil", "hsil", "lsil", "hsil", "hsil"]
    assert [b.box for b in p.boxes] == [(10, 20, 30, 40), (50, 60, 70, 80), (100, 50, 300, 200),
                                        (1, 2, 3, 4), (5, 6, 7, 8)]


@pytest.mark.parametrize("text,reason", [
    ("hsil 1 is located at <region>242.72 309.31 264.07 348.0", "cut off"),   # may be 348.04: no guess
    ("scc 4 is located at <region>231.77 294.48 and 285.18 389.89</region>.", "unexpected text"),
    ("hsil 1 is located at <region>1 2 3</region>.", "3 number(s)"),
    ("hsil 1 is located at <region>1 2 3 4 5 6</region>.", "6 number(s)"),
])
def test_regions_malformed_are_listed_not_guessed(text, reason):
    p = parse_regions(text)
    assert p.boxes == [] and len(p.malformed) == 1 and reason in p.malformed[0]


def test_regions_labels_only_from_cytochat_phrases():
    assert parse_regions("Give a brief description of region.<region>1 2 3 4</region>").boxes[0].label is None
    assert parse_regions("ASC-US 2: <region>1 2 3 4</region>").boxes[0].label == "asc-us"
    assert parse_regions("agc <region>1 2 3 4</region>").boxes[0].label == "agc"
    assert parse_regions("Answer: <region>1 2 3 4</region>").boxes[0].label is None
    prose = "There are two suspicious cells here <region>1 2 3 4</region>"
    assert parse_regions(prose).boxes[0].label is None
    # the label of a malformed region does not leak onto the next box
    p = parse_regions("hsil 1 is located at <region>1 2</region>. and <region>5 6 7 8</region>")
    assert p.boxes == [R(5, 6, 7, 8)] and len(p.malformed) == 1


def test_regions_qwen2vl_native_boxes_scaled_to_pixels():
    text = ("<|object_ref_start|>HSIL<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
            "<|box_start|>(500,500),(0,1000)<|box_end|> and also <|box_start|>(0,0),(10,10)<|box_end|>")
    p = parse_regions(text, image_size=(512, 256))
    # 0-1000 scale: x * 512 / 1000, y * 256 / 1000; corners ordered
    assert p.boxes[0] == Region("hsil", 51.2, 51.2, 153.6, 102.4)
    assert p.boxes[1] == Region("hsil", 0.0, 128.0, 256.0, 256.0)
    assert p.boxes[2].label is None  # after other words: not the object_ref's box
    with pytest.raises(SlideChatError, match="image size is unknown"):
        parse_regions(text)


def test_regions_qwen_markers_lost_are_reported():
    p = parse_regions("hsil(100,200),(300,400)", image_size=(512, 512))
    assert p.boxes == [] and "special tokens" in p.malformed[0]


def test_iou_by_hand():
    assert iou(R(0, 0, 10, 10), R(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(R(0, 0, 10, 10), R(20, 20, 30, 30)) == 0.0
    assert iou(R(1, 1, 1, 5), R(1, 1, 1, 5)) == 0.0  # empty union
    m = iou_matrix([R(0, 0, 10, 10), R(0, 0, 5, 5)], [R(0, 0, 10, 10), R(5, 0, 15, 10)])
    assert m == pytest.approx(np.array([[1.0, 1 / 3], [0.25, 0.0]]))


# --------------------------------------------------------------------------- grounding

def _strip(lo, hi, label="hsil"):
    return R(lo, 0, hi, 10, label)  # same y extent: IoU = interval IoU of x


def _greedy(pred, truth, t):
    m = iou_matrix(pred, truth)
    used_p, used_t, n = set(), set(), 0
    for i, j in sorted(np.ndindex(*m.shape), key=lambda ij: -m[ij]):
        if i not in used_p and j not in used_t and m[i, j] >= t:
            used_p.add(i)
            used_t.add(j)
            n += 1
    return n


def test_hungarian_finds_more_matches_than_greedy():
    T1, T2 = _strip(0, 10), _strip(3, 13)
    P1, P2 = _strip(1, 11), _strip(-3, 7)
    # IoU(P1,T1) = 9/11 = .818 (the best pair), IoU(P1,T2) = 8/12 = .667, IoU(P2,T1) = 7/13 = .538,
    # IoU(P2,T2) = 4/16 = .25. Greedy takes P1-T1 and is left with P2-T2 < .5: 1 match.
    # Total-IoU matching takes P1-T2 + P2-T1 = 1.205 > .818 + .25: 2 matches.
    assert _greedy([P1, P2], [T1, T2], 0.5) == 1
    matches = match_boxes([P1, P2], [T1, T2], 0.5)
    assert [(i, j) for i, j, _ in matches] == [(0, 1), (1, 0)]
    assert [v for _, _, v in matches] == pytest.approx([8 / 12, 7 / 13])


def test_below_threshold_pairs_cannot_block_a_valid_match():
    T1, T2 = _strip(0, 10), _strip(-10, 0)
    P1, P2 = _strip(-3, 7), _strip(3, 15)
    # IoU(P1,T1) = 7/13 = .538 (valid), IoU(P1,T2) = 3/17 = .176, IoU(P2,T1) = 7/15 = .467, IoU(P2,T2)=0.
    # On raw IoU the assignment prefers P1-T2 + P2-T1 = .643 > .538, i.e. zero valid matches.
    raw = iou_matrix([P1, P2], [T1, T2])
    r, c = linear_sum_assignment(raw, maximize=True)
    assert sum(raw[i, j] >= 0.5 for i, j in zip(r, c)) == 0
    assert [(i, j) for i, j, _ in match_boxes([P1, P2], [T1, T2], 0.5)] == [(0, 0)]


def _brute_best_total(m, t):
    """Max total IoU over one-to-one pairings using only pairs with IoU >= t (exhaustive search)."""
    best = 0.0

    def go(i, used, total):
        nonlocal best
        if i == m.shape[0]:
            best = max(best, total)
            return
        go(i + 1, used, total)  # pred i unmatched
        for j in range(m.shape[1]):
            if j not in used and m[i, j] >= t:
                go(i + 1, used | {j}, total + m[i, j])

    go(0, frozenset(), 0.0)
    return best


def test_matching_equals_exhaustive_search_on_random_crowds():
    rng = np.random.default_rng(0)
    for _ in range(60):
        def crowd(n):
            xy = rng.uniform(0, 40, size=(n, 2))
            wh = rng.uniform(8, 20, size=(n, 2))
            return [R(x, y, x + w, y + h, "hsil") for (x, y), (w, h) in zip(xy, wh)]
        pred, truth = crowd(rng.integers(0, 6)), crowd(rng.integers(0, 6))
        m = iou_matrix(pred, truth)
        for t in (0.3, 0.5):
            got = match_boxes(pred, truth, t)
            assert len({i for i, _, _ in got}) == len(got) == len({j for _, j, _ in got})
            assert all(v >= t for _, _, v in got)
            assert sum(v for _, _, v in got) == pytest.approx(_brute_best_total(m, t))


def test_matching_is_class_aware_and_unlabelled_boxes_take_the_question_class():
    truth = [R(0, 0, 10, 10, "hsil")]
    items = [GroundingItem("a", [R(0, 0, 10, 10, "lsil")], truth, query_class="hsil"),  # wrong class
             GroundingItem("b", [R(0, 0, 10, 10)], truth, query_class="hsil"),          # no label
             GroundingItem("c", [R(0, 0, 10, 10, "HSILs")], truth, query_class="hsil")]  # case + plural
    rep = score_grounding(items)
    o = rep.overall["0.5"]
    assert (o["tp"], o["n_pred"], o["n_true"]) == (2, 3, 3)
    lsil = rep.per_class["lsil"]["0.5"]
    assert lsil["precision"] == 0 and math.isnan(lsil["recall"])
    assert rep.per_class["hsil"]["0.5"]["tp"] == 2
    assert rep.unlabelled_pred == 1 and rep.off_query_pred == 1


def test_any_abnormal_question_counts_only_classes_absent_from_truth_as_off_query():
    truth = [R(0, 0, 10, 10, "dark"), R(20, 0, 30, 10, "enlarged")]
    pred = [R(0, 0, 10, 10, "dark"), R(20, 0, 30, 10, "dark"), R(40, 0, 50, 10, "irregular")]
    rep = score_grounding([GroundingItem("x", pred, truth, query_class="abnormal cells")])
    assert rep.overall["0.5"]["tp"] == 1  # the second box is the wrong class
    assert rep.off_query_pred == 1        # only "irregular" is neither asked for nor in the truth


def test_grounding_metrics_by_hand_at_three_thresholds():
    truth = [R(0, 0, 10, 10, "hsil"), R(20, 0, 30, 10, "hsil"), R(40, 0, 50, 10, "hsil")]
    pred = [R(0, 0, 10, 10, "hsil"),   # IoU 1
            R(22, 0, 32, 10, "hsil"),  # IoU 8/12 = .667
            R(44, 0, 54, 10, "hsil"),  # IoU 6/14 = .429
            R(80, 0, 90, 10, "hsil")]  # nothing
    rep = score_grounding([GroundingItem("x", pred, truth, "hsil")])
    tp = {t: rep.overall[t]["tp"] for t in ("0.3", "0.5", "0.75")}
    assert tp == {"0.3": 3, "0.5": 2, "0.75": 1}
    h = rep.overall["0.5"]
    assert h["precision"] == pytest.approx(2 / 4) and h["recall"] == pytest.approx(2 / 3)
    assert h["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert rep.mean_iou == pytest.approx((1 + 8 / 12) / 2)
    assert rep.count_error["mean_signed"] == 1 and rep.count_error["mean_abs"] == 1


def test_grounding_empty_predictions_and_empty_truth():
    t = [R(0, 0, 10, 10, "hsil"), R(20, 0, 30, 10, "hsil")]
    rep = score_grounding([GroundingItem("no-pred", [], t, "hsil")])
    o = rep.overall["0.5"]
    assert math.isnan(o["precision"]) and o["recall"] == 0 and o["f1"] == 0
    assert rep.count_error == {"mean_abs": 2.0, "mean_signed": -2.0, "exact": 0.0}
    rep = score_grounding([GroundingItem("no-truth", [R(0, 0, 1, 1, "hsil")], [], "hsil")])
    o = rep.overall["0.5"]
    assert o["precision"] == 0 and math.isnan(o["recall"]) and o["f1"] == 0
    rep = score_grounding([GroundingItem("none", [], [], "hsil")])
    assert math.isnan(rep.overall["0.5"]["f1"]) and rep.count_error["exact"] == 1.0


def test_grounding_failed_rows_count_as_no_predictions_and_are_listed():
    t = [R(0, 0, 10, 10, "hsil")]
    rep = score_grounding([GroundingItem("ok", list(t), t, "hsil"),
                           GroundingItem("boom", list(t), t, "hsil", failed="CUDA out of memory")])
    assert rep.overall["0.5"]["tp"] == 1 and rep.overall["0.5"]["n_true"] == 2
    assert rep.failed == [{"key": "boom", "error": "CUDA out of memory"}]


# --------------------------------------------------------------------------- referring expressions

def test_class_names_normalised():
    vocab = ["hsil", "ascus", "herps"]
    assert canonical_class("HSILs", vocab) == "hsil"
    assert canonical_class("ascus", vocab) == "ascus"  # ends in s but is a class
    assert canonical_class("ASC-US cells.", vocab) == "ascus"
    assert canonical_class("Herpes", vocab) == "herps"
    assert read_class("This is a high-grade squamous intraepithelial lesion.", vocab) == ("hsil", "")
    assert read_class("hsil or ascus", vocab)[0] is None
    assert read_class("no idea", vocab) == (None, "names no known class")


def test_referring_both_directions():
    items = [ReferringItem("1", "HSIL.", "hsil\n"), ReferringItem("2", "lsil cells", "hsil"),
             ReferringItem("3", "hsil, maybe lsil", "lsil"),
             ReferringItem("4", None, "lsil", error="timeout"),
             ReferringItem("5", "<region>0 0 10 10</region>", "<region>1 0 11 10</region>"),   # IoU 9/11
             ReferringItem("6", "<region>0 0 10 10</region> <region>1 1 2 2</region>",
                           "<region>0 0 10 10</region>"),
             ReferringItem("7", "<region>0 0 10 10</region>", "<region>5 0 15 10</region>")]  # IoU 1/3
    rep = score_referring(items)
    d = rep.describe
    assert (d["n"], d["correct"], d["unparsed"], d["errors"]) == (4, 1, 1, 1)
    assert rep.confusion == {"hsil": {"hsil": 1, "lsil": 1}, "lsil": {"(unparsed)": 1, "(failed)": 1}}
    assert (rep.locate["n"], rep.locate["correct"], rep.locate["several_boxes"]) == (3, 1, 1)
    assert "Confusion" in rep.to_markdown()


# --------------------------------------------------------------------------- MCQ

def _mcq_prompt(options):
    opts = ", ".join(f"{chr(65 + i)}.{o}" for i, o in enumerate(options))
    return SYS.format("Please answer the multiple-choice question based on the image [Made-up Topic], and "
                      f"select the best option from the following options [{opts}]. Just answer the option.")


TEN = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa"]


def test_options_from_prompt_2_and_10_and_commas_inside():
    assert options_from_prompt(_mcq_prompt(["Benign", "Malignant"])) == {"A": "Benign", "B": "Malignant"}
    ten = options_from_prompt(_mcq_prompt(TEN))
    assert list(ten) == list("ABCDEFGHIJ") and ten["J"] == "Kappa"
    odd = options_from_prompt(_mcq_prompt(["Dysplasia, mild", "Carcinoma (high grade, solid)"]))
    assert odd == {"A": "Dysplasia, mild", "B": "Carcinoma (high grade, solid)"}


def test_label_letter_checks_the_text():
    o = {"A": "Benign", "B": "Malignant"}
    assert label_letter("A.Benign.\n", o) == ("A", "")
    assert label_letter("A.Malignant.", o)[0] is None
    assert label_letter("C.Other.", o)[0] is None


def test_mcq_answers_letter_text_ambiguity_and_ten_options():
    two = options_from_prompt(_mcq_prompt(["Benign", "Malignant"]))
    ten = options_from_prompt(_mcq_prompt(TEN))
    assert parse_choice("B.Malignant.", two) == "B"
    assert parse_choice("The lesion is malignant", two) == "B"     # option text
    assert parse_choice("A or B", two) is None                      # ambiguity refused
    assert parse_choice("Benign or malignant", two) is None
    assert parse_choice("J.Kappa.", ten) == "J"
    assert parse_choice("Iota", ten) == "I"
    assert parse_choice("K", ten) is None                           # not an option: no guess
    milan = dict(zip("ABCDEFGHI", ["IVA", "IVB", "I", "II", "V", "VI", "III", "I", "IVB"]))
    assert parse_choice("I", milan) is None  # the letter I or the text of C/H?
    assert parse_choice("C.I.", milan) == "C"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_mcq_jsonl_per_task_and_classes_with_macro(tmp_path):
    rows = [
        {"prompt": _mcq_prompt(["Benign", "Malignant"]), "predict": "A.Benign.", "label": "A.Benign."},
        {"prompt": _mcq_prompt(["Benign", "Malignant"]), "predict": "malignant", "label": "A.Benign."},
        {"prompt": _mcq_prompt(TEN), "predict": "J", "label": "J.Kappa."},
        {"prompt": _mcq_prompt(TEN), "predict": "A or B", "label": "B.Beta."},
    ]
    rows[2]["prompt"] = rows[2]["prompt"].replace("Made-up Topic", "Other Topic")
    rows[3]["prompt"] = rows[3]["prompt"].replace("Made-up Topic", "Other Topic")
    res = score_file(_jsonl(tmp_path / "generated_predictions.jsonl", rows), "mcq")
    d = res.data
    assert d["input_format"] == "llamafactory-jsonl"
    assert (d["overall"]["n"], d["overall"]["correct"], d["overall"]["unparsed"]) == (4, 2, 1)
    by_cls = {g["value"]: g["accuracy"] for g in d["groups"]["number of classes"]}
    assert by_cls == {"2": 0.5, "10": 0.5}
    assert d["macro"]["task"] == pytest.approx(0.5)
    assert [g["value"] for g in d["groups"]["task"]] == ["Made-up Topic", "Other Topic"]


def test_mcq_macro_differs_from_micro(tmp_path):
    p2 = _mcq_prompt(["Benign", "Malignant"])
    rows = [{"prompt": p2, "predict": "A", "label": "A.Benign."} for _ in range(3)]
    rows.append({"prompt": _mcq_prompt(TEN).replace("Made-up", "Big"), "predict": "B", "label": "A.Alpha."})
    d = score_file(_jsonl(tmp_path / "p.jsonl", rows), "mcq").data
    assert d["overall"]["accuracy"] == pytest.approx(3 / 4)       # micro
    assert d["macro"]["task"] == pytest.approx((1 + 0) / 2)      # macro over 2 tasks


def test_mcq_broken_label_is_an_error_naming_the_row(tmp_path):
    rows = [{"prompt": _mcq_prompt(["Benign", "Malignant"]), "predict": "A", "label": "A.Malignant."}]
    with pytest.raises(SlideChatError, match="line 1.*names option A"):
        score_file(_jsonl(tmp_path / "p.jsonl", rows), "mcq")


# --------------------------------------------------------------------------- inputs and task detection

def test_user_question_and_detection():
    assert user_question(SYS.format("Locate all hsil.")) == "Locate all hsil."
    assert detect_task("Locate all hsil.", "") == "grounding"
    assert detect_task("Give a brief description of region.<region>1 2 3 4</region>", "hsil") == "region"
    assert detect_task("Where is the abnormal cell?", "<region>1 2 3 4</region>") == "region"
    assert detect_task("Describe the Cytology diagnosis results.", "x") == "report"
    assert detect_task("Were any abnormal cells found?", "x") == "vqa"
    assert detect_task("Hello.", "x") is None


def _mixed(tmp_path):
    return _jsonl(tmp_path / "mixed.jsonl", [
        {"id": "q1", "images": ["a.png"], "prompt": _mcq_prompt(["Benign", "Malignant"]), "predict": "A",
         "label": "A.Benign."},
        {"id": "g1", "images": ["a.png"], "prompt": SYS.format("<image>Locate all hsil."),
         "predict": "hsil 1 is located at <region>0 0 10 10</region>.",
         "label": "hsil 1 is located at <region>0 0 10 10</region>."},
    ])


def test_mixed_tasks_refused_without_task_and_selected_with_it(tmp_path, caplog):
    p = _mixed(tmp_path)
    with pytest.raises(SlideChatError, match="mixed tasks.*(1 mcq, 1 grounding|1 grounding, 1 mcq)"):
        score_file(p, "mcq")
    d = score_file(p, "mcq", task="mcq").data
    assert d["overall"]["n"] == 1 and d["skipped"] == {"grounding": 1}
    assert d["input_format"] == "slidechat-jsonl"
    assert main(["eval", "grounding", str(p)]) == 1
    assert "mixed tasks" in caplog.text and str(p) in caplog.text


def test_score_all_tasks_of_a_mixed_file(tmp_path, capsys):
    p = _mixed(tmp_path)
    assert main(["eval", "cytology", str(p), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "## Cytology multiple-choice accuracy" in out and "## Multi-cell grounding" in out
    data = json.loads((tmp_path / "r" / "mixed.cytology.json").read_text())
    assert sorted(data["scorers"]) == ["grounding", "mcq"]
    assert data["scorers"]["mcq"]["overall"]["correct"] == 1
    assert data["scorers"]["grounding"]["overall"]["0.5"]["tp"] == 1


def test_rows_fitting_no_task_refused(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "Hello.", "predict": "hi", "label": "hello"}])
    with pytest.raises(SlideChatError, match="line 1 fits no task"):
        score_file(p, "report")
    assert score_file(p, "report", task="report").data["tasks"]["report"]["n"] == 1


def test_infer_jsonl_error_rows_are_failures(tmp_path):
    truth = "hsil 1 is located at <region>0 0 10 10</region>."
    p = _jsonl(tmp_path / "pred.jsonl", [
        {"id": "a", "images": [], "prompt": "Locate all hsil.", "predict": truth, "label": truth},
        {"id": "b", "images": [], "prompt": "Locate all hsil.", "predict": "", "label": truth,
         "error": "image not found: b.png"}])
    d = score_file(p, "grounding").data
    assert d["overall"]["0.5"]["recall"] == 0.5
    assert d["failed"] == [{"key": "b", "error": "image not found: b.png"}]
    # the infer writer's id object: {"dataset", "index", "id"}
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    rows[0]["id"] = {"dataset": "cyto_test", "index": 0, "id": None}
    rows[1]["id"] = {"dataset": "cyto_test", "index": 1, "id": "field-b"}
    d = score_file(_jsonl(tmp_path / "pred2.jsonl", rows), "grounding").data
    assert d["failed"] == [{"key": "field-b", "error": "image not found: b.png"}]
    assert [r.key for r in read_predictions(tmp_path / "pred2.jsonl").records] == ["cyto_test#0", "field-b"]


def test_grounding_qwen_boxes_need_image_size(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "f.png")
    qwen = "<|object_ref_start|>hsil<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
    truth = "hsil 1 is located at <region>0 0 100 50</region>."
    rows = [{"id": "a", "images": ["f.png"], "prompt": "Locate all hsil.", "predict": qwen, "label": truth}]
    d = score_file(_jsonl(tmp_path / "p.jsonl", rows), "grounding").data   # size read from f.png
    assert d["overall"]["0.5"]["tp"] == 1
    rows[0]["images"] = ["missing.png"]
    p = _jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(SlideChatError, match="image size"):
        score_file(p, "grounding")
    assert score_file(p, "grounding", image_size=(200, 100)).data["overall"]["0.5"]["tp"] == 1
    assert score_file(p, "grounding", image_size=(400, 400)).data["overall"]["0.5"]["tp"] == 0


def _xlsx(path, df):
    df.to_excel(path, index=False)
    return path


def test_cytochat_xlsx_grounding_dict_in_prompt(tmp_path):
    truth = ("hsil 1 is located at <region>0 0 10 10</region>. "
             "hsil 2 is located at <region>20 0 30 10</region>.\n")
    d1 = {"prompt": SYS.format("Locate all hsil."), "images": "t/1.bmp",
          "predict": "hsil 1 is located at <region>0 0 10 10</region>. hsil 2 is located at <region>50 5",
          "label": truth}
    df = pd.DataFrame({"Image": ["t/1.bmp"], "Prompt": [repr(d1)], "Lable": [truth]})
    d = score_file(_xlsx(tmp_path / "g.xlsx", df), "grounding").data
    o = d["overall"]["0.5"]
    assert (o["tp"], o["n_pred"], o["n_true"]) == (1, 1, 2) and d["malformed"]["n"] == 1
    assert d["input_format"] == "cytochat-xlsx"


def test_cytochat_xlsx_prompt_is_never_executed(tmp_path):
    df = pd.DataFrame({"Image": ["x"], "Prompt": ["{'prompt': __import__('os').getcwd()}"], "Lable": ["y"]})
    with pytest.raises(SlideChatError, match="row 2.*not a Python literal"):
        read_predictions(_xlsx(tmp_path / "evil.xlsx", df))


def test_cytochat_xlsx_mcq_labels_only_and_with_predictions(tmp_path):
    df = pd.DataFrame({"Image": ["m-1", "m-2"], "Task": ["Made−up", "Made−up"], "Class number": [2, 2],
                       "Prompt": [_mcq_prompt(["Benign", "Malignant"])] * 2,
                       "Lable": ["A.Benign.\n", "B.Malignant.\n"]})
    p = _xlsx(tmp_path / "m.xlsx", df)
    with pytest.raises(SlideChatError, match="no predictions"):
        score_file(p, "mcq")
    df["predict"] = ["A.Benign.", "Benign"]
    d = score_file(_xlsx(tmp_path / "m2.xlsx", df), "mcq").data
    assert d["overall"]["correct"] == 1 and d["groups"]["task"][0]["value"] == "Made−up"


def test_cytochat_xlsx_vqa_list_prompt_and_report_rows(tmp_path):
    report = SYS.format("Describe the Cytology diagnosis results.")
    turns = [report, SYS.format("Were any abnormal cells found?")]
    df = pd.DataFrame({"Image": ["v1", "r1"], "Prompt": [repr(turns), report],
                       "Lable": ["Smear shows atypical cells.", "Negative for malignancy."],
                       "predict": ["Smear shows atypical cells.", ""]})
    f = read_predictions(_xlsx(tmp_path / "v.xlsx", df))
    assert f.records[0].turns == 2 and f.records[0].question == "Were any abnormal cells found?"
    _, by, _ = select_task(f, "report")
    assert sorted(by) == ["report", "vqa"]
    d = score_file(tmp_path / "v.xlsx", "report").data
    assert d["tasks"]["vqa"]["corpus"]["ROUGE-L"] == pytest.approx(1.0)
    assert d["tasks"]["report"]["corpus"]["ROUGE-L"] == 0.0


# --------------------------------------------------------------------------- CLI and committed examples

def test_cli_caption_on_cytology_jsonl_is_the_report_scorer(tmp_path, capsys):
    p = _jsonl(tmp_path / "r.jsonl", [{"prompt": SYS.format("Describe the Cytology diagnosis results."),
                                       "predict": "Negative.", "label": "Negative."}])
    assert main(["eval", "caption", str(p)]) == 0
    assert "| report | 1 | 0 | 1.0000" in capsys.readouterr().out


def test_cli_slidebench_csv_refuses_cytology_flags(tmp_path, caplog):
    csv = EX.parent / "slidebench" / "SlideBench-VQA-TCGA.output.example.csv"
    assert main(["eval", "mcq", str(csv), "--task", "mcq"]) == 1
    assert "cytology files" in caplog.text


@pytest.mark.parametrize("name,scorer,extra", [
    ("grounding.infer.example.jsonl", "grounding", ["--image-size", "512", "512"]),
    ("grounding.cytochat.example.xlsx", "grounding", []),
    ("mcq.llamafactory.example.jsonl", "mcq", []),
    ("mcq.cytochat.example.xlsx", "mcq", []),
    ("region.infer.example.jsonl", "region", []),
    ("reports.llamafactory.example.jsonl", "report", []),
])
def test_cli_matches_committed_example_reports(tmp_path, monkeypatch, capsys, name, scorer, extra):
    monkeypatch.chdir(EX)
    assert main(["eval", scorer, name, "--out", str(tmp_path)] + extra) == 0
    stem = Path(name).stem
    got_md = (tmp_path / f"{stem}.{scorer}.md").read_text()
    assert got_md == (EX / f"{stem}.{scorer}.md").read_text()
    assert json.loads((tmp_path / f"{stem}.{scorer}.json").read_text()) == \
        json.loads((EX / f"{stem}.{scorer}.json").read_text())
    assert capsys.readouterr().out == got_md


@pytest.mark.parametrize("content, message", [
    (b"", "no rows"),
    (b"\xff\xfe not text", "not UTF-8"),
    (b'{"prompt": "Locate all hsil."\n', "line 1 is not valid JSON"),
])
def test_unreadable_predictions_file_is_one_line(tmp_path, caplog, content, message):
    """Empty, non-UTF-8 and broken JSONL prediction files: exit 1 with one line naming the file
    (a non-UTF-8 file used to end in a UnicodeDecodeError traceback)."""
    path = tmp_path / "preds.jsonl"
    path.write_bytes(content)
    assert main(["eval", "grounding", str(path)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "preds.jsonl" in errors[0]
    assert "\n" not in errors[0]


def test_reasoning_block_is_not_scored_as_the_answer(tmp_path):
    """Qwen3 / Qwen3-VL reasoning templates put ``<think>...</think>`` before the answer, and vllm_infer
    keeps it in ``predict``; the letters inside the reasoning must not be read as the chosen option."""
    from slidechat.evaluation.cytology_io import strip_reasoning
    from slidechat.evaluation.cytology_mcq import score_cytology_mcq

    q = ("<image>What is the cellularity of this field? [A.Low, B.Moderate, C.High] "
         "Answer with the option's letter.")
    rows = [
        {"prompt": f"user\n{q}\nassistant\n", "label": "A.Low.",
         "predict": "<think>\nIt is not C.High and not B.Moderate.\n</think>\n\nA.Low."},
        {"prompt": f"user\n{q}\nassistant\n", "label": "C.High.", "predict": "<think>\n\n</think>\n\nC.High."},
    ]
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_predictions(path).records
    assert [r.predict for r in recs] == ["A.Low.", "C.High."]
    assert score_cytology_mcq(recs).overall["accuracy"] == 1.0
    # only a leading, closed block goes; an unclosed one or a later one is scored as written
    assert strip_reasoning("<think>still thinking A.") == "<think>still thinking A."
    assert strip_reasoning("B. <think>x</think>") == "B. <think>x</think>"
