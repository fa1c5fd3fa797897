"""MCQ answer extraction and accuracy tables."""

import json

import pandas as pd
import pytest

from slidechat.data.answers import parse_choice
from slidechat.evaluation.mcq import score_mcq
from slidechat.evaluation.tables import markdown_table, write_reports
from slidechat.utils.errors import SlideChatError

OPTS = {"A": "Ductal carcinoma in situ", "B": "Invasive ductal carcinoma",
        "C": "Invasive lobular carcinoma", "D": "Mucinous carcinoma"}
OPTS3 = {"A": "Lung", "B": "Kidney", "C": "Liver", "D": ""}  # D empty: not an option

CASES = [
    # bare letters
    ("B", OPTS, "B"),
    ("b", OPTS, "B"),
    (" B \n", OPTS, "B"),
    ("B.", OPTS, "B"),
    ("(B)", OPTS, "B"),
    ("B)", OPTS, "B"),
    ("[C]", OPTS, "C"),
    ("**B**", OPTS, "B"),
    ("**B. Invasive ductal carcinoma**", OPTS, "B"),
    ("`D`", OPTS, "D"),
    # explicit statements
    ("Answer: C", OPTS, "C"),
    ("answer: C", OPTS, "C"),
    ("The answer is C", OPTS, "C"),
    ("The answer is C.", OPTS, "C"),
    ("The correct option is (D) mucinous carcinoma.", OPTS, "D"),
    ("The correct answer is (b).", OPTS, "B"),
    ("Option B", OPTS, "B"),
    ("I would choose option A because the ducts are intact.", OPTS, "A"),
    ("The answer is\n\n  **C**", OPTS, "C"),
    ("B is correct", OPTS, "B"),
    ("I think (C) is the answer.", OPTS, "C"),
    ("Answer: E", OPTS, None),  # not an option of this row
    ("Answer: D", OPTS3, None),  # D is empty here
    ("The answer is C, not D... actually the answer is D", OPTS, None),  # two different statements
    ("The answer is a tumor of the breast", OPTS, None),  # lowercase "a" is an article
    # leading markers
    ("B. Invasive ductal carcinoma", OPTS, "B"),
    ("B) Invasive ductal carcinoma", OPTS, "B"),
    ("(B) It shows invasion of the stroma.", OPTS, "B"),
    ("B Invasive ductal carcinoma", OPTS, "B"),
    ("B: Kidney", OPTS3, "B"),
    ("A. Lung", OPTS3, "A"),
    ("B. Liver", OPTS3, None),  # letter contradicts the text of option C
    ("D. Something", OPTS3, None),  # D is not an option here
    ("A tumor is seen in the lung.", OPTS3, "A"),  # not the marker "A": text "Lung" matches A
    ("A tumor is seen in the breast.", OPTS3, None),  # article, no option text
    ("A malignant tumor with glands.", OPTS, None),  # article, no option text
    # option text
    ("Invasive ductal carcinoma", OPTS, "B"),
    ("invasive   DUCTAL carcinoma!", OPTS, "B"),
    ("The slide shows an invasive ductal carcinoma.", OPTS, "B"),
    ("This is consistent with ductal carcinoma in situ.", OPTS, "A"),
    ("kidney", OPTS3, "B"),
    ("It is either invasive lobular carcinoma or mucinous carcinoma.", OPTS, None),
    ("Lung or liver", OPTS3, None),
    ("The tumor arises in the kidney; the liver is spared.", OPTS3, None),
    # ambiguity between letters
    ("A or B", OPTS, None),
    ("A or B.", OPTS3, None),
    ("(A) and (C)", OPTS, None),
    ("B/C", OPTS, None),
    ("Either B or C could fit.", OPTS, None),
    # nothing usable
    ("", OPTS, None),
    ("   \n ", OPTS, None),
    (None, OPTS, None),
    ("I cannot determine this from the image.", OPTS, None),
    ("E", OPTS, None),
    ("e", OPTS, None),
]


@pytest.mark.parametrize("text,options,expected", CASES)
def test_parse_choice(text, options, expected):
    assert parse_choice(text, options) == expected


def test_parse_choice_letters_only_and_same_text_options():
    assert parse_choice("C", ["A", "B", "C"]) == "C"
    assert parse_choice("D", ["A", "B", "C"]) is None
    assert parse_choice("The answer is B", "AB") == "B"
    # two options with the same text cannot be told apart by text
    assert parse_choice("Yes", {"A": "Yes", "B": "Yes"}) is None
    # longest match: "Invasive ductal carcinoma" contains "Ductal carcinoma"
    assert parse_choice("invasive ductal carcinoma", {"A": "Ductal carcinoma",
                                                      "B": "Invasive ductal carcinoma"}) == "B"


