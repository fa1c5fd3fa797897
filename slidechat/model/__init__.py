"""Slide encoder, projector and the LLM wrapper (plain PyTorch + transformers).

Names are exported lazily so ``slidechat.model.constants`` stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SlideEncoderConfig": "slide_encoder",
    "LongNetEncoder": "slide_encoder",
    "Projector": "projector",
    "SlideChatConfig": "slidechat_model",
    "SlideChatModel": "slidechat_model",
    "LoadReport": "slidechat_model",
    "load_state_dict_file": "checkpoint",
    "make_tiny_llm": "tiny_llm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
