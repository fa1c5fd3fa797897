"""Input contracts (issue 9): SlideBench task kind from explicit columns, empty and header-only files,
prompt length caps in testing and chat, tolerant chat stdin, the encoder's padding mode in exports."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_testing import (BATCH, CONFIG, COLUMNS, MAX_NEW, build_tiny_setup,  # noqa: E402
                          cfg_option_args, read_rows)

from slidechat.data.slidebench import read_output, read_slidebench  # noqa: E402
from slidechat.utils.errors import SlideChatError  # noqa: E402

BIN = Path(sys.executable).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
HUGE = 5_000_000  # characters of the "5 MB question"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def one_line_error(caplog, *needles):
    """The CLI's error: one line (no traceback) naming the file and the problem."""
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors, caplog.text
    msg = errors[-1].getMessage()
    assert "\n" not in msg and errors[-1].exc_info is None, msg
    for n in needles:
        assert n in msg, msg
    caplog.clear()
    return msg


# --------------------------------------------------------------------------- SlideBench task kind

def test_options_without_question_are_an_error_not_a_caption_task(tmp_path):
    p = write_csv(tmp_path / "noq.csv", ["ID", "Slide", "Tumor", "A", "B", "C", "D", "Answer"],
                  [["1", "s1", "BRCA", "tumor", "normal", "", "", "A"]])
    with pytest.raises(SlideChatError) as e:
        read_slidebench(p)
    msg = str(e.value)
    assert str(p) in msg and "'Question'" in msg and "--task caption" in msg
    # forcing the task is explicit: captions against the Answer column, because the user said so
    t = read_slidebench(p, kind="caption")
    assert t.kind == "caption" and t.ref_column == "Answer"
    # and forcing mcq on a caption file names what multiple-choice needs
    cap = write_csv(tmp_path / "cap.csv", ["Slide", "Caption"], [["s1", "A report."]])
    assert read_slidebench(cap).kind == "caption"
    with pytest.raises(SlideChatError, match=r"'Question', 'A', 'B'"):
        read_slidebench(cap, kind="mcq")
    vqa = write_csv(tmp_path / "mcq.csv", ["Slide", "Question", "A", "B", "Answer"], [["s", "q", "a", "b", "B"]])
    assert read_slidebench(vqa).kind == read_slidebench(vqa, kind="mcq").kind == "vqa"


def test_columns_that_do_not_say_the_task_need_task(tmp_path):
    p = write_csv(tmp_path / "vague.csv", ["Slide", "Question", "Answer"], [["s1", "What is it?", "tumour"]])
    with pytest.raises(SlideChatError) as e:
        read_slidebench(p)
    assert str(p) in str(e.value) and "--task" in str(e.value)
    assert read_slidebench(p, kind="caption").ref_column == "Answer"
    with pytest.raises(SlideChatError, match="unknown SlideBench task"):
        read_slidebench(p, kind="essay")


