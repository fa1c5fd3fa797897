"""The slide model follows the features: the H5 provenance says which encoder wrote a feature folder; two
encoders, or a width other than ``feature_dim``, are refused in one line at training and test time; stage
1 -> stage 2 -> ``slidechat test`` run on 1,536-d and 2,560-d features with the tiny LLM (CPU)."""

from __future__ import annotations

import csv
import logging
import sys
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from slidechat.engine.overrides import path_overrides
from slidechat.features.io import (UNKNOWN_ENCODER, check_feature_provenance, read_feature_provenance,
                                   write_feature_h5, write_slidechat_csv)
from slidechat.utils.errors import SlideChatError
from train_data import LABELS, slide_train_demo

REPO = Path(__file__).resolve().parents[1]
TINY1 = REPO / "configs/tiny/stage_1.py"
TINY2 = REPO / "configs/tiny/stage_2.py"


@pytest.fixture(scope="module")
def uni2_h_attrs():
    """The root attributes ``extract-features --encoder uni2_h`` writes, from the encoder itself (random
    weights; one block, whose marks -- ``encoder_depth`` and the name's ``@depth1`` -- are taken off, as
    the full model has none)."""
    from slidechat.features.encoders import build_encoder

    attrs = build_encoder("uni2_h", load_weights=False, depth=1).provenance()
    assert attrs.pop("encoder_depth") == "1" and attrs["encoder"] == "uni2_h@depth1"
    return dict(attrs, encoder="uni2_h")


@pytest.fixture(scope="module")
def tiny_attrs():
    from slidechat.features.encoders import build_encoder

    return build_encoder("tiny_test").provenance()


def virchow2_attrs(uni2_h_attrs):
    """Virchow2's provenance as written by hand (the preset lives in another module): 2,560-d, the card's
    class token + mean patch token (https://huggingface.co/paige-ai/Virchow2)."""
    return dict(uni2_h_attrs, encoder="virchow2", encoder_preset="virchow2", encoder_embed_dim="2560")


