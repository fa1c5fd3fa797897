"""``resnet50_trunc``: CLAM's baseline — ImageNet ResNet-50 cut after ``layer3``, average-pooled (1024-d)."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from slidechat.features.encoders.base import (IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, load_checked,
                                              require_checkpoint, sha256_file)
from slidechat.model.checkpoint import load_state_dict_file


class ResNet50TruncEncoder(PatchEncoder):
    name = "resnet50_trunc"
    embed_dim = 1024
    resize_to = 224
    crop = 224
    interpolation = "bilinear"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 load_weights: bool = True) -> None:
        super().__init__()
        from torchvision.models import resnet50

        path = require_checkpoint(checkpoint, self.name) if load_weights else None

        net = resnet50(weights=None)
        net.layer4 = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        if path is not None:
            sd = {k: v for k, v in load_state_dict_file(path).items()
                  if not k.startswith(("layer4.", "fc."))}
            load_checked(self.net, sd, str(path), self.name)
            self.checkpoint_path = str(path)
            self.checkpoint_sha256 = sha256_file(path)
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