def test_empty_and_header_only_inputs(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(SlideChatError, match="empty file") as e:
        read_slidebench(empty)
    assert str(empty) in str(e.value)
    header = tmp_path / "header.csv"
    header.write_text(",".join(COLUMNS) + "\n", encoding="utf-8")
    with pytest.raises(SlideChatError, match="no rows") as e:
        read_slidebench(header)
    assert str(header) in str(e.value)


def test_header_only_output_is_refused_by_every_scorer(tmp_path, caplog):
    from slidechat.cli.main import main
    from slidechat.engine.testing import score_output

    out = tmp_path / "out.csv"
    out.write_text(",".join(COLUMNS + ["Output", "Pred", "Error"]) + "\r\n", encoding="utf-8")
    with pytest.raises(SlideChatError, match="no rows to score"):
        score_output(out, "tcga")
    with pytest.raises(SlideChatError, match="no rows"):
        read_output(out)
    assert main(["eval", "mcq", str(out)]) == 1
    one_line_error(caplog, str(out), "no rows")
    cap = tmp_path / "cap_out.csv"
    cap.write_text("Slide,Caption,Output,Error\r\n", encoding="utf-8")
    with pytest.raises(SlideChatError, match="no rows to score"):
        score_output(cap, "caption")
    assert main(["eval", "caption", str(cap)]) == 1
    one_line_error(caplog, str(cap), "no rows")
    assert not list(tmp_path.glob("*.report.*"))


def test_scorers_refuse_the_other_task(tmp_path, caplog):
    from slidechat.cli.main import main

    repo = Path(__file__).resolve().parents[1] / "dataset" / "slidebench"
    mcq_out = repo / "SlideBench-VQA-TCGA.output.example.csv"
    # an MCQ output's Answer column holds letters: not reference captions
    assert main(["eval", "caption", str(mcq_out)]) == 1
    one_line_error(caplog, str(mcq_out), "option letters")
    assert main(["eval", "caption", str(mcq_out), "--ref-column", "Answer"]) == 0  # insisted on
    # a caption output has no options to check an Answer against
    cap_out = write_csv(tmp_path / "cap_out.csv", ["Slide", "Answer", "Output", "Error"],
                        [["s1", "B", "B", ""]])
    assert main(["eval", "mcq", str(cap_out)]) == 1
    one_line_error(caplog, str(cap_out), "no option columns")


def test_slidechat_test_refuses_a_csv_without_question(setup, tmp_path, caplog):
    from slidechat.cli.main import main

    rows = read_rows(setup["csv"])
    cols = [c for c in COLUMNS if c != "Question"]
    bad = write_csv(tmp_path / "noq.csv", cols, [[r[c] for c in cols] for r in rows])
    out = tmp_path / "out.csv"
    argv = ["test", str(CONFIG), "--checkpoint", str(setup["ckpt"]), "--test_slide_csv", str(bad),
            "--test_output_csv", str(out), "--feature_root", str(setup["feats"]),
            "--max_new_tokens", str(MAX_NEW), "--work-dir", str(tmp_path / "wd"),
            "--cfg-options", *cfg_option_args(setup["overrides"])]
    assert main(argv) == 1
    one_line_error(caplog, str(bad), "'Question'")
    assert not out.exists()


# --------------------------------------------------------------------------- prompt length in testing

class _SpyTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, tok):
        self._tok = tok
        self.lengths = []

    def __call__(self, text, *a, **k):
        self.lengths.append(len(text))
        return self._tok(text, *a, **k)

    def encode(self, text, *a, **k):
        self.lengths.append(len(text))
        return self._tok.encode(text, *a, **k)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_dataset_refuses_long_prompts_before_tokenizing(setup):
    from transformers import AutoTokenizer

    from slidechat.data.limits import prompt_limit
    from slidechat.data.slidebench_dataset import SlideBenchTestDataset, slidebench_collate_fn
    from slidechat.data.slidebench import SlideBenchItem

    tok = _SpyTokenizer(AutoTokenizer.from_pretrained(setup["llm"]))
    feat = setup["feats"] / "BRCA" / "TCGA-00.h5"
    items = [SlideBenchItem(i, f"q{i}", {}, q, feat) for i, q in
             enumerate(["<image>\nWhat is seen?", "<image>\n" + "x" * HUGE, "<image>\n" + "word " * 300,
                        "<image>\nAnd here?"])]
    limit = prompt_limit(context_length=32768, max_new_tokens=500, max_prompt_tokens=200)
    ds = SlideBenchTestDataset(items, tok, feature_dim=512, max_patches=64, prompt_limit=limit)
    batch = slidebench_collate_fn([ds[i] for i in range(len(ds))])
    assert batch["data"]["rows"] == [0, 3]  # the rest of the batch is kept
    assert "5,000,008 characters" in items[1].error and "3,200" in items[1].error
    assert "tokens > max_prompt_tokens 200" in items[2].error
    assert items[0].ok and items[3].ok
    assert max(tok.lengths) < 10_000  # the 5 MB prompt was never tokenized


def test_default_cap_comes_from_the_model_context(setup):
    from slidechat.apps.chat import load_chat_model
    from slidechat.data.limits import model_prompt_limit

    model, _ = load_chat_model(setup["exported"])
    ctx = model.llm.config.max_position_embeddings
    assert model_prompt_limit(model, 500).max_tokens == ctx - 500
    assert model_prompt_limit(model, 500, 77).max_tokens == 77
    with pytest.raises(SlideChatError, match="no room"):
        model_prompt_limit(model, ctx)


