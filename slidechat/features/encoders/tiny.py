"""``tiny_test``: a deterministic, weight-free stand-in encoder for tests and the demo.

NOT a pathology model. Fixed-seed random convolutions plus pooled colour statistics, so features
differ between tissue with different colour/texture (the synthetic classes) and are identical on every
machine and run. Cheap enough that extraction speed is bounded by slide decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidechat.features.encoders.base import PatchEncoder

_N_STATS = 36  # 3 mean + 3 std + 1 saturation + 3 dark fractions + 2 edge energies + 24 histogram


class TinyTestEncoder(PatchEncoder):
    name = "tiny_test"
    resize_to = 224
    crop = 224
    interpolation = "bilinear"
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, embed_dim: int = 512, seed: int = 0) -> None:
        super().__init__()
        if embed_dim < _N_STATS + 2 or (embed_dim - _N_STATS) % 2:
            raise ValueError(f"tiny_test embed_dim must be even and >= {_N_STATS + 2}")
        self.embed_dim = embed_dim
        n_conv = (embed_dim - _N_STATS) // 2
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 24, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(24, n_conv, 1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 224, 224) in [0, 1] (preprocess divides by 255 via std=1)
        small = F.avg_pool2d(x, 2)                       # 112
        h = F.relu(self.conv1(small - 0.5))              # 56
        h = F.max_pool2d(h, 2)                           # 28
        h = F.relu(self.conv2(h))
        conv_feats = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

        tiny = F.avg_pool2d(small, 2)                    # 56, for statistics
        mean = tiny.mean((2, 3))
        std = tiny.std((2, 3))
        mx, mn = tiny.amax(1), tiny.amin(1)
        sat = ((mx - mn) / mx.clamp_min(1e-3)).mean((1, 2)).unsqueeze(1)
        grey = tiny.mean(1)
        dark = torch.stack([(grey < t).float().mean((1, 2)) for t in (0.35, 0.5, 0.65)], 1)
        gx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2))
        gy2 = (small.mean(1)[:, 1:, :] - small.mean(1)[:, :-1, :]).abs().mean((1, 2))
        edges = torch.stack([gx, gy2], 1)
        bins = torch.clamp((tiny * 8).long(), max=7)     # 8-bin histogram per channel
        hist = F.one_hot(bins, 8).float().mean((2, 3)).flatten(1)
        stats = torch.cat([mean, std, sat, dark, edges, hist], 1)
        return torch.cat([stats, conv_feats], 1)
