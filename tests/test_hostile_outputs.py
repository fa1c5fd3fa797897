"""Hostile outputs and inputs (issue 16): the one output-folder rule (``slidechat.utils.outputs``), atomic
exports, extraction jobs sharing one ``--out``, OSErrors as one line, stdout holding results only, and inputs
checked before a model loads. CLI cases run ``slidechat`` in a subprocess and check: the exit status, one error
line naming the path, no traceback, and the user's files intact byte for byte."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_testing import CONFIG, build_tiny_setup, cfg_option_args  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CYTO_SFT = REPO / "configs" / "tiny" / "cytochat_sft.py"
# the CLI subprocesses import slidechat from this checkout (not whichever one the venv has installed)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


@pytest.fixture(scope="module")
def tiny_qwen2vl(tmp_path_factory):
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("hostile_qwen2vl") / "tiny_qwen2vl")


def slidechat(*argv: str, cwd=None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "slidechat"), *map(str, argv)], input=stdin, capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def one_error_line(res: subprocess.CompletedProcess, *must_name: object) -> str:
    """Exit 1, no traceback, exactly one ERROR line, naming each of ``must_name``."""
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, res.stderr[-3000:]
    for name in must_name:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Dict[str, bytes]:
    """A folder of the user's own files (including names our outputs also use)."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes, not a model\n")
    (path / "failures.csv").write_text("patient,reason\nP1,my own table\n")
    return snapshot(path)


def slide_export_args(setup, out) -> List[str]:
    return ["export", CONFIG, "--checkpoint", setup["ckpt"], "--out", out,
            "--cfg-options", *cfg_option_args(setup["overrides"])]


def cyto_export_args(tiny, out) -> List[str]:
    return ["export", CYTO_SFT, "--out", out, "--cfg-options", f"model.model_name_or_path={tiny}",
            f"train_dataloader.dataset.processor={tiny}"]


# ------------------------------------------------------------------------------------------ exports

def test_slide_export_into_a_user_folder_is_refused_and_overwrite_keeps_the_users_files(setup, tmp_path):
    from slidechat.model.slidechat_model import SlideChatModel

    out = tmp_path / "mine"
    before = user_folder(out)
    one_error_line(slidechat(*slide_export_args(setup, out)), out)
    assert snapshot(out) == before  # refused: nothing written, nothing deleted
    # --overwrite: the export is written there, the user's other files stay byte for byte
    res = slidechat(*slide_export_args(setup, out), "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    after = snapshot(out)
    assert {k: after[k] for k in before} == before
    SlideChatModel.from_pretrained(out)
    # re-exporting into that (now our) folder needs no flag, replaces the export, keeps the user's files
    res = slidechat(*slide_export_args(setup, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    SlideChatModel.from_pretrained(out)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".partial", ".old"))]


def test_export_to_an_existing_file_or_under_a_file_is_one_line(setup, tiny_qwen2vl, tmp_path):
    afile = tmp_path / "model.bin"
    afile.write_bytes(b"the user's file")
    for args in (slide_export_args(setup, afile), cyto_export_args(tiny_qwen2vl, afile),
                 slide_export_args(setup, afile / "out")):
        one_error_line(slidechat(*args), afile)
        assert afile.read_bytes() == b"the user's file"


