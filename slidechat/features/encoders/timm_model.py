"""``timm:<model_name>``: any timm model with a local weights file; preprocessing from its pretrained_cfg."""

from __future__ import annotations

import logging
import math

import timm
import torch

from slidechat.features.encoders.base import PatchEncoder, load_checked, require_checkpoint
from slidechat.features.encoders.registry import (IMAGENET_MEAN, IMAGENET_STD, BuildRequest, EncoderPreset,
                                                  Preprocessing, register_encoder)
from slidechat.model.checkpoint import load_state_dict_file
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)


class TimmEncoder(PatchEncoder):
    """Any timm model by name; its preprocessing comes from its own ``pretrained_cfg``."""

    def __init__(self, preset: EncoderPreset, request: BuildRequest) -> None:
        super().__init__(preset)
        model_name = str(request.argument)
        self.name = f"timm:{model_name}"
        path = require_checkpoint(request.checkpoint, self.name) if request.load_weights else None
        try:  # pretrained=False: never downloads
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0)
        except Exception as e:
            raise SlideChatError(f"timm cannot build model '{model_name}': {e}",
                                 hint="see timm.list_models()") from e
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
        self.crop = size
        self.resize_to = int(math.floor(size / crop_pct))
        self.interpolation = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.embed_dim = int(self.model.num_features)
        if path is not None:
            sd = load_state_dict_file(path)
            sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))
                  or k in self.model.state_dict()}
            load_checked(self.model, sd, str(path), self.name)
            self.record_checkpoint(path)
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.flatten(1) if out.ndim > 2 else out


@register_encoder
def timm_any() -> EncoderPreset:
    return EncoderPreset(
        name="timm:", dim=0, parametric=True,
        preprocessing=Preprocessing(resize_to=None, crop=None),  # set from the model's pretrained_cfg
        output="the model's pooled output (num_classes=0)", factory=TimmEncoder,
        licence="that of the weights you pass", source="timm.create_model(<model_name>, num_classes=0)")
