"""SlideBench testing: stock ``xtuner test`` and ``slidechat test`` give the same output CSV; kill and
resume; missing features; exported folders; checkpoint key checks (tiny Qwen2, CPU)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "stage_2.py"
BIN = Path(sys.executable).parent
N_ROWS = 10
MISSING_ROW = 3  # its feature file is never written
BATCH = 4
MAX_NEW = 8
COLUMNS = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D",
           "Answer"]


def build_tiny_setup(root: Path) -> dict:
    """Tiny LLM, random H5 features, a SlideBench-TCGA-style CSV, a random-init checkpoint (.pth, as
    mmengine saves it) and its exported folder. Built once per session (the folder is reused)."""
    done = root / "READY"
    info = {"root": root, "llm": root / "tiny_llm", "feats": root / "feats", "csv": root / "bench.csv",
            "ckpt": root / "ckpt.pth", "exported": root / "exported"}
    info["overrides"] = {"llm_name_or_path": str(info["llm"]),
                         "tokenizer.pretrained_model_name_or_path": str(info["llm"]),
                         "model.llm.pretrained_model_name_or_path": str(info["llm"]),
                         "model.pretrained_pth": None}
    if done.is_file():
        return info
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from slidechat.features.io import write_feature_h5
    from slidechat.model.tiny_llm import make_tiny_llm

    root.mkdir(parents=True, exist_ok=True)
    make_tiny_llm(info["llm"])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_ROWS):
        tumor = ("BRCA", "LUAD")[i % 2]
        n = int(rng.integers(20, 60))
        if i != MISSING_ROW:
            (info["feats"] / tumor).mkdir(parents=True, exist_ok=True)
            write_feature_h5(info["feats"] / tumor / f"TCGA-{i:02d}.h5",
                             rng.normal(size=(n, 512)).astype(np.float32),
                             np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64))
        rows.append([f"q{i}", f"TCGA-{i:02d}", tumor, "Diagnosis", "Type", f"What is seen in slide {i}?",
                     "tumor", "normal", "necrosis", "" if i % 3 else "inflammation", "ABC"[i % 3]])
    with open(info["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(info["overrides"])
    torch.manual_seed(0)
    model = BUILDER.build(cfg.model)
    torch.save({"meta": {}, "state_dict": model.state_dict()}, info["ckpt"])
    tok = BUILDER.build(cfg.tokenizer)
    model.core.save_pretrained(info["exported"], tokenizer=tok)
    done.write_text("ok")
    return info


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


def cfg_option_args(overrides: dict) -> list:
    return [f"{k}={'None' if v is None else v}" for k, v in overrides.items()]


def slidechat_test(setup, out, *extra, checkpoint=None, work_dir=None):
    from slidechat.cli.main import main

    argv = ["test", str(CONFIG), "--checkpoint", str(checkpoint or setup["ckpt"]),
            "--test_slide_csv", str(setup["csv"]), "--test_output_csv", str(out),
            "--feature_root", str(setup["feats"]), "--batch_size", str(BATCH),
            "--max_new_tokens", str(MAX_NEW), "--work-dir", str(work_dir or Path(out).parent / "wd"),
            *extra, "--cfg-options", *cfg_option_args(setup["overrides"])]
    return main(argv)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out.csv"
    assert slidechat_test(setup, out) == 0
    return out


def test_slidechat_test_output_and_report(setup, reference):
    rows = read_rows(reference)
    assert [r["ID"] for r in rows] == [f"q{i}" for i in range(N_ROWS)]
    assert list(rows[0].keys()) == COLUMNS + ["Output", "Pred", "Error"]
    for i, r in enumerate(rows):
        if i == MISSING_ROW:
            assert "feature file not found" in r["Error"] and r["Output"] == ""
        else:
            assert r["Error"] == "" and r["Output"].strip() != ""
    rep = json.loads(Path(str(reference) + ".report.json").read_text())
    assert rep["n_rows"] == N_ROWS and rep["n_errors"] == 1
    assert rep["mcq"]["overall"]["n"] == N_ROWS and rep["mcq"]["overall"]["errors"] == 1
    assert "accuracy" in Path(str(reference) + ".report.md").read_text()


def test_stock_xtuner_test_gives_the_same_csv(setup, reference, tmp_path):
    """``xtuner test CONFIG --checkpoint CKPT --cfg-options test_slide_csv=...`` (subprocess)."""
    out = tmp_path / "xtuner_out.csv"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")
    xtuner = shutil.which("xtuner", path=env["PATH"])
    assert xtuner is not None
    cmd = [xtuner, "test", str(CONFIG), "--checkpoint", str(setup["ckpt"]), "--work-dir", str(tmp_path / "wd"),
           "--cfg-options", *cfg_option_args(setup["overrides"]), f"test_slide_csv={setup['csv']}",
           f"test_output_csv={out}", f"feature_root={setup['feats']}", f"test_batch_size={BATCH}",
           f"max_new_tokens={MAX_NEW}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    log = "".join(p.read_text() for p in (tmp_path / "wd").glob("*/*.log"))
    assert "load_state_dict:" in log and "missing none; unexpected none" in log
    assert "slidebench/accuracy" in log


def test_exported_folder_checkpoint_same_output(setup, reference, tmp_path):
    out = tmp_path / "out.csv"
    assert slidechat_test(setup, out, checkpoint=setup["exported"]) == 0
    assert out.read_bytes() == reference.read_bytes()


def test_kill_and_resume_exactly_once(setup, reference, tmp_path):
    from slidechat.engine.train_model import SlideChatTrainModel

    out = tmp_path / "out.csv"
    real = SlideChatTrainModel.predict
    calls = {"n": 0}

    def dying_predict(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    with mock.patch.object(SlideChatTrainModel, "predict", dying_predict):
        assert slidechat_test(setup, out) == 130  # Ctrl-C exit code of the CLI
    partial = read_rows(out)
    assert [r["ID"] for r in partial] == [f"q{i}" for i in range(BATCH)]  # the first batch only
    assert slidechat_test(setup, out) == 0  # resumes at row BATCH
    assert out.read_bytes() == reference.read_bytes()
    # once complete, a rerun adds nothing; --overwrite starts again and gives the same answers
    assert slidechat_test(setup, out) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert slidechat_test(setup, out, "--overwrite") == 0
    assert out.read_bytes() == reference.read_bytes()


def test_missing_test_keys_and_bad_checkpoint(setup, tmp_path):
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from slidechat.engine.testing import TestSettings
    from slidechat.utils.errors import SlideChatError

    with pytest.raises(SlideChatError, match="test_slide_csv"):
        TestSettings.from_cfg({"test_output_csv": "x.csv"})
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(setup["overrides"])
    model = BUILDER.build(cfg.model)
    sd = torch.load(setup["ckpt"], weights_only=True)["state_dict"]
    bad = dict(sd)
    key = "projector.model.0.weight"
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(SlideChatError, match="do not fit the model: projector.model.0.weight"):
        model.load_state_dict(bad, strict=False)
    partial = {k: v for k, v in sd.items() if not k.startswith("projector.")}
    partial["junk.weight"] = torch.zeros(1)
    # strict=False (what xtuner test passes) does not relax the check: the trained modules are required
    with pytest.raises(SlideChatError, match=r"lacks required weights: 4 keys: projector.model.*"):
        model.load_state_dict(partial, strict=False)
    model.allow_partial = True  # --cfg-options model.allow_partial=True
    res = model.load_state_dict(partial, strict=False)
    assert any(k.startswith("projector.") for k in res.missing_keys)
    assert res.unexpected_keys == ["junk.weight"]
    model.allow_partial = False
    res = model.load_state_dict(sd, strict=True)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert torch.equal(model.state_dict()[key], sd[key])  # loading copies the tensor: exact


def test_score_output_captions_uses_the_readers_reference_column(tmp_path):
    import shutil

    import pandas as pd

    from slidechat.engine.testing import score_output
    from slidechat.evaluation.captions import caption_metrics

    src = Path(__file__).resolve().parents[1] / "dataset/slidebench/SlideBench-Caption.output.example.csv"
    out = Path(shutil.copy(src, tmp_path / "captions_out.csv"))
    report = score_output(out, "caption")
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected = caption_metrics(df["Output"].tolist(), df["Caption"].tolist(), per_row=False)["corpus"]
    assert report.caption["ref_column"] == "Caption"
    assert report.caption["corpus"] == pytest.approx(expected)
    assert (tmp_path / "captions_out.csv.report.md").is_file()
