"""Checkpoint reading: safetensors, mmengine-style .pth, DeepSpeed folders — never running pickled code."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from safetensors.torch import save_file

from slidechat.model.checkpoint import load_state_dict_file
from slidechat.model.slide_encoder import LongNetEncoder, SlideEncoderConfig
from slidechat.utils.errors import SlideChatError


def weights():
    torch.manual_seed(0)
    return {"LongNet_encoder.layer_norm.weight": torch.randn(8),
            "projector.model.0.weight": torch.randn(4, 8).to(torch.bfloat16),
            "llm.lm_head.weight": torch.randn(5, 4)}


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])


class Payload:
    """Stands for arbitrary metadata objects: unpickling it for real would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safetensors_roundtrip(tmp_path):
    sd = weights()
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert_same(load_state_dict_file(tmp_path / "w.safetensors"), sd)


def test_plain_pth_with_module_prefix(tmp_path):
    sd = weights()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "w.pth")
    assert_same(load_state_dict_file(tmp_path / "w.pth"), sd)


def test_mmengine_wrapper_with_unsafe_meta_is_read_without_running_it(tmp_path):
    sd = weights()
    marker = tmp_path / "pwned"
    ckpt = {"state_dict": collections.OrderedDict((f"module.{k}", v) for k, v in sd.items()),
            "meta": {"epoch": 3, "iter": 500, "cfg": "x", "hook": Payload(str(marker))},
            "message_hub": {"runtime_info": Payload(str(marker))}}
    torch.save(ckpt, tmp_path / "iter_500.pth")
    assert not marker.exists()
    with pytest.raises(Exception):  # the weights-only loader refuses it, which is why the fallback exists
        torch.load(tmp_path / "iter_500.pth", weights_only=True)
    got = load_state_dict_file(tmp_path / "iter_500.pth")
    assert_same(got, sd)
    assert not marker.exists()


def test_deepspeed_folder(tmp_path):
    sd = weights()
    folder = tmp_path / "iter_100.pth"
    folder.mkdir()
    torch.save({"module": {f"module.{k}": v for k, v in sd.items()}, "buffer_names": [],
                "param_shapes": [collections.OrderedDict((k, v.shape) for k, v in sd.items())],
                "ds_version": "0.19.8", "global_steps": 100}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"x": torch.zeros(1)}}, folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert_same(load_state_dict_file(folder), sd)
    from slidechat.model.checkpoint import CheckpointKind, resolve_checkpoint

    assert resolve_checkpoint(folder).kind is CheckpointKind.DEEPSPEED


