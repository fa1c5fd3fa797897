"""Hostile inputs to scoring and data reading: a spreadsheet zip bomb, an MCQ output scored as captions,
a dataset name nothing registers. Each is refused with one line naming the file and what to do."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

from slidechat.cli.main import main
from slidechat.data.llamafactory import read_llamafactory
from slidechat.evaluation.captions import caption_metrics
from slidechat.utils.errors import SlideChatError

_CT = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
       '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
       '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
       '<Default Extension="xml" ContentType="application/xml"/>'
       '<Override PartName="/xl/workbook.xml" '
       'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
       '<Override PartName="/xl/worksheets/sheet1.xml" '
       'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>')
_RELS = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
         '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
         '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
         'officeDocument" Target="xl/workbook.xml"/></Relationships>')
_WB = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
       '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
       'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
       '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>')
_WB_RELS = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
            'relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>')


def _row(cells) -> str:
    return "<row>" + "".join(f'<c t="inlineStr"><is><t>{v}</t></is></c>' for v in cells) + "</row>"


def write_xlsx(path: Path, repeats: int) -> Path:
    """A real CytoChat-style MCQ sheet (Image, Prompt, Lable, predict) of ``repeats`` identical rows, the
    sheet XML streamed into the zip: ~55 bytes on disk per KB of XML."""
    row = _row(["img.png", "Just answer the option. A. benign B. malignant", "A", "A"]).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("[Content_Types].xml", _CT)
        z.writestr("_rels/.rels", _RELS)
        z.writestr("xl/workbook.xml", _WB)
        z.writestr("xl/_rels/workbook.xml.rels", _WB_RELS)
        with z.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as fh:
            fh.write(b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet '
                     b'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>')
            fh.write(_row(["Image", "Prompt", "Lable", "predict"]).encode())
            block = row * 1000
            for _ in range(repeats // 1000):
                fh.write(block)
            fh.write(row * (repeats % 1000))
            fh.write(b"</sheetData></worksheet>")
    return path


def _one_error_line(capsys, caplog) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def test_xlsx_zip_bomb_is_refused_before_parsing(tmp_path, monkeypatch, capsys, caplog):
    bomb = write_xlsx(tmp_path / "bomb.xlsx", 250_000)  # ~50 MB of sheet XML
    sheet = zipfile.ZipFile(bomb).getinfo("xl/worksheets/sheet1.xml")
    assert sheet.file_size > 45 * 2 ** 20 and bomb.stat().st_size < 2 ** 20
    monkeypatch.setenv("SLIDECHAT_MAX_SHEET_MB", "10")  # the default (64 MB) scaled down to keep this fast
    assert main(["eval", "mcq", str(bomb)]) == 1
    line = _one_error_line(capsys, caplog)
    assert str(bomb) in line and "over the limit of 10 MB" in line and "SLIDECHAT_MAX_SHEET_MB" in line


def test_xlsx_inflation_ratio_and_non_zip_are_refused(tmp_path):
    from slidechat.evaluation.cytology_io import check_spreadsheet, read_predictions

    bomb = write_xlsx(tmp_path / "dense.xlsx", 20_000)  # ~4 MB of XML compressed > 100 times
    with pytest.raises(SlideChatError, match=r"sheet1\.xml is compressed [\d,]+ times \(limit 100\)"):
        read_predictions(bomb)
    check_spreadsheet(bomb, max_ratio=10_000)  # the same file passes a looser ratio
    good = write_xlsx(tmp_path / "small.xlsx", 3)
    f = read_predictions(good)  # a genuine small sheet still reads
    assert len(f.records) == 3 and f.records[0].label == "A"
    fake = tmp_path / "old.xlsx"
    fake.write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 600)  # an OLE2 (.xls) file named .xlsx
    with pytest.raises(SlideChatError, match=r"old\.xlsx: not an \.xlsx workbook"):
        read_predictions(fake)


def _mcq_output(path: Path, with_options: bool) -> Path:
    cols = ["Slide", "Question"] + (["A", "B"] if with_options else []) + ["Answer", "Output", "Pred", "Error"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for i, ans in enumerate("ABBA"):
            opts = ["benign", "malignant"] if with_options else []
            w.writerow([f"s{i}", "What is shown?"] + opts + [ans, f"{ans}. malignant tissue", ans, ""])
    return path


def test_mcq_output_without_option_columns_is_not_scored_as_captions(tmp_path, capsys, caplog):
    p = _mcq_output(tmp_path / "out.csv", with_options=False)
    assert main(["eval", "caption", str(p), "--out-json", str(tmp_path / "r.json")]) == 1
    line = _one_error_line(capsys, caplog)
    assert str(p) in line and "option letter" in line and "slidechat eval mcq" in line
    assert not (tmp_path / "r.json").exists()
    caplog.clear()
    assert main(["eval", "caption", str(p), "--ref-column", "Answer"]) == 0  # named: scored, with a warning
    assert "option letter" in caplog.text
    with pytest.raises(SlideChatError, match="multiple-choice output"):
        caption_metrics(["a. x", "b"], ["(A)", " B. "])
    # captions stay scorable, including one that happens to be a single letter among real ones
    r = caption_metrics(["benign tissue", "A"], ["benign breast tissue", "A"])
    assert r["n"] == 2


def test_dataset_name_without_dataset_dir_says_which_flag(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)  # no ./data/dataset_info.json: the name cannot resolve
    with pytest.raises(SlideChatError, match="--dataset_dir") as e:
        read_llamafactory("cyto_test", "data")
    assert "cyto_test" in str(e.value) and "\n" not in str(e.value)
    d = tmp_path / "reg"
    d.mkdir()
    (d / "dataset_info.json").write_text('{"other": {"file_name": "o.json"}}')
    with pytest.raises(SlideChatError, match=r"not registered \(known: other\).*--dataset_dir"):
        read_llamafactory("cyto_test", d)
    with pytest.raises(SlideChatError, match=r"missing\.jsonl: dataset file not found"):
        read_llamafactory("missing.jsonl", None)
    assert main(["infer", "--model_name_or_path", str(tmp_path), "--dataset", "cyto_test", "--template",
                 "qwen2_vl", "--save_name", str(tmp_path / "o.jsonl")]) == 1
    assert "--dataset_dir" in _one_error_line(capsys, caplog)


# ----------------------------------------------------------------------------------------------
# a slide whose objective power and MPP disagree


def test_objective_power_and_mpp_agreement_rule():
    """objective ~ 10 / mpp within a factor 1.5 (wsi.slide.METADATA_AGREEMENT_FACTOR): a scanner's own
    pixel size passes, a whole objective step (factor 2) never does."""
    from slidechat.wsi.slide import metadata_disagreement

    for mpp, obj in ((0.25, 40), (0.2631, 40), (0.2265, 40), (0.5, 20), (0.4952, 20), (1.0, 10)):
        assert metadata_disagreement(mpp, obj) is None, (mpp, obj)
    for mpp, obj in ((0.5, 40), (0.25, 20), (1.0, 20), (0.125, 40)):
        line = metadata_disagreement(mpp, obj)
        assert line and f"{obj:g}x" in line and f"{mpp:g}" in line, (mpp, obj, line)
    assert metadata_disagreement(None, 40) is None and metadata_disagreement(0.5, None) is None


def test_disagreeing_objective_and_mpp_is_refused_then_settled_by_mpp_source(tmp_path, caplog):
    """A "40x" slide scanned at 0.5 µm/px: refused in failures.csv with both values and the flag; each
    --mpp-source then gives its own, recorded, scale."""
    import h5py

    from slidechat.apps.extract import extract_slides
    from slidechat.wsi.synthetic import SlideSpec, write_slide

    slide = tmp_path / "s_clash.svs"
    write_slide(slide, SlideSpec("s_clash", "tumor", 1024, 1024, 0.5, seed=3, stated_magnification=40))
    out = tmp_path / "out"
    s = extract_slides([slide], out, encoder="tiny_test", num_workers=0, progress=False)
    assert not s["done"] and len(s["failed"]) == 1
    with open(out / "failures.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["stage"] == "resolution" and "\n" not in row["reason"]
    for words in ("40x", "0.5 µm/px", "--mpp-source mpp", "--mpp-source objective"):
        assert words in row["reason"], (words, row["reason"])
    assert not list(out.rglob("*.h5"))
    # the rerun that settles it: finished slides would be skipped, the refused one is redone
    for source, base_mpp, ps0 in (("mpp", 0.5, 224), ("objective", 0.25, 448)):
        caplog.clear()
        s = extract_slides([slide], out, encoder="tiny_test", num_workers=0, progress=False,
                           mpp_source=source, overwrite=True)
        assert s["done"] == ["s_clash"], s["failed"]
        with h5py.File(out / "h5_files" / "s_clash.h5", "r") as f:
            a, root = dict(f["coords"].attrs), dict(f.attrs)
        assert a["base_mpp"] == pytest.approx(base_mpp) and a["patch_size_level0"] == ps0
        note = root["resolution_note"]
        assert "disagree" in note and f"--mpp-source {source}" in note
        assert any("disagree" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    with pytest.raises(SlideChatError, match="--mpp-source must be one of"):
        extract_slides([slide], out, encoder="tiny_test", progress=False, mpp_source="guess")
