"""SlideBench CSV reading, prompts, feature paths and the resumable writer."""

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidechat.data.slidebench import (
                                       DEFAULT_CAPTION_PROMPT, SlideBenchWriter, build_mcq_prompt, build_prompt, merge_shards,
                                       read_output, read_slidebench, resolve_feature_path, shard_path)
from slidechat.features.io import write_feature_h5, write_slidechat_csv
from slidechat.utils.errors import SlideChatError

REPO = Path(__file__).resolve().parents[1]
EX = REPO / "dataset" / "slidebench"
TCGA_HEADER = "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tcga_csv(tmp_path):
    rows = [TCGA_HEADER]
    for i in range(7):
        d = "" if i % 2 else f"Option d{i}"
        rows.append(f'{10 + i},S{i % 3},T{i % 2},Broad,Narrow,"Question {i}, with comma?",'
                    f'Alpha {i},"Beta ""{i}""",NA,{d},B')
    return _write(tmp_path / "tcga.csv", "\n".join(rows) + "\n")


def test_read_variants_from_examples():
    t = read_slidebench(EX / "SlideBench-VQA-TCGA.example.csv")
    assert t.kind == "tcga" and t.option_columns == ("A", "B", "C", "D") and len(t) == 6
    b = read_slidebench(EX / "SlideBench-VQA-BCNB.example.csv")
    assert b.kind == "bcnb" and "Tumor" not in b.columns
    c = read_slidebench(EX / "SlideBench-Caption.example.csv")
    assert c.kind == "caption" and c.ref_column == "Caption" and not c.is_mcq


def test_read_keeps_text_untouched(tcga_csv):
    t = read_slidebench(tcga_csv)
    assert t.columns == TCGA_HEADER.split(",")
    assert t.df["ID"].tolist()[:2] == ["10", "11"]  # text, not int
    assert t.df["C"].tolist()[0] == "NA"  # literal, not NaN
    assert t.df["D"].tolist()[1] == ""  # empty stays empty
    assert t.df["B"].tolist()[0] == 'Beta "0"'
    assert t.options(1) == {"A": "Alpha 1", "B": 'Beta "1"', "C": "NA"}


def test_missing_columns_named(tmp_path):
    p = _write(tmp_path / "bad.csv", "ID,Slide,Tumor,Question,A\n1,s,t,q,a\n")
    with pytest.raises(SlideChatError) as e:
        read_slidebench(p, kind="tcga")
    assert str(p) in str(e.value) and "'B'" in str(e.value)
    p2 = _write(tmp_path / "cap.csv", "Name,Caption\nx,y\n")
    with pytest.raises(SlideChatError, match="Slide"):
        read_slidebench(p2)
    with pytest.raises(SlideChatError, match="Report"):
        read_slidebench(_write(tmp_path / "cap2.csv", "Slide,Caption\nx,y\n"), ref_column="Report")
    with pytest.raises(SlideChatError, match="not found"):
        read_slidebench(tmp_path / "nope.csv")
    with pytest.raises(SlideChatError, match="Output"):
        read_output(EX / "SlideBench-VQA-TCGA.example.csv")


def test_prompt_format_exact():
    p = build_mcq_prompt("What is the diagnosis?", {"A": "Benign", "B": "Malignant", "C": "", "D": "Unknown"})
    assert p == "<image>\nWhat is the diagnosis?\nA. Benign\nB. Malignant\nD. Unknown"
    t = read_slidebench(EX / "SlideBench-VQA-TCGA.example.csv")
    assert build_prompt(t, 1) == ("<image>\nHow are the tumor cells arranged in the stroma?\n"
                                  "A. Single-file cords\nB. Solid nests and tubules\nC. Papillary fronds")
    c = read_slidebench(EX / "SlideBench-Caption.example.csv")
    assert build_prompt(c, 0) == "<image>\n" + DEFAULT_CAPTION_PROMPT
    assert build_prompt(c, 0, caption_prompt="Describe it.") == "<image>\nDescribe it."


