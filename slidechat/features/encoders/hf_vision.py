"""One engine for the transformers-built pathology ViTs (Phikon: ``ViTModel``; Phikon-v2: ``Dinov2Model``).

A preset types its card's ``config.json`` values into an :class:`HFVisionSpec`; the model is built offline
from that config (never ``from_pretrained``: nothing is downloaded) and its weights come from a local
file, checked strictly. The feature is the class token of ``last_hidden_state`` (after the final
LayerNorm), which is what both Owkin cards do (``outputs.last_hidden_state[:, 0, :]``).

Why the key renaming: the weight files on the hub were written by transformers 4.x, whose ViT/DINOv2
module tree names an attention projection ``encoder.layer.N.attention.attention.query``; transformers 5
(this project's pin) calls it ``layers.N.attention.q_proj`` (ViT) or ``encoder.layer.N.attention.q_proj``
(DINOv2) and renames at ``from_pretrained`` time (its ``conversion_mapping.py``). We do the same renaming
with the explicit tables below, so a hub file and a file saved by transformers 5 both load, and anything
else (a missing block, a stray head) is a one-line error naming the file.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import torch

from slidechat.features.encoders.base import PatchEncoder, load_checked, require_checkpoint
from slidechat.features.encoders.registry import BuildRequest, EncoderPreset, Factory
from slidechat.model.checkpoint import load_state_dict_file
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

#: transformers 4.x ``ViTModel`` names (the hub files) -> transformers 5 names, applied in order
#: (transformers 5 ``conversion_mapping.py``, entry "ViTModel").
VIT_HUB_NAMES: Tuple[Tuple[str, str], ...] = (
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)

#: transformers 4.x ``Dinov2Model`` names (the hub files) -> transformers 5 names (entry "Dinov2Model";
#: its SwiGLU renames do not apply: Phikon-v2 has a plain GELU MLP, ``mlp.fc1``/``mlp.fc2`` in both).
DINOV2_HUB_NAMES: Tuple[Tuple[str, str], ...] = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
)


@dataclass(frozen=True)
class HFVisionSpec:
    """A transformers vision backbone as its card defines it.

    ``config``: the card's ``config.json`` values (``num_hidden_layers`` is replaced by the request's
    ``depth`` when given). ``hub_names``: the renaming from the hub file's key names to the installed
    transformers'. ``unused``: prefixes of weights the file may hold that the output rule never uses
    (ViT's ``pooler``, which the card drops with ``add_pooling_layer=False``); they are skipped, present
    or not. ``grid_from_checkpoint``: take ``image_size`` from the file's position-embedding grid (the
    parameter's shape is all ``image_size`` decides; the model interpolates it to the input's grid).
    """

    config_cls: Type[Any]
    model_cls: Type[Any]
    config: Mapping[str, Any]
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hub_names: Tuple[Tuple[str, str], ...] = ()
    unused: Tuple[str, ...] = ()
    grid_from_checkpoint: bool = False


def to_module_names(sd: Mapping[str, torch.Tensor], spec: HFVisionSpec, base_prefix: str,
                    source: str) -> Dict[str, torch.Tensor]:
    """The file's weights under the installed model's names.

    A file saved from a model with a head holds the backbone under ``<base_prefix>.`` (``vit.``,
    ``dinov2.``); transformers strips it when every key carries it, and so do we (a head's own weights
    then stay unexpected and are refused).
    """
    keys = list(sd)
    strip = base_prefix + "."
    if keys and all(k.startswith(strip) for k in keys):
        sd = {k[len(strip):]: v for k, v in sd.items()}
    out: Dict[str, torch.Tensor] = {}
    skipped = 0
    for key, value in sd.items():
        if spec.unused and key.startswith(spec.unused):
            skipped += 1
            continue
        for pattern, repl in spec.hub_names:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if skipped:
        logger.info("%s: %d weights the feature does not use (%s) skipped", source, skipped,
                    ", ".join(spec.unused))
    return out


def image_size_from_grid(sd: Mapping[str, torch.Tensor], patch_size: int, source: str) -> Optional[int]:
    """``image_size`` whose position-embedding grid (plus the class token) the file holds."""
    pos = sd.get("embeddings.position_embeddings")
    if pos is None or pos.ndim != 3:
        return None  # the strict key check names the missing weight
    n = int(pos.shape[1]) - 1
    side = math.isqrt(max(n, 0))
    if side * side != n or side == 0:
        raise SlideChatError(f"position embeddings of {n} patches are not a square grid", Path(source),
                             hint="is this the right --checkpoint for this encoder?")
    return side * patch_size


class TransformersVisionEncoder(PatchEncoder):
    """A preset's transformers backbone; the feature is ``last_hidden_state[:, 0]``."""

    def __init__(self, preset: EncoderPreset, request: BuildRequest, spec: HFVisionSpec) -> None:
        super().__init__(preset)
        path = require_checkpoint(request.checkpoint, preset.name) if request.load_weights else None
        config = dict(spec.config)
        if request.depth is not None:
            config["num_hidden_layers"] = int(request.depth)
        sd = None
        if path is not None:
            prefix = str(getattr(spec.model_cls, "base_model_prefix", ""))
            sd = to_module_names(load_state_dict_file(path), spec, prefix, str(path))
            if spec.grid_from_checkpoint:
                size = image_size_from_grid(sd, int(config["patch_size"]), str(path))
                if size is not None and size != config.get("image_size"):
                    logger.info("%s: position embeddings of %s for %d px (config %s)", preset.name, path, size,
                                config.get("image_size"))
                    config["image_size"] = size
        self.model = spec.model_cls(spec.config_cls(**config), **spec.model_kwargs)
        if path is not None and sd is not None:
            load_checked(self.model, sd, str(path), preset.name, allow_unexpected=False)
            self.record_checkpoint(path)
        self.check_width(int(self.model.config.hidden_size))
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def hf_vision(spec: HFVisionSpec) -> Factory:
    """The factory of a transformers-backbone preset."""

    def build(preset: EncoderPreset, request: BuildRequest) -> PatchEncoder:
        return TransformersVisionEncoder(preset, request, spec)

    return build
