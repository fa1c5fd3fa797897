"""Patch encoders behind one registry: ``build_encoder(name, checkpoint=...)``.

``tiny_test`` (deterministic test/demo stand-in, no weights), ``conch_v1`` (SlideChat's features),
``resnet50_trunc`` (CLAM baseline) and ``timm:<model_name>``. Every real model loads a local
``--checkpoint``; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

from slidechat.features.encoders.base import PatchEncoder
from slidechat.features.encoders.conch import ConchV1Encoder
from slidechat.features.encoders.resnet import ResNet50TruncEncoder
from slidechat.features.encoders.timm_model import TimmEncoder
from slidechat.features.encoders.tiny import TinyTestEncoder
from slidechat.utils.errors import SlideChatError

ENCODERS = ("tiny_test", "conch_v1", "resnet50_trunc", "timm:<model_name>")


def list_encoders() -> List[str]:
    return list(ENCODERS)


def build_encoder(name: str, checkpoint: Optional[Union[str, os.PathLike]] = None) -> PatchEncoder:
    """Build an encoder in eval mode on CPU."""
    if name == "tiny_test":
        enc: PatchEncoder = TinyTestEncoder()
    elif name in ("conch_v1", "conch"):
        enc = ConchV1Encoder(checkpoint)
    elif name in ("resnet50_trunc", "resnet50"):
        enc = ResNet50TruncEncoder(checkpoint)
    elif name.startswith("timm:") and len(name) > 5:
        enc = TimmEncoder(name[5:], checkpoint)
    else:
        raise SlideChatError(f"unknown encoder '{name}'", hint="choose one of " + ", ".join(ENCODERS))
    return enc.eval()


__all__ = ["PatchEncoder", "build_encoder", "list_encoders", "ENCODERS"]
