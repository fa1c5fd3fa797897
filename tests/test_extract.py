"""The extraction pipeline end to end on generated slides (tiny_test encoder, real OpenSlide)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from slidechat.features.inputs import collect_slide_paths, rank_and_world, shard, unique_shard
from slidechat.features.io import load_features
from slidechat.apps.extract import extract_slides
from slidechat.apps.runner import LOCK_DIR
from slidechat.features.extract import extract_slide_features
from slidechat.utils.errors import SlideChatError
from slidechat.utils.outputs import MARKER
from tolerances import FP32_RTOL, assert_close_rel, assert_rounded_to_decimals

GOOD = ["s20_tumor", "s20_inflamed", "s40_tumor", "odd name ü.v2"]


def _failures(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def test_good_slides_done_bad_ones_reported(extracted):
    out, summary = extracted
    assert sorted(summary["done"]) == sorted(GOOD)
    fails = _failures(out / "failures.csv")
    assert set(fails) == {"s_corrupt", "s_blank"}
    assert fails["s_corrupt"]["stage"] == "open"
    assert fails["s_blank"]["stage"] == "patching" and "no tissue" in fails["s_blank"]["reason"]
    for sid in GOOD:
        assert (out / "h5_files" / f"{sid}.h5").is_file()
        assert (out / "csv" / f"{sid}.csv").is_file()
        assert (out / "qc" / f"{sid}.png").is_file()
    assert not list(out.rglob("*.partial"))


def test_h5_clam_layout(extracted):
    out, _ = extracted
    with h5py.File(out / "h5_files" / "s40_tumor.h5", "r") as f:
        coords, feats = f["coords"][()], f["features"][()]
        a, root = dict(f["coords"].attrs), dict(f.attrs)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    assert feats.dtype == np.float32 and feats.shape == (len(coords), 512)
    assert a["patch_size"] == 224 and a["patch_level"] == 0 and a["patch_size_level0"] == 448
    assert list(a["downsample"]) == [1.0, 1.0] and list(a["level_dim"]) == [2560, 2048]
    assert a["target_mpp"] == pytest.approx(0.5) and a["base_mpp"] == pytest.approx(0.25)
    assert a["target_magnification"] == pytest.approx(20) and a["base_magnification"] == pytest.approx(40)
    assert root["encoder"] == "tiny_test" and root["encoder_checkpoint_sha256"] == "none"
    assert "slidechat_version" in root
    assert (coords % 448 == 0).all()
    with h5py.File(out / "h5_files" / "s20_tumor.h5", "r") as f:
        assert f["coords"].attrs["patch_size_level0"] == 224


def test_csv_slidechat_layout_and_single_reader(extracted):
    out, _ = extracted
    csv_path = out / "csv" / "s20_tumor.csv"
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ",".join(str(i) for i in range(512))
    first = lines[1].split(",")
    assert len(first) == 512 and all(len(v.split(".")[1]) == 4 for v in first)
    fh, ch = load_features(out / "h5_files" / "s20_tumor.h5")
    fc, cc = load_features(csv_path)
    assert cc is None and ch is not None and ch.shape == (len(fh), 2)
    assert_rounded_to_decimals(fc, fh, 4)  # %.4f text: exact rounding, the same on every machine
    assert len(lines) == len(fh) + 1


def test_in_memory_api_matches_files(extracted, synthetic_slides):
    out, _ = extracted
    feats, coords, info = extract_slide_features(synthetic_slides["tumor20"], "tiny_test",
                                                 num_workers=0, progress=False)
    fh, ch = load_features(out / "h5_files" / "s20_tumor.h5")
    assert np.array_equal(coords, ch)
    # other batch sizes and worker counts: the encoder's convolutions (K <= 48) add in other orders; the
    # colour statistics are the same ops on the same pixels. Float noise only (FP32_RTOL of max|feature|)
    assert_close_rel(feats, fh, FP32_RTOL, what="in-memory vs file features")
    assert info["coords_attrs"]["patch_size_level0"] == 224 and info["encoder"] == "tiny_test"


def test_tiny_features_separate_classes(extracted):
    out, _ = extracted
    a, _ = load_features(out / "h5_files" / "s20_tumor.h5")
    b, _ = load_features(out / "h5_files" / "s20_inflamed.h5")
    ca, cb = a.mean(0), b.mean(0)
    correct = (np.linalg.norm(a - ca, axis=1) < np.linalg.norm(a - cb, axis=1)).sum() + \
              (np.linalg.norm(b - cb, axis=1) < np.linalg.norm(b - ca, axis=1)).sum()
    assert correct / (len(a) + len(b)) >= 0.95


def test_rerun_skips_and_cleans_stale_partials(extracted, synthetic_slides):
    out, _ = extracted
    h5 = out / "h5_files" / "s20_tumor.h5"
    mtime = h5.stat().st_mtime_ns
    stale = out / "h5_files" / ".s20_tumor.h5.abc123.partial"
    stale.write_bytes(b"half")
    s = extract_slides([synthetic_slides["tumor20"]], out, encoder="tiny_test", progress=False)
    assert s["skipped"] == ["s20_tumor"] and not s["done"] and not s["failed"]
    assert h5.stat().st_mtime_ns == mtime and not stale.exists()


def test_failure_mid_write_leaves_no_partial(synthetic_slides, tmp_path, monkeypatch):
    real = h5py.Group.create_dataset

    def boom(self, name, *a, **k):
        if name == "features":
            raise OSError("simulated kill while writing")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    s = extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", progress=False, num_workers=0)
    assert s["failed"][0]["stage"] == "write" and "simulated kill" in s["failed"][0]["reason"]
    assert not (tmp_path / "h5_files" / "s20_tumor.h5").exists()
    assert not list(tmp_path.rglob("*.partial"))
    monkeypatch.undo()
    s = extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", progress=False, num_workers=0)
    assert s["done"] == ["s20_tumor"]


def test_sigkill_mid_write_leaves_no_final_file_and_rerun_recovers(synthetic_slides, tmp_path):
    """A real kill (SIGKILL: no exception handler, no cleanup runs) while the H5 is being written."""
    import signal
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent(f"""
        import os, signal, h5py
        from slidechat.apps.extract import extract_slides
        real = h5py.Group.create_dataset
        def kill_mid_write(self, name, *a, **k):
            out = real(self, name, *a, **k)
            if name == "features":
                self.file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        h5py.Group.create_dataset = kill_mid_write
        extract_slides([{str(synthetic_slides["tumor20"])!r}], {str(tmp_path)!r}, encoder="tiny_test", progress=False,
                       num_workers=0, save_csv=True)
    """)
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()[-2000:]
    final = tmp_path / "h5_files" / "s20_tumor.h5"
    assert not final.exists()  # the H5 marks a finished slide: it must not exist half-written
    assert list(tmp_path.rglob(".*.partial"))  # the torn temp file the kill left behind
    s = extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", progress=False, num_workers=0,
                       save_csv=True)
    assert s["done"] == ["s20_tumor"] and not list(tmp_path.rglob("*.partial"))
    feats, coords = load_features(final)
    csv_feats, _ = load_features(tmp_path / "csv" / "s20_tumor.csv")
    assert len(feats) == len(coords) == len(csv_feats) > 0
    assert_rounded_to_decimals(csv_feats, feats, 4)  # the CSV is the H5 at %.4f


def test_missing_metadata_fails_unless_base_mpp(synthetic_slides, tmp_path):
    s = extract_slides([synthetic_slides["nometa"]], tmp_path, encoder="tiny_test", progress=False, num_workers=0)
    f = s["failed"][0]
    assert f["stage"] == "resolution" and "--base-mpp" in f["reason"]
    s = extract_slides([synthetic_slides["nometa"]], tmp_path, encoder="tiny_test", progress=False, num_workers=0, base_mpp=0.5)
    assert s["done"] == ["s_nometa"]
    assert _failures(tmp_path / "failures.csv") == {}


def test_rank_sharding_exactly_once(synthetic_slides, tmp_path, monkeypatch):
    items = list(range(11))
    for k in (1, 2, 3, 4):
        parts = [shard(items, r, k) for r in range(k)]
        assert sorted(sum(parts, [])) == items
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2)
    assert rank_and_world(0, 3) == (0, 3)
    with pytest.raises(SlideChatError):
        rank_and_world(3, 3)
    paths = [synthetic_slides["corrupt"], synthetic_slides["blank"]]
    s1 = extract_slides(paths, tmp_path, encoder="tiny_test", progress=False)          # env: rank 1 of 2 -> blank only
    s0 = extract_slides(paths, tmp_path, rank=0, world_size=2, encoder="tiny_test", progress=False)
    assert [f["slide"] for f in s0["failed"]] == ["s_corrupt"]
    assert [f["slide"] for f in s1["failed"]] == ["s_blank"]
    assert set(_failures(tmp_path / "failures_rank0.csv")) == {"s_corrupt"}
    assert set(_failures(tmp_path / "failures_rank1.csv")) == {"s_blank"}


def test_unique_shard_drops_repeated_ids_once(tmp_path):
    # same id "a" from two folders: the first path wins; only rank 0 reports the duplicate
    paths = [tmp_path / "x" / "a.svs", tmp_path / "b.svs", tmp_path / "y" / "a.tif", tmp_path / "c.svs"]
    parts = [unique_shard(paths, r, 2) for r in range(2)]
    assert sorted(sum((m for m, _ in parts), []), key=str) == sorted([paths[0], paths[1], paths[3]], key=str)
    assert parts[0][0] == [paths[0], paths[3]] and parts[1][0] == [paths[1]]
    assert [(f["slide"], f["path"], f["stage"]) for f in parts[0][1]] == [("a", str(paths[2]), "input")]
    assert str(paths[0]) in parts[0][1][0]["reason"] and parts[1][1] == []


def test_input_forms(synthetic_slides, tmp_path):
    d = synthetic_slides["dir"]
    from_dir = collect_slide_paths(d)
    assert len(from_dir) == 6 and all(p.suffix == ".svs" for p in from_dir)
    assert collect_slide_paths(str(d / "s20_*.svs")) == sorted(d.glob("s20_*.svs"))
    lst = tmp_path / "list.csv"
    lst.write_text(f"slide_path,label\n{synthetic_slides['odd']},x\ns20_tumor.svs,y\n", encoding="utf-8")
    (tmp_path / "s20_tumor.svs").write_bytes(b"")
    assert collect_slide_paths(lst) == [synthetic_slides["odd"], tmp_path / "s20_tumor.svs"]
    txt = tmp_path / "list.txt"
    txt.write_text(f"# slides\n{synthetic_slides['tumor20']}\n\n", encoding="utf-8")
    assert collect_slide_paths(txt) == [synthetic_slides["tumor20"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(SlideChatError, match="'path' or 'slide_path'"):
        collect_slide_paths(bad)


def test_cli_exit_codes(extracted, synthetic_slides, tmp_path, caplog):
    from slidechat.cli.main import main

    out, _ = extracted
    # everything finished or failed before: good ones are skipped, the bad ones fail again -> 1
    assert main(["extract-features", str(synthetic_slides["dir"]), "--out", str(out),
                 "--encoder", "tiny_test", "--no-progress"]) == 1
    assert main(["extract-features", str(synthetic_slides["tumor20"]), "--out", str(out),
                 "--encoder", "tiny_test", "--no-progress"]) == 0
    assert main(["extract-features", str(tmp_path / "missing*.svs"), "--out", str(out),
                 "--encoder", "tiny_test"]) == 1
    # the default encoder is CONCH v1: without its weights it says which flag to pass, and writes nothing
    fresh = tmp_path / "fresh_out"
    assert main(["extract-features", str(synthetic_slides["tumor20"]), "--out", str(fresh),
                 "--no-progress"]) == 1
    assert "--checkpoint" in caplog.text and not list(fresh.rglob("*.h5"))
    r = subprocess.run([sys.executable, "tools/extract_features.py", "--help"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "--base-mpp" in r.stdout and "--checkpoint" in r.stdout


# ----------------------------------------------------------------------------------------------
# refusals and failure hygiene


def test_unusable_out_is_refused_before_any_work(synthetic_slides, tmp_path, caplog, capsys):
    """Root ignores permission bits, so "unwritable" is made real: --out under a regular file, or a file."""
    from slidechat.cli.main import main
    from slidechat.apps.extract import check_output_dir

    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for bad in (afile / "out", afile):
        caplog.clear()
        # default encoder conch_v1 without --checkpoint: the --out error must come first, not that one
        assert main(["extract-features", str(synthetic_slides["tumor20"]), "--out", str(bad),
                     "--no-progress"]) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(bad) in errors[0], errors
        assert "--checkpoint" not in caplog.text and "Traceback" not in capsys.readouterr().err
        with pytest.raises(SlideChatError, match="output folder|not a folder"):
            extract_slides([synthetic_slides["tumor20"]], bad, encoder="tiny_test", progress=False)
    (tmp_path / "ok" / "h5_files").mkdir(parents=True)
    (tmp_path / "ok" / "csv").write_text("a file where a folder must be")
    with pytest.raises(SlideChatError, match="not a folder"):
        check_output_dir(tmp_path / "ok")


def _corrupt_level0_tile_under_last_patch(src: Path, dst: Path) -> None:
    """Copy ``src`` and zero the level-0 JPEG tile under its last 20x patch (a later batch, so reader
    workers, not the first batch read in the main process, hit it)."""
    import shutil

    import tifffile

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tf:
        page = tf.pages[0]
        nx = -(-page.imagewidth // page.tilewidth)
        x, y = 2560 - 448, 2048 - 2 * 448  # last full patch row of a 2560x2048 40x slide (448-px grid)
        i = (y // page.tilelength) * nx + x // page.tilewidth
        off, cnt = int(page.dataoffsets[i]), int(page.databytecounts[i])
    with open(dst, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\0" * cnt)


def test_reader_worker_errors_give_the_same_one_line_as_without_workers(synthetic_slides, tmp_path, caplog):
    bad = tmp_path / "s40_badtile.svs"
    _corrupt_level0_tile_under_last_patch(synthetic_slides["tumor40"], bad)
    reasons, lines = {}, {}
    for nw in (0, 2):
        caplog.clear()
        out = tmp_path / f"out{nw}"
        s = extract_slides([bad], out, encoder="tiny_test", num_workers=nw, batch_size=4,
                           no_tissue_seg=True, save_qc=False, progress=False)
        assert not s["done"] and len(s["failed"]) == 1
        reasons[nw] = _failures(out / "failures.csv")["s40_badtile"]
        lines[nw] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert not list(out.rglob("*.h5"))
    assert reasons[0] == reasons[2]
    assert reasons[0]["stage"] == "read" and "\n" not in reasons[0]["reason"]
    assert "Not a JPEG" in reasons[0]["reason"] or "JPEG" in reasons[0]["reason"].upper()
    assert "DataLoader worker" not in reasons[2]["reason"]
    assert lines[0] == lines[2] and len(lines[0]) == 1


def test_failed_slide_leaves_none_of_its_outputs(synthetic_slides, tmp_path, monkeypatch):
    sid = "s20_tumor"
    # leftovers of an earlier, older run: a CSV and QC without an H5
    (tmp_path / "csv").mkdir()
    (tmp_path / "qc").mkdir()
    (tmp_path / "csv" / f"{sid}.csv").write_text("0\n1.0\n")
    (tmp_path / "qc" / f"{sid}.png").write_bytes(b"old")
    real = h5py.Group.create_dataset

    def boom(self, name, *a, **k):
        if name == "features":
            raise OSError("disk full (simulated)")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    s = extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", save_csv=True,
                       save_qc=True, progress=False, num_workers=0)
    assert s["failed"][0]["stage"] == "write"
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "failures.csv"
            and p.name != MARKER and LOCK_DIR not in p.relative_to(tmp_path).parts]  # the folder's, not the slide's
    assert left == [], left
    monkeypatch.undo()
    # an --overwrite redo that fails removes the slide's earlier complete outputs too
    s = extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", save_csv=True,
                       progress=False, num_workers=0)
    assert s["done"] == [sid] and (tmp_path / "csv" / f"{sid}.csv").is_file()
    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    s = extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", save_csv=True,
                       progress=False, num_workers=0, overwrite=True)
    assert s["failed"] and not (tmp_path / "h5_files" / f"{sid}.h5").exists()
    assert not (tmp_path / "csv" / f"{sid}.csv").exists() and not (tmp_path / "qc" / f"{sid}.png").exists()


def test_timing_breakdown_logged_and_stored_in_h5(extracted, synthetic_slides, tmp_path, caplog):
    import json
    import logging

    out, _ = extracted
    with h5py.File(out / "h5_files" / "s40_tumor.h5", "r") as f:
        root = dict(f.attrs)
    stages = ("open_s", "segment_s", "plan_s", "read_s", "encode_s", "write_s", "total_s")
    for k in stages:
        assert float(root[f"timing_{k}"]) >= 0, k
    assert float(root["timing_total_s"]) > 0 and float(root["timing_read_s"]) > 0
    assert float(root["timing_encode_s"]) > 0 and float(root["timing_write_s"]) > 0
    assert set(stages) <= set(json.loads(root["timings"]))
    caplog.set_level(logging.INFO, logger="slidechat")
    extract_slides([synthetic_slides["tumor20"]], tmp_path, encoder="tiny_test", progress=False)
    line = next(r.getMessage() for r in caplog.records if "patches in" in r.getMessage())
    for word in ("open", "segment", "patch plan", "read", "encode", "write"):
        assert word in line, line


def test_balance_readers_against_the_encoder():
    from slidechat.wsi.reader import balance_workers

    # decoding costs 4x the (cheap) encoder: both cores read, the encoder gets one thread
    assert balance_workers(0.004, 0.001, 1, "cpu", cores=2) == (2, 1)
    # a compute-bound encoder (CONCH on CPU): one reader, every core for the encoder's threads
    assert balance_workers(0.004, 1.0, 2, "cpu", cores=2) == (1, 2)
    assert balance_workers(0.004, 0.012, 2, "cpu", cores=2) == (2, 1)  # a noisy probe of a light encoder
    # GPU: enough readers to keep up with the encoder, one core left for the main process
    assert balance_workers(0.004, 0.0005, 1, "cuda", cores=16) == (8, 1)
    assert balance_workers(0.004, 0.00001, 1, "cuda", cores=16) == (15, 1)


def test_encoder_resize_in_readers_equals_resize_on_device(synthetic_slides):
    """CPU: the encoder's resize runs in the readers with PIL; GPU: batched on the device with the exact
    reimplementation. Both must give the same features (here 112-px patches resized to tiny_test's 224)."""
    runs = [extract_slide_features(synthetic_slides["tumor20"], "tiny_test", patch_size=112, num_workers=nw,
                                   host_resize=host, progress=False, batch_size=8)
            for host, nw in ((True, 2), (False, 0))]
    (fa, ca, info), (fb, cb, _) = runs
    assert np.array_equal(ca, cb) and len(ca) > 8
    # float noise only (threads, batch shapes: the pixels are identical, checked below): FP32_RTOL of max|feature|
    assert_close_rel(fa, fb, FP32_RTOL, what="resize in readers vs on device")
    # and the pixels themselves are identical
    import torch

    from slidechat.features.encoders import build_encoder
    from slidechat.wsi.reader import PatchReader
    from slidechat.features.resample import pil_resize_uint8
    from slidechat.wsi.patching import plan_patches
    from slidechat.wsi.slide import Slide, resolve_resolution
    from slidechat.wsi.tissue import segment_tissue

    enc = build_encoder("tiny_test")
    with Slide(synthetic_slides["tumor20"]) as s:
        grid = plan_patches(s, segment_tissue(s), resolve_resolution(s), patch_size=112)
    host = PatchReader(synthetic_slides["tumor20"], grid, host_resize=enc.host_resize_spec(112, 112))
    plain = PatchReader(synthetic_slides["tumor20"], grid)
    idx = np.arange(len(grid))
    a, b = host.read(idx), plain.read(idx)
    host.close(), plain.close()
    assert a.shape[1:] == (224, 224, 3) and b.shape[1:] == (112, 112, 3)
    assert np.array_equal(a, pil_resize_uint8(torch.from_numpy(b), (224, 224), enc.interpolation).numpy())


def _dicom_file(path: Path, series_uid: str, n_extra: int = 0) -> Path:
    """A minimal explicit-VR little-endian DICOM file written byte by byte from the standard's layout:
    preamble + DICM, a file-meta group, an undefined-length sequence, then Study/Series Instance UIDs."""
    import struct

    def el(group, elem, vr, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0"
        if vr in (b"OB", b"SQ", b"UN", b"UT"):
            return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    meta_body = el(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")
    meta = el(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta_body))) + meta_body
    item = el(0x0008, 0x0100, b"SH", b"CODE")
    seq = (struct.pack("<HH", 0x0008, 0x1032) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
           + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
           + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    body = (el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.77.1.6") + seq
            + el(0x0020, 0x000D, b"UI", b"1.2.3") + el(0x0020, 0x000E, b"UI", series_uid.encode())
            + el(0x7FE0, 0x0010, b"OB", b"\0" * (16 + n_extra)))
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body)
    return path


def test_multi_file_dicom_slide_is_one_slide(tmp_path):
    from slidechat.features.inputs import dicom_series_uid
    from slidechat.wsi.slide import slide_id

    slide_dir = tmp_path / "slides" / "CASE-7"
    slide_dir.mkdir(parents=True)
    files = [_dicom_file(slide_dir / f"1.2.3.4.{i}.dcm", "1.2.3.99", n_extra=1000 * (3 - i)) for i in range(3)]
    assert dicom_series_uid(files[0]) == "1.2.3.99"
    other = tmp_path / "slides" / "b.svs"
    other.write_bytes(b"")
    got = collect_slide_paths(tmp_path / "slides", recursive=True)
    assert got == [files[0], other] or got == [other, files[0]]  # level 0 = the largest file
    assert slide_id(files[0]) == "CASE-7"
    # two series in one folder cannot be told apart by guessing: refused, naming the folder
    _dicom_file(slide_dir / "9.9.dcm", "1.2.3.100")
    with pytest.raises(SlideChatError, match="2 DICOM series") as e:
        collect_slide_paths(slide_dir)
    assert "CASE-7" in str(e.value)


def test_a_slide_is_opened_once_per_extraction(synthetic_slides, monkeypatch):
    """Resolution, tissue mask, patch grid and the main process's patch reads share one slide handle."""
    from slidechat.wsi.slide import Slide

    opened = []
    init = Slide.__init__

    def counting_init(self, path):
        opened.append(path)
        init(self, path)

    monkeypatch.setattr(Slide, "__init__", counting_init)
    feats, _, _ = extract_slide_features(synthetic_slides["tumor20"], "tiny_test", patch_size=112, num_workers=0,
                                         progress=False)
    assert len(feats) > 16  # more than the probe batch: the rest was read too
    assert len(opened) == 1


def test_patches_reach_the_encoder_unchanged_through_reader_processes(synthetic_slides):
    """The pixels the encoder sees (40x slide, 2x2-reduced to 20x) are OpenSlide's region + PIL's
    ``reduce`` (the reference, read here independently), whether read in this process or by 2 forked
    readers handing batches over in recycled shared-memory slots."""
    import openslide
    import torch

    from slidechat.features.encoders.base import PatchEncoder

    class PixelEncoder(PatchEncoder):  # the "features" are the patch's own pixels, exactly
        name = "pixels"
        embed_dim = 112 * 112 * 3

        def forward(self, patches: torch.Tensor) -> torch.Tensor:
            return patches.reshape(len(patches), -1).float()

    path = synthetic_slides["tumor40"]
    got = {}
    for nw in (0, 2):
        feats, coords, info = extract_slide_features(path, PixelEncoder(), patch_size=112, batch_size=4,
                                                     num_workers=nw, progress=False)
        got[nw] = feats.reshape(-1, 112, 112, 3)
    assert len(coords) > 4 * 6 and info["timings"]["readers"] == 2.0  # several batches per slot
    o = openslide.OpenSlide(str(path))
    ref = np.stack([np.asarray(o.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB").reduce(2))
                    for x, y in coords])
    o.close()
    assert np.array_equal(got[0], ref) and np.array_equal(got[2], ref)