def _frame():
    # 8 rows, hand-counted: Tumor X -> 4 rows (2 correct, 1 unparsed, 1 wrong);
    # Tumor Y -> 4 rows (1 correct, 1 error, 2 wrong)
    rows = [
        # ID, Tumor, Broad, Narrow, Answer, Output, Error
        ("q1", "X", "Diagnosis", "Typing", "A", "A", ""),
        ("q2", "X", "Diagnosis", "Grading", "B", "The answer is B", ""),
        ("q3", "X", "Microscopy", "Typing", "C", "no idea", ""),
        ("q4", "X", "Microscopy", "Grading", "A", "B. Beta", ""),
        ("q5", "Y", "Diagnosis", "Typing", "C", "Gamma", ""),
        ("q6", "Y", "Diagnosis", "Typing", "A", "", "feature file not found: f/Y/s6"),
        ("q7", "Y", "Clinical", "Prognosis", "B", "A", ""),
        ("q8", "Y", "Clinical", "Prognosis", "A", "C", ""),
    ]
    df = pd.DataFrame(rows, columns=["ID", "Tumor", "Broad Category", "Narrow Category", "Answer",
                                     "Output", "Error"])
    df["Question"] = "q?"
    df["A"], df["B"], df["C"], df["D"] = "Alpha", "Beta", "Gamma", ""
    return df


def test_score_mcq_counts():
    rep = score_mcq(_frame())
    assert rep.overall == {"n": 8, "correct": 3, "accuracy": 3 / 8, "unparsed": 1, "errors": 1}
    tum = {r["value"]: r for r in rep.groups["Tumor"]}
    assert (tum["X"]["n"], tum["X"]["correct"], tum["X"]["unparsed"], tum["X"]["errors"]) == (4, 2, 1, 0)
    assert (tum["Y"]["n"], tum["Y"]["correct"], tum["Y"]["unparsed"], tum["Y"]["errors"]) == (4, 1, 0, 1)
    broad = {r["value"]: r for r in rep.groups["Broad Category"]}
    assert [r["value"] for r in rep.groups["Broad Category"]] == ["Diagnosis", "Microscopy", "Clinical"]
    assert (broad["Diagnosis"]["n"], broad["Diagnosis"]["correct"]) == (4, 3)
    assert (broad["Microscopy"]["n"], broad["Microscopy"]["correct"]) == (2, 0)
    assert (broad["Clinical"]["n"], broad["Clinical"]["correct"]) == (2, 0)
    narrow = {r["value"]: r for r in rep.groups["Narrow Category"]}
    assert narrow["Typing"]["n"] == 4 and narrow["Typing"]["correct"] == 2
    assert narrow["Typing"]["accuracy"] == 0.5
    assert rep.unparsed == [{"key": "q3", "output": "no idea"}]
    assert rep.errors == [{"key": "q6", "error": "feature file not found: f/Y/s6"}]
    assert "Task" not in rep.groups


def test_score_mcq_uses_pred_column_and_reparse():
    df = _frame()
    df["Pred"] = ["A", "A", "", "B", "C", "", "B", "A"]  # a Pred that disagrees with Output
    rep = score_mcq(df)
    assert rep.overall["correct"] == 4  # q1, q5, q7, q8 (q2, q4 wrong; q3 unparsed; q6 error)
    assert rep.overall["unparsed"] == 1
    rep2 = score_mcq(df, use_pred=False)
    assert rep2.overall["correct"] == 3


def test_score_mcq_errors():
    df = _frame().drop(columns=["Answer"])
    with pytest.raises(SlideChatError, match="Answer"):
        score_mcq(df, source="x.csv")
    df = _frame()
    df.loc[0, "Answer"] = "Z"
    with pytest.raises(SlideChatError, match="not one of their options"):
        score_mcq(df)
    with pytest.raises(SlideChatError, match="Nope"):
        score_mcq(_frame(), group_columns=["Nope"])


def test_reports_markdown_and_json(tmp_path):
    rep = score_mcq(_frame(), source="run/out.csv")
    md = rep.to_markdown()
    assert "| **overall** | 8 | 3 | 37.50 | 1 | 1 |" in md
    assert "| X | 4 | 2 | 50.00 | 1 | 0 |" in md
    assert "### Unparsed answers (1" in md and "| q3 | no idea |" in md
    assert "### Rows not run (1" in md
    write_reports(rep.to_dict(), md, tmp_path / "r.json", tmp_path / "r.md")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["overall"]["correct"] == 3 and data["groups"]["Tumor"][0]["value"] == "X"
    assert (tmp_path / "r.md").read_text() == md


def test_markdown_table_escapes_pipes():
    t = markdown_table(["a", "b"], [["x|y", 1]])
    assert t.splitlines() == ["| a | b |", "| :--- | ---: |", "| x\\|y | 1 |"]