def _huge_csv(setup, path: Path, huge_row: int, question: str) -> Path:
    rows = read_rows(setup["csv"])
    rows[huge_row]["Question"] = question
    return write_csv(path, COLUMNS, [[r[c] for c in COLUMNS] for r in rows])


RUN_SCRIPT = textwrap.dedent("""
    import sys
    from unittest import mock
    from slidechat.cli.main import main
    from slidechat.engine.train_model import SlideChatTrainModel
    die_at = int(sys.argv[1])
    real, calls = SlideChatTrainModel.predict, {"n": 0}
    def predict(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)
    with mock.patch.object(SlideChatTrainModel, "predict", predict):
        sys.exit(main(sys.argv[2:]))
""")


def test_huge_question_gets_an_error_row_and_resume_moves_on(setup, tmp_path):
    """A 5 MB question in the second batch: the first run is killed before that batch, the resumed run
    writes an Error for it, answers the other rows of its batch and finishes (default cap, no flag).
    Subprocesses with a timeout: without a cap this run would not finish."""
    huge_row = BATCH + 1
    src = _huge_csv(setup, tmp_path / "huge.csv", huge_row, "What is seen? " + "x" * HUGE)
    out = tmp_path / "out.csv"
    argv = ["test", str(CONFIG), "--checkpoint", str(setup["ckpt"]), "--test_slide_csv", str(src),
            "--test_output_csv", str(out), "--feature_root", str(setup["feats"]),
            "--batch_size", str(BATCH), "--max_new_tokens", str(MAX_NEW), "--work-dir", str(tmp_path / "wd"),
            "--cfg-options", *cfg_option_args(setup["overrides"])]

    def run(die_at: int):
        return subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(die_at), *argv], env=ENV,
                              capture_output=True, text=True, timeout=300)

    first = run(2)  # killed when the second batch (the one with the huge row) starts generating
    assert first.returncode == 130, first.stderr[-3000:]
    assert [r["ID"] for r in read_rows(out)] == [f"q{i}" for i in range(BATCH)]
    second = run(0)  # resume
    assert second.returncode == 0, second.stderr[-3000:]
    rows = pd.read_csv(out, dtype=str, keep_default_na=False).to_dict("records")  # a 5 MB field
    ref = read_rows(setup["csv"])
    assert [r["ID"] for r in rows] == [r["ID"] for r in ref]
    assert rows[huge_row]["Error"].startswith("prompt too long") and rows[huge_row]["Output"] == ""
    for i in range(BATCH, 2 * BATCH):  # the rest of the huge row's batch was answered
        if i != huge_row and ref[i]["ID"] != "q3":
            assert rows[i]["Error"] == "" and rows[i]["Output"].strip(), rows[i]
    rep = json.loads(Path(str(out) + ".report.json").read_text())
    assert rep["n_rows"] == len(ref) and rep["mcq"]["overall"]["errors"] == 2  # missing features + huge
    # (reopening an output that holds the 5 MB field: tests/test_slidebench_io.py, fields over the csv
    # module's limit)


def test_max_prompt_tokens_flag(setup, tmp_path):
    from slidechat.cli.main import main

    long_row = 1
    src = _huge_csv(setup, tmp_path / "long.csv", long_row, "Describe " + "the tissue " * 100)
    out = tmp_path / "out.csv"
    argv = ["test", str(CONFIG), "--checkpoint", str(setup["ckpt"]), "--test_slide_csv", str(src),
            "--test_output_csv", str(out), "--feature_root", str(setup["feats"]), "--batch_size", "4",
            "--max_new_tokens", str(MAX_NEW), "--max-prompt-tokens", "120", "--work-dir", str(tmp_path / "wd"),
            "--cfg-options", *cfg_option_args(setup["overrides"])]
    assert main(argv) == 0
    rows = read_rows(out)
    assert "tokens > max_prompt_tokens 120" in rows[long_row]["Error"]
    assert all(r["Output"].strip() for i, r in enumerate(rows) if i not in (long_row, 3))


# --------------------------------------------------------------------------- chat

def _chat(setup, stdin: bytes, *extra):
    feats = setup["feats"] / "BRCA" / "TCGA-00.h5"
    cmd = [str(BIN / "slidechat"), "chat", "--checkpoint", str(setup["exported"]), "--features", str(feats),
           "--max-new-tokens", "4", "--jsonl", *extra]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=ENV, timeout=300)