def test_errors_name_the_file(tmp_path):
    with pytest.raises(SlideChatError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideChatError, match="DeepSpeed"):
        load_state_dict_file(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SlideChatError, match="x.txt"):
        load_state_dict_file(tmp_path / "x.txt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(SlideChatError, match="list.pth"):
        load_state_dict_file(tmp_path / "list.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SlideChatError, match="broken.pth"):
        load_state_dict_file(tmp_path / "broken.pth")
    torch.save({"module": None, "ds_version": "0.19"}, tmp_path / "zero3.pt")
    with pytest.raises(SlideChatError, match="ZeRO-3"):
        load_state_dict_file(tmp_path / "zero3.pt")


def test_encoder_weights_survive_pth_roundtrip(tmp_path):
    enc = LongNetEncoder(SlideEncoderConfig(embed_dim=16, ffn_dim=32, num_heads=2, segment_lengths=(4,),
                                            dilated_ratios=(1,)))
    sd = {f"LongNet_encoder.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"state_dict": sd, "meta": {"seed": 0}}, tmp_path / "e.pth")
    assert_same(load_state_dict_file(tmp_path / "e.pth"), sd)
    assert os.path.getsize(tmp_path / "e.pth") > 0


# ----------------------------------------------------------------------------- resolve + key check

def test_resolve_checkpoint_layouts(tmp_path):
    from slidechat.model.checkpoint import CheckpointKind, ResolvedCheckpoint, load_weights, resolve_checkpoint

    sd = weights()
    wd = tmp_path / "work"
    wd.mkdir()
    torch.save({"state_dict": sd}, wd / "epoch_2.pth")
    (wd / "last_checkpoint").write_text(str(wd / "epoch_2.pth"))
    assert resolve_checkpoint(wd) == ResolvedCheckpoint(wd / "epoch_2.pth", CheckpointKind.FILE, work_dir=wd)
    assert_same(load_weights(wd), sd)
    moved = tmp_path / "moved"
    wd.rename(moved)  # the marker still names the old absolute path: looked up beside the marker
    assert resolve_checkpoint(moved).path == moved / "epoch_2.pth"
    (moved / "epoch_2.pth").unlink()
    with pytest.raises(SlideChatError, match="last_checkpoint names .*epoch_2.pth.*does not exist"):
        resolve_checkpoint(moved)
    with pytest.raises(SlideChatError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    assert resolve_checkpoint(f) == ResolvedCheckpoint(f, CheckpointKind.FILE)


def test_exported_and_hugging_face_folders(tmp_path):
    import json

    from slidechat.model.checkpoint import (EXPORTED_CONFIG_FILE, EXPORTED_WEIGHTS_FILE, CheckpointKind,
                                            load_weights, resolve_checkpoint)

    sd = weights()
    exp = tmp_path / "exported"
    exp.mkdir()
    (exp / EXPORTED_CONFIG_FILE).write_text("{}")
    slide = {k: v for k, v in sd.items() if not k.startswith("llm.")}
    save_file(slide, str(exp / EXPORTED_WEIGHTS_FILE))
    assert_same(load_weights(exp), slide)
    assert resolve_checkpoint(exp).kind is CheckpointKind.EXPORTED
    hf = tmp_path / "hf"
    hf.mkdir()
    a, b = dict(list(sd.items())[:1]), dict(list(sd.items())[1:])
    save_file(a, str(hf / "model-00001-of-00002.safetensors"))
    save_file(b, str(hf / "model-00002-of-00002.safetensors"))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}}))
    assert_same(load_weights(hf), sd)
    assert resolve_checkpoint(hf).kind is CheckpointKind.HF
    (hf / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SlideChatError, match="shard model-00002-of-00002.safetensors named by the index is missing"):
        load_weights(hf)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def test_load_checked_strict_by_default_and_one_line(tmp_path):
    from slidechat.model.checkpoint import load_checked

    src = _net()
    for p in src.parameters():
        p.data.add_(1.0)
    sd = src.state_dict()
    dst = _net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    # missing: refused, nothing loaded, one line naming the prefixes and the file
    part = {k: v for k, v in sd.items() if not k.startswith("2.")}
    with pytest.raises(SlideChatError) as e:
        load_checked(dst, part, source=tmp_path / "x.pth")
    msg = str(e.value)
    assert "\n" not in msg and "x.pth" in msg and "lacks required weights: 2 keys: 2.weight, 2.bias" in msg
    assert all(torch.equal(dst.state_dict()[k], before[k]) for k in before)
    # unexpected: refused too
    with pytest.raises(SlideChatError, match="does not use: 1 keys: extra.w"):
        load_checked(dst, {**sd, "extra.w": torch.zeros(1)})
    # shape mismatch: always refused, even with allow_partial
    bad = {**sd, "0.weight": torch.zeros(2, 2)}
    with pytest.raises(SlideChatError, match=r"0.weight: checkpoint \(2, 2\) vs model \(3, 4\)"):
        load_checked(dst, bad, allow_partial=True)
    # allow_partial: loads what matches, reports the gaps
    rep = load_checked(dst, {**part, "extra.w": torch.zeros(1)}, allow_partial=True, source="p.pth")
    assert not rep.ok and rep.missing == ["2.weight", "2.bias"] and rep.unexpected == ["extra.w"]
    assert torch.equal(dst.state_dict()["0.weight"], sd["0.weight"])
    assert rep.summary().startswith("p.pth: loaded ") and "missing 2 keys: 2.weight, 2.bias" in rep.summary()
    # required prefixes: the rest may be absent (kept as built); BatchNorm's counter is never required
    dst = _net()
    rep = load_checked(dst, {k: v for k, v in sd.items() if k.startswith("0.")}, required=["0."])
    assert rep.ok and rep.loaded == ["0.weight", "0.bias"] and "2.weight" in rep.kept
    no_counter = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert load_checked(_net(), no_counter).ok
    with pytest.raises(ValueError, match="matches no key"):
        load_checked(_net(), sd, required=["nope."])
    # allow_unexpected: a tower out of a larger file
    rep = load_checked(_net(), {**sd, "text.w": torch.zeros(1)}, allow_unexpected=True)
    assert rep.unexpected == ["text.w"] and not rep.missing


def test_summarize_keys_groups_prefixes():
    from slidechat.model.checkpoint import summarize_keys

    keys = [f"LongNet_encoder.layers.{i}.w" for i in range(3)] + ["projector.model.0.weight", "llm.lm_head.weight"]
    assert summarize_keys(keys) == ("5 keys: LongNet_encoder.layers.* (3), projector.model, llm.lm_head")
    assert summarize_keys([]) == "none"
