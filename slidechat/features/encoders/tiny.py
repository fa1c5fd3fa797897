"""``tiny_test``: a deterministic, weight-free stand-in encoder for tests and the demo.

NOT a pathology model. Fixed-seed random convolutions plus pooled colour statistics, so features
differ between tissue with different colour/texture (the synthetic classes) and are identical on every
machine and run. Cheap (well under 1 ms per patch on one CPU core) so that extraction speed is bounded by
slide decoding, which is what the benchmark measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidechat.features.encoders.base import PatchEncoder
from slidechat.features.encoders.registry import EncoderPreset, Preprocessing, register_encoder

_N_STATS = 36  # 3 mean + 3 std + 1 saturation + 3 dark fractions + 2 edge energies + 24 histogram
_THRESH = torch.arange(1, 8, dtype=torch.float32) / 8  # histogram bin edges


class TinyTestEncoder(PatchEncoder):
    def __init__(self, preset: EncoderPreset, embed_dim: int = 512, seed: int = 0) -> None:
        super().__init__(preset)
        if embed_dim < _N_STATS + 2 or (embed_dim - _N_STATS) % 2:
            raise ValueError(f"tiny_test embed_dim must be even and >= {_N_STATS + 2}")
        self.embed_dim = embed_dim
        n_conv = (embed_dim - _N_STATS) // 2
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 24, 4, stride=4)  # patchify: sees every pixel, cheap
        self.conv2 = nn.Conv2d(24, n_conv, 1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
        self.requires_grad_(False)

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, 112, 112) in [0, 1]: subsample first (cheap), then cast."""
        if patches.shape[1:3] != (224, 224):
            patches = super().preprocess(patches).clamp(0, 1).mul(255).permute(0, 2, 3, 1)
        x = patches[:, ::2, ::2].permute(0, 3, 1, 2)
        return x.float().div_(255.0).contiguous(memory_format=torch.contiguous_format)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.max_pool2d(self.conv1(x - 0.5), 2))  # 112 -> 28x28 -> 14x14
        h = F.relu(self.conv2(h))
        conv_feats = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

        tiny = F.avg_pool2d(x, 2)                        # 56x56, for statistics
        mean = tiny.mean((2, 3))
        std = tiny.std((2, 3))
        mx, mn = tiny.amax(1), tiny.amin(1)
        sat = ((mx - mn) / mx.clamp_min(1e-3)).mean((1, 2)).unsqueeze(1)
        grey = tiny.mean(1)
        dark = torch.stack([(grey < t).float().mean((1, 2)) for t in (0.35, 0.5, 0.65)], 1)
        gx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2))
        gy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean((1, 2))
        coarse = F.avg_pool2d(tiny, 2).flatten(2)        # 28x28 for the histogram
        cum = (coarse.unsqueeze(-1) < _THRESH.to(x.device)).float().mean(2)  # (B, 3, 7) CDF
        hist = torch.diff(cum, dim=-1, prepend=torch.zeros_like(cum[..., :1]),
                          append=torch.ones_like(cum[..., :1])).flatten(1)  # (B, 24)
        stats = torch.cat([mean, std, sat, dark, torch.stack([gx, gy], 1), hist], 1)
        return torch.cat([stats, conv_feats], 1)


@register_encoder
def tiny_test() -> EncoderPreset:
    return EncoderPreset(
        name="tiny_test", dim=512, needs_checkpoint=False,
        preprocessing=Preprocessing(resize_to=224, crop=224, interpolation="bilinear", mean=(0.0, 0.0, 0.0),
                                    std=(1.0, 1.0, 1.0)),
        output="colour statistics + fixed random convolutions (NOT a pathology model)",
        factory=lambda preset, request: TinyTestEncoder(preset), licence="project's own",
        source="slidechat/features/encoders/tiny.py (tests and the demo)")
