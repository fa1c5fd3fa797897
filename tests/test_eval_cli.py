"""``slidechat eval mcq`` on the example output, and its errors."""

import json
from pathlib import Path

from slidechat.cli.main import main

EX = Path(__file__).resolve().parents[1] / "dataset" / "slidebench"


def test_cli_mcq_matches_committed_example(tmp_path, capsys):
    rc = main(["eval", "mcq", str(EX / "SlideBench-VQA-TCGA.output.example.csv"),
               "--out-json", str(tmp_path / "r.json"), "--out-md", str(tmp_path / "r.md")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| **overall** | 6 | 2 | 33.33 | 1 | 2 |" in out
    data = json.loads((tmp_path / "r.json").read_text())
    committed = json.loads((EX / "SlideBench-VQA-TCGA.report.example.json").read_text())
    assert data["overall"] == committed["overall"] and data["groups"] == committed["groups"]
    assert (tmp_path / "r.md").read_text() == (EX / "SlideBench-VQA-TCGA.report.example.md").read_text()


def test_cli_mcq_bcnb_groups_by_task(capsys):
    assert main(["eval", "mcq", str(EX / "SlideBench-VQA-BCNB.output.example.csv")]) == 0
    out = capsys.readouterr().out
    assert "### By Task" in out and "### By Tumor" not in out


def test_cli_mcq_missing_columns(tmp_path, caplog):
    p = tmp_path / "x.csv"
    p.write_text("ID,Question,Output\n1,q,A\n")
    assert main(["eval", "mcq", str(p)]) == 1
    assert "Answer" in caplog.text and str(p) in caplog.text
