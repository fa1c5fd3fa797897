"""``resnet50_trunc``: CLAM's baseline — ImageNet ResNet-50 cut after ``layer3``, average-pooled (1024-d)."""

from __future__ import annotations

import torch
from torch import nn

from slidechat.features.encoders.base import PatchEncoder, load_checked, require_checkpoint
from slidechat.features.encoders.registry import BuildRequest, EncoderPreset, Preprocessing, register_encoder
from slidechat.model.checkpoint import load_state_dict_file


class ResNet50TruncEncoder(PatchEncoder):
    def __init__(self, preset: EncoderPreset, request: BuildRequest) -> None:
        super().__init__(preset)
        from torchvision.models import resnet50

        path = require_checkpoint(request.checkpoint, self.name) if request.load_weights else None

        net = resnet50(weights=None)
        net.layer4 = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        if path is not None:
            sd = {k: v for k, v in load_state_dict_file(path).items()
                  if not k.startswith(("layer4.", "fc."))}
            load_checked(self.net, sd, str(path), self.name)
            self.record_checkpoint(path)
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_encoder
def resnet50_trunc() -> EncoderPreset:
    return EncoderPreset(
        name="resnet50_trunc", dim=1024, aliases=("resnet50",), trident_name="resnet50",
        preprocessing=Preprocessing(resize_to=224, crop=224, interpolation="bilinear"),
        output="layer3 output, global average pool", factory=ResNet50TruncEncoder,
        magnification=20, patch_px=256, licence="BSD-3-Clause (torchvision ImageNet weights)",
        source="github.com/mahmoodlab/CLAM models/resnet_custom.py (resnet50_baseline), "
               "extract_features_fp.py")