def test_feature_template_resolution(tmp_path):
    root = tmp_path / "feats"
    write_slidechat_csv(root / "BRCA" / "s1.csv", np.zeros((2, 3), np.float32))
    write_feature_h5(root / "BRCA" / "s1.h5", np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64),
                     {}, {})
    write_slidechat_csv(root / "p7.csv", np.zeros((2, 3), np.float32))
    row = {"Slide": "s1", "Tumor": "BRCA", "Task": "ER"}
    path, err = resolve_feature_path(row, "{feature_root}/{Tumor}/{Slide}", root)
    assert err is None and path == root / "BRCA" / "s1.h5"  # .h5 preferred
    path, err = resolve_feature_path({"Slide": "s1.csv", "Tumor": "BRCA"}, "{feature_root}/{Tumor}/{Slide}",
                                     root)
    assert path == root / "BRCA" / "s1.csv"
    path, err = resolve_feature_path({"Slide": "p7"}, "{feature_root}/{Slide}", root)
    assert path == root / "p7.csv"
    path, err = resolve_feature_path({"Slide": "gone", "Tumor": "LUAD"}, "{feature_root}/{Tumor}/{Slide}",
                                     root)
    assert path is None and "gone" in err and "not found" in err
    # a column with a space works as a field; an unknown one is a clear error up front
    path, _ = resolve_feature_path({"Slide": "s1", "Broad Category": "BRCA"},
                                   "{feature_root}/{Broad Category}/{Slide}", root)
    assert path == root / "BRCA" / "s1.h5"
    t = read_slidebench(EX / "SlideBench-VQA-BCNB.example.csv")
    with pytest.raises(SlideChatError, match="Tumor"):
        SlideBenchWriter(t, tmp_path / "o.csv", feature_root=root, feature_template="{feature_root}/{Tumor}/{Slide}")


def test_writer_missing_feature_rows(tmp_path):
    root = tmp_path / "feats"
    write_slidechat_csv(root / "T0" / "S0.csv", np.zeros((1, 2), np.float32))
    rows = [TCGA_HEADER, "1,S0,T0,b,n,q,x,y,,,A", "2,S1,T0,b,n,q,x,y,,,B", "3,S0,T0,b,n,q,x,y,,,B"]
    t = read_slidebench(_write(tmp_path / "in.csv", "\n".join(rows) + "\n"))
    out = tmp_path / "out.csv"
    with SlideBenchWriter(t, out, feature_root=root) as w:
        batches = list(_run(w, 2, lambda it: "A" if it.index == 0 else "The answer is B"))
    assert [[it.index for it in b] for b in batches] == [[0, 1], [2]]
    assert batches[0][0].feature_path == root / "T0" / "S0.csv" and batches[0][1].feature_path is None
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert df.columns.tolist() == TCGA_HEADER.split(",") + ["Output", "Pred", "Error"]
    assert df["Output"].tolist() == ["A", "", "The answer is B"]
    assert df["Pred"].tolist() == ["A", "", "B"]
    assert df["Error"].tolist()[0] == "" and "S1" in df["Error"].tolist()[1] and df["Error"].tolist()[2] == ""


def _run(writer, bs, answer, stop_after=None):
    """The caller's loop; yields each written batch."""
    for k, batch in enumerate(writer.pending_batches(bs)):
        if stop_after is not None and k == stop_after:
            return
        for it in batch:
            if it.ok:
                it.output = answer(it)
        writer.write(batch)
        yield batch


def _answer(it):
    return f"B. line one\nline two, for row {it.index} \"quoted\""


