"""One engine for every timm-built pathology ViT (UNI, UNI2-h, Virchow, H-optimus, GigaPath ...).

A preset says ``timm.create_model(arch, pretrained=False, **kwargs)`` with its card's arguments, and an
output rule applied to what the model's own ``forward`` returns:

* ``"pooled"``: the model's output as is (with ``num_classes=0`` and ``global_pool="token"`` that is the
  class token after the final norm: UNI, UNI2-h, H-optimus, GigaPath);
* ``"cls"``: the model returns all tokens (``global_pool=""``); the feature is the class token
  (``out[:, 0]``; H0-mini as TRIDENT extracts it);
* ``"cls_mean_patch"``: the model returns all tokens (``global_pool=""``); the feature is the class
  token concatenated with the mean of the patch tokens, register tokens excluded (Virchow, Virchow2,
  H0-mini's card).

Weights come only from a local file, by timm's key names, strictly: a missing or unexpected key is a
one-line error naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping

import timm
import torch

from slidechat.features.encoders.base import PatchEncoder, load_checked, require_checkpoint
from slidechat.features.encoders.registry import BuildRequest, EncoderPreset, Factory
from slidechat.model.checkpoint import load_state_dict_file

logger = logging.getLogger(__name__)


def _pooled(out: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    return out


def _cls(out: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    return out[:, 0]


def _cls_mean_patch(out: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    # timm's num_prefix_tokens = class token + register tokens: the patch tokens come after all of them
    return torch.cat([out[:, 0], out[:, num_prefix_tokens:].mean(1)], dim=-1)


@dataclass(frozen=True)
class OutputRule:
    """``apply(model_output, num_prefix_tokens)`` and the feature width in units of ``embed_dim``."""

    apply: Callable[[torch.Tensor, int], torch.Tensor]
    widths: int = 1


OUTPUT_RULES: Dict[str, OutputRule] = {
    "pooled": OutputRule(_pooled), "cls": OutputRule(_cls), "cls_mean_patch": OutputRule(_cls_mean_patch, 2)}


class TimmViTEncoder(PatchEncoder):
    """A preset's timm model plus its output rule."""

    def __init__(self, preset: EncoderPreset, request: BuildRequest, arch: str,
                 kwargs: Mapping[str, Any], output_rule: str) -> None:
        super().__init__(preset)
        self.rule = OUTPUT_RULES[output_rule].apply
        path = require_checkpoint(request.checkpoint, preset.name) if request.load_weights else None
        args = dict(kwargs)
        if request.depth is not None:
            args["depth"] = int(request.depth)
        self.model = timm.create_model(arch, pretrained=False, **args)  # pretrained=False: no download
        if path is not None:
            load_checked(self.model, load_state_dict_file(path), str(path), preset.name,
                         allow_unexpected=False)
            self.record_checkpoint(path)
        self.check_width(int(self.model.embed_dim) * OUTPUT_RULES[output_rule].widths)
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule(self.model(x), int(self.model.num_prefix_tokens))


def timm_vit(arch: str, output_rule: str = "pooled", **kwargs: Any) -> Factory:
    """The factory of a timm ViT preset: ``timm.create_model(arch, pretrained=False, **kwargs)``."""
    if output_rule not in OUTPUT_RULES:
        raise ValueError(f"unknown output rule {output_rule!r}")

    def build(preset: EncoderPreset, request: BuildRequest) -> PatchEncoder:
        return TimmViTEncoder(preset, request, arch, kwargs, output_rule)

    return build
