"""Patch encoders behind one registry: ``build_encoder(name, checkpoint=...)``.

Each family module registers its presets with ``@register_encoder`` when imported below; the names,
dimensions, inputs, magnifications and licences are listed by ``slidechat extract-features
--list-encoders``. Every real model loads a local ``--checkpoint``; nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

# the family modules: importing one registers its presets
from slidechat.features.encoders import (conch, gigapath, hoptimus, musk, phikon, resnet, timm_model,  # noqa: F401
                                          tiny, uni, virchow)
from slidechat.features.encoders.base import PatchEncoder
from slidechat.features.encoders.registry import (BuildRequest, EncoderPreset, format_preset_table, get_preset,
                                                  preset_table, registered_presets)
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike


def list_encoders() -> List[str]:
    """The registered names as a user types them (``timm:<model_name>`` for any timm model)."""
    return [p.display_name for p in registered_presets()]


def build_encoder(name: str, checkpoint: Optional[PathLike] = None, *, depth: Optional[int] = None,
                  load_weights: bool = True) -> PatchEncoder:
    """The encoder ``name`` in eval mode on CPU, its weights loaded strictly from ``checkpoint``.

    ``depth`` builds the preset with fewer blocks (tests); ``load_weights=False`` keeps the random
    initialisation (benchmarks and tests only: features without weights mean nothing).
    """
    preset, argument = get_preset(name)
    if checkpoint is not None and not preset.needs_checkpoint:
        raise SlideChatError(f"encoder '{name}' takes no --checkpoint", Path(checkpoint))
    request = BuildRequest(checkpoint=Path(checkpoint) if checkpoint is not None else None,
                           load_weights=load_weights and preset.needs_checkpoint, depth=depth,
                           argument=argument)
    encoder = preset.factory(preset, request)
    encoder.reduced_depth = depth
    return encoder.eval()


__all__ = ["PatchEncoder", "EncoderPreset", "build_encoder", "list_encoders", "get_preset", "preset_table",
           "format_preset_table", "registered_presets"]