def h5(path: Path, dim: int, attrs=None, n: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    write_feature_h5(path, feats, np.zeros((n, 2), np.int64), file_attrs=attrs)
    return path


def test_provenance_is_read_from_the_root_attributes(tmp_path, uni2_h_attrs):
    p = read_feature_provenance(h5(tmp_path / "a.h5", 1536, uni2_h_attrs))
    assert (p.encoder, p.embed_dim, p.preset, p.preset_version, p.checkpoint_sha256) == (
        "uni2_h", 1536, uni2_h_attrs["encoder_preset"], uni2_h_attrs["encoder_preset_version"], "none")
    assert p.known
    # CLAM/TRIDENT H5 (no root attributes), SlideChat CSV: unknown
    assert read_feature_provenance(h5(tmp_path / "clam.h5", 1024)).encoder == UNKNOWN_ENCODER
    write_slidechat_csv(tmp_path / "s.csv", np.zeros((2, 8), np.float32))
    assert not read_feature_provenance(tmp_path / "s.csv").known
    bad = dict(uni2_h_attrs, encoder_embed_dim="wide")
    with pytest.raises(SlideChatError, match="encoder_embed_dim is 'wide'"):
        read_feature_provenance(h5(tmp_path / "bad.h5", 4, bad))


def test_two_encoders_are_refused_naming_a_file_of_each(tmp_path, uni2_h_attrs, tiny_attrs):
    a = h5(tmp_path / "f" / "a.h5", 1536, uni2_h_attrs)
    b = h5(tmp_path / "f" / "b.h5", 512, tiny_attrs)
    with pytest.raises(SlideChatError) as e:
        check_feature_provenance([a, a, b], None)
    msg = str(e.value)
    assert "\n" not in msg and "two encoders" in msg
    assert str(a) in msg and str(b) in msg and "uni2_h" in msg and "tiny_test" in msg
    # same name, other weights (or another preset version): other features, also refused
    other = h5(tmp_path / "f" / "c.h5", 1536, dict(uni2_h_attrs, encoder_checkpoint_sha256="ab" * 32))
    with pytest.raises(SlideChatError, match="two encoders.*weights sha256 abababababab"):
        check_feature_provenance([a, other], 1536)
    newer = h5(tmp_path / "f" / "d.h5", 1536, dict(uni2_h_attrs, encoder_preset_version="2"))
    with pytest.raises(SlideChatError, match="preset version 2"):
        check_feature_provenance([a, newer], 1536)


def test_a_width_other_than_feature_dim_is_refused(tmp_path, uni2_h_attrs):
    a = h5(tmp_path / "a.h5", 1536, uni2_h_attrs)
    with pytest.raises(SlideChatError) as e:
        check_feature_provenance([a], 512)
    msg = str(e.value)
    assert "\n" not in msg and str(a) in msg
    assert "features of encoder uni2_h are 1536-d, the config's feature_dim is 512" in msg
    assert "set feature_dim = 1536" in msg
    assert check_feature_provenance([a], 1536).encoder == "uni2_h"


def test_files_without_provenance(tmp_path, uni2_h_attrs, caplog):
    clam = [h5(tmp_path / f"c{i}.h5", 1024) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="slidechat.features.io"):
        assert check_feature_provenance(clam, 512) is None  # nothing recorded: load_features checks widths
        assert not caplog.records
        known = h5(tmp_path / "k.h5", 1536, uni2_h_attrs)
        assert check_feature_provenance([known, *clam], 1536).encoder == "uni2_h"
    assert len(caplog.records) == 1 and "2 feature file(s) record no encoder" in caplog.text
    assert str(clam[0]) in caplog.text and "uni2_h" in caplog.text


def test_provenance_is_read_once_per_file_version(tmp_path, uni2_h_attrs, tiny_attrs):
    import h5py

    a = h5(tmp_path / "a.h5", 1536, uni2_h_attrs)
    with mock.patch.object(h5py, "File", wraps=h5py.File) as opened:
        for _ in range(3):
            read_feature_provenance(a)
        assert opened.call_count <= 1  # 0 when an earlier test already read this version of the file
        h5(a, 512, tiny_attrs)  # rewritten: a new version is read again
        assert read_feature_provenance(a).encoder == "tiny_test"


# --------------------------------------------------------------------------- acceptance

def xtuner_train(config, work_dir, options):
    from xtuner.tools import train

    argv = ["train.py", str(config), "--work-dir", str(work_dir), "--cfg-options", *options,
            f"experiment_name=test_{uuid.uuid4().hex[:8]}"]
    with mock.patch.object(sys, "argv", argv):
        train.main()


def bench_csv(path: Path, slides) -> Path:
    """A SlideBench-style MCQ CSV (no Tumor column: features at ``{feature_root}/{Slide}``)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Slide", "Question", "A", "B", "C", "D", "Answer"])
        for i, s in enumerate(slides):
            w.writerow([f"q{i}", s, "What does the slide show?", *LABELS, "ABCD"[i % 4]])
    return path


def slidechat_test(config, checkpoint, csv_path, out, feature_root, options):
    from slidechat.cli.main import main

    return main(["test", str(config), "--checkpoint", str(checkpoint), "--test_slide_csv", str(csv_path),
                 "--test_output_csv", str(out), "--feature_root", str(feature_root), "--batch_size", "4",
                 "--max_new_tokens", "4", "--work-dir", str(Path(out).parent / "wd"), "--cfg-options", *options])


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from slidechat.model.tiny_llm import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm") / "llm")


@pytest.mark.parametrize("dim", [1536, 2560])
def test_stage1_stage2_test_on_wide_features(tmp_path, tiny_llm, uni2_h_attrs, dim, caplog):
    """The tiny pipeline on another encoder's features, the config changed in ``feature_dim`` only (and
    the paths): stage 1 trains the input projection with the LongNet and projector, stage 2 loads it,
    ``slidechat test`` answers every row; features of a width the model was not built for are refused."""
    attrs = uni2_h_attrs if dim == 1536 else virchow2_attrs(uni2_h_attrs)
    demo = slide_train_demo(tmp_path, feature_dim=dim, file_attrs=attrs, llm=tiny_llm)
    # one epoch of the 8 caption rows per stage (4 steps each): this checks the plumbing at another width,
    # test_train that the tiny model learns; the warmup is moved inside the one epoch
    short = ["train_cfg.max_epochs=1", "param_scheduler.0.end=0.5", "param_scheduler.1.begin=0.5",
             "param_scheduler.1.end=1"]
    xtuner_train(TINY1, tmp_path / "stage1",
                 path_overrides(tiny_llm, demo["stage1"], demo["features"], feature_dim=dim) + short)
    ckpt1 = (tmp_path / "stage1" / "last_checkpoint").read_text().strip()
    sd1 = torch.load(ckpt1, map_location="cpu", weights_only=False)["state_dict"]
    assert tuple(sd1["input_proj.weight"].shape) == (512, dim)  # trained in stage 1, saved with the rest
    xtuner_train(TINY2, tmp_path / "stage2", path_overrides(tiny_llm, demo["stage1"], demo["features"],
                                                            tmp_path / "stage1", feature_dim=dim) + short)
    log = "".join(p.read_text() for p in (tmp_path / "stage2").glob("*/*.log"))
    assert "Loaded pretrained_pth" in log and "unexpected none" in log  # strict: input_proj included
    ckpt2 = (tmp_path / "stage2" / "last_checkpoint").read_text().strip()
    sd2 = torch.load(ckpt2, map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.equal(sd2["input_proj.weight"], sd1["input_proj.weight"])  # trained on in stage 2
    assert any(k.startswith("llm.") for k in sd2)
    slides = [f"demo_{i}" for i in range(8)]
    out = tmp_path / "test" / "out.csv"
    out.parent.mkdir()
    test_opts = path_overrides(tiny_llm, feature_dim=dim)
    assert slidechat_test(TINY2, ckpt2, bench_csv(tmp_path / "bench.csv", slides), out, demo["features"],
                          test_opts) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == [f"q{i}" for i in range(8)]
    assert all(r["Error"] == "" for r in rows)
    # the same run on a folder of another width: refused before the model is built, one line
    wrong = tmp_path / "wrong"
    for s in slides:
        h5(wrong / f"{s}.h5", 512, dict(attrs, encoder="tiny_test", encoder_embed_dim="512"))
    caplog.clear()
    assert slidechat_test(TINY2, ckpt2, tmp_path / "bench.csv", tmp_path / "test" / "out2.csv", wrong,
                          test_opts) == 1
    err = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(err) == 1 and "\n" not in err[0]
    assert f"demo_0.h5: features of encoder tiny_test are 512-d, the config's feature_dim is {dim}" in err[0]
    assert not (tmp_path / "test" / "out2.csv").exists()


def test_training_data_of_two_encoders_is_refused(tmp_path, tiny_llm, uni2_h_attrs, tiny_attrs):
    from transformers import AutoTokenizer

    from slidechat.data.dataset import SlideInstructionDataset

    demo = slide_train_demo(tmp_path, feature_dim=1536, file_attrs=uni2_h_attrs, llm=tiny_llm)
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    assert SlideInstructionDataset(demo["stage1"], tok, feature_root=demo["features"],
                                   feature_dim=1536).provenance.encoder == "uni2_h"
    with pytest.raises(SlideChatError, match="features of encoder uni2_h are 1536-d, the config's feature_dim "
                                             "is 512 .*set feature_dim = 1536"):
        SlideInstructionDataset(demo["stage1"], tok, feature_root=demo["features"], feature_dim=512)
    h5(demo["features"] / "demo_3.h5", 512, tiny_attrs)  # one slide re-extracted with another encoder
    with pytest.raises(SlideChatError, match="feature files from two encoders") as e:
        SlideInstructionDataset(demo["stage1"], tok, feature_root=demo["features"], feature_dim=1536)
    assert "demo_3.h5" in str(e.value) and "uni2_h (1536-d" in str(e.value) and "tiny_test (512-d" in str(e.value)