def _make_unwritable(folder: Path) -> None:
    """Root ignores permission bits, so as root the folder is made immutable (``chattr +i``: root respects
    it); as another user a plain chmod does. The test checks that writing really fails."""
    if os.geteuid() == 0:
        res = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        assert res.returncode == 0, f"chattr +i is needed to make a folder unwritable as root: {res.stderr}"
    else:
        folder.chmod(0o555)
    with pytest.raises(OSError):
        (folder / "probe").write_text("x")


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def test_export_into_a_read_only_folder_is_one_line_for_both_families(setup, tiny_qwen2vl, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    _make_unwritable(ro)
    try:
        for args in (slide_export_args(setup, ro), cyto_export_args(tiny_qwen2vl, ro)):
            line = one_error_line(slidechat(*args), ro)
            assert "not writable" in line, line
            assert list(ro.iterdir()) == []
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ro.")]  # no staged leftovers
    finally:
        _make_writable(ro)


def test_a_crash_during_slide_export_leaves_the_previous_export_intact(setup, tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from slidechat.model.slidechat_model import SlideChatModel

    out = tmp_path / "export"
    model = SlideChatModel.from_pretrained(setup["exported"])
    model.save_pretrained(out)
    before = snapshot(out)
    with torch.no_grad():  # a different model: its llm/ would differ from the one on disk
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated) while saving the slide modules")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(out)
    monkeypatch.undo()
    assert snapshot(out) == before  # not a mix of a new llm/ and old slide modules
    SlideChatModel.from_pretrained(out)
    assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # the staged copy is gone


# --------------------------------------------------------------------------------------- extraction

def test_extract_features_out_empty_or_a_user_folder_is_refused(synthetic_slides, tmp_path):
    cwd = tmp_path / "cwd"
    before = user_folder(cwd)
    res = slidechat("extract-features", synthetic_slides["tumor20"], "--out", "", "--encoder", "tiny_test",
                    "--no-progress", cwd=cwd)
    one_error_line(res, "--out")
    assert snapshot(cwd) == before and sorted(os.listdir(cwd)) == ["failures.csv", "notes.txt"]
    # a non-empty folder that holds no extraction of ours: refused, even with --overwrite (it redoes slides)
    for extra in ((), ("--overwrite",)):
        res = slidechat("extract-features", synthetic_slides["tumor20"], "--out", cwd, "--encoder", "tiny_test",
                        "--no-progress", *extra)
        one_error_line(res, cwd)
        assert snapshot(cwd) == before and sorted(os.listdir(cwd)) == ["failures.csv", "notes.txt"]


def test_screen_into_a_user_folder_is_refused_before_the_model_loads(synthetic_slides, tmp_path):
    out = tmp_path / "mine"
    before = user_folder(out)
    res = slidechat("screen", synthetic_slides["tumor20"], "--model_name_or_path", tmp_path / "no_model",
                    "--out", out, "--no-progress")
    one_error_line(res, out)  # the folder, not the (missing) model: checked first
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["failures.csv", "notes.txt"]


DONE_LINE = re.compile(r"slidechat\.apps\.extract: (.+?) \(\d+px@[\d.]+x\): ")


def test_two_extraction_jobs_on_one_out_share_the_slides(synthetic_slides, extracted, tmp_path):
    """A re-queued cluster job next to the first one: each slide is encoded by exactly one of them."""
    out = tmp_path / "feats"
    cmd = [str(BIN / "slidechat"), "extract-features", str(synthetic_slides["dir"]), "--out", str(out),
           "--encoder", "tiny_test", "--no-progress", "--num-workers", "0"]
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for _ in range(2)]
    logs = [job.communicate(timeout=600)[1] for job in jobs]
    assert "Traceback" not in "".join(logs), logs
    done = [DONE_LINE.findall(log) for log in logs]  # one line per slide a job encoded and wrote
    expected = sorted(extracted[1]["done"])
    assert sorted(done[0] + done[1]) == expected, done  # every good slide once: none redone, none lost
    assert not set(done[0]) & set(done[1])
    assert sorted(p.stem for p in (out / "h5_files").glob("*.h5")) == expected
    with open(out / "failures.csv", newline="") as fh:  # both jobs' failures, none dropped by the other
        failed = {r["slide"] for r in csv.DictReader(fh)}
    assert failed == {f["slide"] for f in extracted[1]["failed"]}


# ---------------------------------------------------------------------------- CLI errors and stdout