def test_chat_survives_invalid_utf8_and_over_long_inputs(setup):
    """Default caps (no flags): a line that is not UTF-8 is answered with replacement characters and a
    warning; a 5 MB line is refused unread; a 200,000-character line (under the character cap) is
    refused on its token count; the conversation goes on after each."""
    stdin = (b"What tissue is this?\n"
             b"Is it \xff\xfe malignant \xc3(?\n"  # not UTF-8
             + b"y" * HUGE + b"\n"  # over the character cap: refused unread
             + ("word " * 40_000).encode() + b"\n"  # under the character cap, over the token cap
             + b"Anything else?\nexit\n")
    res = _chat(setup, stdin)
    err = res.stderr.decode("utf-8", errors="replace")
    assert res.returncode == 0, err[-3000:]
    lines = [json.loads(ln) for ln in res.stdout.decode("utf-8").splitlines()]
    assert [ln.get("turn") for ln in lines] == [1, 2, None, None, 3]
    assert lines[1]["question"] == "Is it \ufffd\ufffd malignant \ufffd(?"
    assert "input refused: over" in lines[2]["error"] and "characters" in lines[2]["error"]
    assert "tokens > max_prompt_tokens" in lines[3]["error"]
    assert "not valid UTF-8" in err and err.count("input refused") == 2
    assert "Traceback" not in err


def test_chat_flags_set_the_caps(setup):
    stdin = b"Short question?\n" + b"z" * 500 + b"\n" + ("the tissue " * 30).encode() + b"\nexit\n"
    res = _chat(setup, stdin, "--max-input-chars", "400", "--max-prompt-tokens", "60")
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    lines = [json.loads(ln) for ln in res.stdout.decode("utf-8").splitlines()]
    assert [ln.get("turn") for ln in lines] == [1, None, None]
    assert "over 400 characters" in lines[1]["error"]
    assert "tokens > max_prompt_tokens 60" in lines[2]["error"]


def test_chat_session_refuses_and_continues(setup):
    from slidechat.apps.chat import ChatSession, load_chat_model
    from slidechat.data.limits import InputRefused
    from slidechat.features.io import load_features

    model, tok = load_chat_model(setup["exported"])
    feats, coords = load_features(setup["feats"] / "LUAD" / "TCGA-01.h5")
    s = ChatSession(model, tok, feats, coords, max_new_tokens=3, max_prompt_tokens=60)
    assert s.ask("What is seen?")
    with pytest.raises(InputRefused, match="reset"):
        s.ask("more " * 80)
    assert len(s.history) == 1  # the refused turn left the conversation as it was
    assert s.ask("And now?") and len(s.history) == 2
    default = ChatSession(model, tok, feats, coords, max_new_tokens=3)
    assert default.prompt_limit.max_tokens == model.llm.config.max_position_embeddings - 3


# --------------------------------------------------------------------------- encoder padding in exports

def test_exported_padding_mode_round_trips_and_legacy_loads_masked(setup, tmp_path):
    from slidechat.apps.chat import load_chat_model
    from slidechat.engine.overrides import parse_cfg_options
    from slidechat.model.slidechat_model import SlideChatModel

    meta = json.loads((setup["exported"] / "slidechat_config.json").read_text())
    assert meta["encoder"]["padding"] == "torchscale"  # the default is written out explicitly
    legacy = Path(shutil.copytree(setup["exported"], tmp_path / "legacy"))
    del meta["encoder"]["padding"]  # a folder exported before the option existed
    (legacy / "slidechat_config.json").write_text(json.dumps(meta))
    assert SlideChatModel.from_pretrained(legacy).LongNet_encoder.config.padding == "masked"
    opts = parse_cfg_options(cfg_option_args(setup["overrides"]))
    model, _ = load_chat_model(legacy, CONFIG, opts)  # config + exported folder: the folder's mode wins
    assert model.LongNet_encoder.config.padding == "masked"
    assert model.LongNet_encoder.layers[0].self_attn.padding == "masked"
    again = SlideChatModel.from_pretrained(setup["exported"])
    assert again.LongNet_encoder.layers[0].self_attn.padding == "torchscale"