def test_writer_kill_and_resume(tcga_csv, tmp_path):
    t = read_slidebench(tcga_csv)
    out = tmp_path / "out.csv"
    with SlideBenchWriter(t, out) as w:
        list(_run(w, 2, _answer, stop_after=2))  # 4 rows written, then "killed"
        assert w.done == 4
    data = out.read_bytes()
    # simulate a kill in the middle of writing row 5: half of its record, inside the quoted Output
    row5 = data.count(b"\n")  # (we append a partial record ourselves)
    partial = b'14,S1,T0,Broad,Narrow,"Question 4, with comma?",Alpha 4,"Beta ""4""",NA,Option d4,B,"B. line one\nline t'
    out.write_bytes(data + partial)
    assert row5 > 0
    with SlideBenchWriter(t, out) as w:
        assert w.done == 4 and w.num_pending == 3
        first = next(w.pending_batches(2))
        assert [it.index for it in first] == [4, 5]
        for it in first:
            it.output = _answer(it)
        w.write(first)
        list(_run(w, 2, _answer))
        assert w.complete
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df) == 7 and df["ID"].tolist() == [str(10 + i) for i in range(7)]
    assert df["Output"].tolist() == [_answer(type("I", (), {"index": i})) for i in range(7)]
    assert df["Pred"].tolist() == ["B"] * 7
    # input columns untouched
    assert df[t.columns].equals(t.df.astype(object)) or df[t.columns].values.tolist() == t.df.values.tolist()
    # a resumed complete file yields nothing more
    with SlideBenchWriter(t, out) as w:
        assert list(w.pending_batches(3)) == []


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_writer_torn_tail_at_various_points(tcga_csv, tmp_path, cut):
    t = read_slidebench(tcga_csv)
    out = tmp_path / "out.csv"
    with SlideBenchWriter(t, out) as w:
        list(_run(w, 3, _answer, stop_after=1))
        list(_run(w, 1, _answer, stop_after=1))  # 4 rows
    full = out.read_bytes()
    last_start = full.rstrip(b"\n").rfind(b"\n1")  # start of the last record (IDs start with 1)
    out.write_bytes(full[: last_start + 1 + cut])  # tear the 4th record
    with SlideBenchWriter(t, out) as w:
        assert w.done == 3
        list(_run(w, 4, _answer))
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert df["ID"].tolist() == [str(10 + i) for i in range(7)]


def test_writer_rejects_other_input(tcga_csv, tmp_path):
    t = read_slidebench(tcga_csv)
    out = tmp_path / "out.csv"
    with SlideBenchWriter(t, out) as w:
        list(_run(w, 3, _answer, stop_after=1))
    other = read_slidebench(_write(tmp_path / "other.csv", tcga_csv.read_text().replace("Question 1", "Other 1")))
    with pytest.raises(SlideChatError, match="another input"):
        SlideBenchWriter(other, out)
    bcnb = read_slidebench(EX / "SlideBench-VQA-BCNB.example.csv")
    before = out.read_bytes()
    with pytest.raises(SlideChatError, match="different columns"):
        SlideBenchWriter(bcnb, out)
    assert out.read_bytes() == before  # a refused resume never touches the file
    shorter = read_slidebench(_write(tmp_path / "short.csv", "\n".join(tcga_csv.read_text().splitlines()[:3]) + "\n"))
    with pytest.raises(SlideChatError, match="only 2"):
        SlideBenchWriter(shorter, out)
    # overwrite starts fresh
    with SlideBenchWriter(other, out, overwrite=True) as w:
        assert w.done == 0
        list(_run(w, 10, _answer))
    assert len(pd.read_csv(out)) == 7


def test_writer_torn_header(tcga_csv, tmp_path):
    t = read_slidebench(tcga_csv)
    out = _write(tmp_path / "out.csv", "ID,Slide,Tum")
    with SlideBenchWriter(t, out) as w:
        assert w.done == 0
        list(_run(w, 4, _answer))
    assert len(pd.read_csv(out)) == 7
    junk = _write(tmp_path / "junk.csv", "something else entirely")
    with pytest.raises(SlideChatError, match="not an output"):
        SlideBenchWriter(t, junk)


def test_writer_protocol_errors(tcga_csv, tmp_path):
    t = read_slidebench(tcga_csv)
    with SlideBenchWriter(t, tmp_path / "o.csv") as w:
        gen = w.pending_batches(2)
        batch = next(gen)
        with pytest.raises(SlideChatError, match="expected the next pending rows"):
            w.write(batch[1:])
        with pytest.raises(SlideChatError, match="neither an output nor an error"):
            w.write(batch)
        with pytest.raises(SlideChatError, match="not written"):
            next(gen)
        w.write(list(reversed(batch)), outputs=["x", "y"])  # order inside a batch is free
        assert w.done == 2
    with SlideBenchWriter(t, tmp_path / "o.csv") as w1:
        with pytest.raises(SlideChatError, match="another process"):
            SlideBenchWriter(t, tmp_path / "o.csv")
    out = read_output(tmp_path / "o.csv")
    with pytest.raises(SlideChatError, match="already has"):
        SlideBenchWriter(out, tmp_path / "o2.csv")