def test_oserror_about_a_path_is_one_line_and_other_errors_still_raise(monkeypatch, caplog):
    import slidechat.cli.infer as infer_cli
    from slidechat.cli.main import main

    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/out/preds.jsonl")

    monkeypatch.setattr(infer_cli, "run", denied)
    caplog.set_level(logging.ERROR)
    assert main(["infer", "--model_name_or_path", "m"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["/data/out/preds.jsonl: Permission denied"]

    def bug(args):
        raise KeyError("a programming error")

    monkeypatch.setattr(infer_cli, "run", bug)
    with pytest.raises(KeyError):  # not swallowed
        main(["infer", "--model_name_or_path", "m"])


def test_chat_jsonl_with_config_prints_json_lines_only(setup):
    res = slidechat("chat", "--checkpoint", setup["ckpt"], "--config", CONFIG,
                    "--features", setup["feats"] / "BRCA" / "TCGA-00.h5", "--max-new-tokens", "4", "--jsonl",
                    "--cfg-options", *cfg_option_args(setup["overrides"]), stdin="What is this?\nexit\n")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout
    assert json.loads(lines[0])["turn"] == 1  # stdout: JSON lines only (logs are on stderr)


def test_chat_checks_its_input_before_loading_the_model(setup, tmp_path):
    missing = tmp_path / "no_such_features.h5"
    no_llm = str(tmp_path / "no_llm")  # were the model loaded first, this would be the error
    opts = {k: (no_llm if v == str(setup["llm"]) else v) for k, v in setup["overrides"].items()}
    res = slidechat("chat", "--checkpoint", setup["ckpt"], "--config", CONFIG, "--features", missing,
                    "--cfg-options", *cfg_option_args(opts))
    one_error_line(res, missing)
    assert no_llm not in res.stderr


def test_slidechat_test_checks_the_csv_before_the_model_loads(setup, tmp_path):
    """The LLM path does not exist: the CSV's missing column must be the error, so nothing was loaded."""
    with open(setup["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad = tmp_path / "no_slide_column.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "Slide"])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k != "Slide"} for r in rows)
    no_llm = tmp_path / "no_llm"
    opts = {k: (str(no_llm) if v == str(setup["llm"]) else v) for k, v in setup["overrides"].items()}
    res = slidechat("test", CONFIG, "--checkpoint", setup["ckpt"], "--test_slide_csv", bad,
                    "--test_output_csv", tmp_path / "out.csv", "--feature_root", setup["feats"],
                    "--work-dir", tmp_path / "wd", "--cfg-options", *cfg_option_args(opts))
    line = one_error_line(res, bad)
    assert "Slide" in line and str(no_llm) not in res.stderr
    assert not (tmp_path / "out.csv").exists()


def test_infer_checks_the_dataset_images_before_the_model_loads(tmp_path):
    row = {"messages": [{"role": "user", "content": "<image>What is seen?"},
                        {"role": "assistant", "content": "A."}], "images": ["fields/f0.png"]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    no_model = tmp_path / "no_model"  # were the model loaded first, this would be the error
    res = slidechat("infer", "--model_name_or_path", no_model, "--dataset", data, "--dataset_dir", tmp_path,
                    "--save_name", tmp_path / "preds.jsonl", "--no_progress")
    line = one_error_line(res, tmp_path)
    assert "image" in line and str(no_model) not in res.stderr
    assert not (tmp_path / "preds.jsonl").exists()


def test_help_lists_both_families():
    res = slidechat("--help")
    assert res.returncode == 0
    assert "cytology" in res.stdout.lower() and "slide" in res.stdout.lower()
    lines = res.stdout.splitlines()
    for cmd in ("extract-features", "train", "export", "test", "infer", "eval", "screen", "chat", "demo"):
        i = next(i for i, x in enumerate(lines) if x.split()[:1] == [cmd])
        entry = " ".join(lines[i:i + 2])  # a long command name puts its help on the next line
        assert "[slides" in entry or "[cytology" in entry, entry
