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