def test_sharded_writers_merge(tcga_csv, tmp_path):
    t = read_slidebench(tcga_csv)
    out = tmp_path / "out.csv"
    for rank in range(3):
        with SlideBenchWriter(t, out, shard=(rank, 3)) as w:
            list(_run(w, 2, _answer))
        assert shard_path(out, rank, 3).exists()
    merge_shards(t, out, 3, remove_shards=True)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert df["ID"].tolist() == [str(10 + i) for i in range(7)]
    assert df["Output"].tolist()[5] == _answer(type("I", (), {"index": 5}))
    assert not shard_path(out, 0, 3).exists()


def test_caption_writer_columns(tmp_path):
    c = read_slidebench(EX / "SlideBench-Caption.example.csv")
    out = tmp_path / "cap.csv"
    with SlideBenchWriter(c, out) as w:
        list(_run(w, 3, lambda it: f"report {it.index}"))
    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["Slide", "Tumor", "Caption", "Output", "Error"]


def test_example_outputs_are_consistent():
    """The committed example outputs are what the writer produces for the example inputs."""
    for name in ("SlideBench-VQA-TCGA", "SlideBench-VQA-BCNB", "SlideBench-Caption"):
        t = read_slidebench(EX / f"{name}.example.csv")
        o = read_output(EX / f"{name}.output.example.csv")
        assert o.columns[: len(t.columns)] == t.columns
        assert o.df[t.columns].values.tolist() == t.df.values.tolist()


def test_writer_quotes_carriage_returns_so_rows_stay_whole(tcga_csv, tmp_path):
    """Model answers can contain a lone "\\r": it must stay inside its cell, for pandas, the csv
    module and the writer's own resume parser."""
    t = read_slidebench(tcga_csv)
    out = tmp_path / "out.csv"
    answers = {0: "B\rtrailing", 1: "line\r\nbreak", 2: "B. \r", 3: "plain B"}
    with SlideBenchWriter(t, out) as w:
        for batch in w.pending_batches(2):
            for it in batch:
                it.output = answers.get(it.index, "B")
            w.write(batch)
            if w.done >= 4:
                break
    with SlideBenchWriter(t, out) as w:  # resume parser reads the same records back
        assert w.done == 4 and w.num_pending == 3
        list(_run(w, 3, _answer))
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df) == 7 and df["ID"].tolist() == [str(10 + i) for i in range(7)]
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 8 and rows[1][t.columns.__len__()] == "B\rtrailing"


def test_writer_resumes_past_fields_over_the_csv_module_limit(tmp_path):
    """A 300 KB question or answer (the csv module's default field limit is 128 KiB) is a complete record:
    reopening must not take it for a torn tail and cut the file there."""
    big_q = "Is this " + "very " * 60_000 + "large?"
    p = tmp_path / "big.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Slide", "Question", "A", "B", "Answer"])
        w.writerows([["s0", "q0", "a", "b", "A"], ["s1", big_q, "a", "b", "B"], ["s2", "q2", "a", "b", "A"]])
    t = read_slidebench(p)
    out = tmp_path / "out.csv"
    with SlideBenchWriter(t, out) as w:
        batch = next(w.pending_batches(2))
        w.write(batch, ["A", "x" * 200_000])  # two rows, both with a big field
    data = out.read_bytes()
    with SlideBenchWriter(t, out) as w:
        assert w.done == 2 and out.read_bytes() == data  # nothing cut
        w.write(next(w.pending_batches(2)), ["B"])
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert df["Question"].tolist()[1] == big_q and df["Output"].tolist() == ["A", "x" * 200_000, "B"]
