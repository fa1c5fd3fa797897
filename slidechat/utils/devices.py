"""The one device rule of every command: ``--device`` and ``--dtype`` to what torch takes.

``auto`` picks this process's GPU (``LOCAL_RANK`` under a launcher, so the ranks of one machine do not
share a card) and falls back to the CPU; an explicit GPU that is not there is a one-line error, never a
silent CPU run. ``--dtype auto`` is bf16 on a GPU that supports it (as the released models run) and fp32
elsewhere (CPU bf16 matmuls are slow and not what the references compute in).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from slidechat.utils.errors import SlideChatError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: Optional[Union[str, torch.device]] = "auto") -> torch.device:
    """``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``) -> a checked :class:`torch.device`."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SlideChatError(f"bad --device '{device}': {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlideChatError(f"--device {device} requested but CUDA is not available",
                             hint="use --device cpu")
    return dev


def resolve_dtype(dtype: Optional[Union[str, torch.dtype]], device: Union[str, torch.device]) -> torch.dtype:
    """``--dtype`` (``auto``, ``bf16``, ``fp16``, ``fp32`` or a torch dtype) for a model on ``device``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise SlideChatError(f"bad --dtype '{dtype}' (known: auto, {', '.join(DTYPES)})") from None


def resolve_device_dtype(device: Optional[str] = "auto", dtype: Optional[str] = "auto") -> Tuple[str, torch.dtype]:
    """``(device, dtype)`` for loading a generation model: :func:`resolve_device`, :func:`resolve_dtype`."""
    dev = resolve_device(device)
    return str(dev), resolve_dtype(dtype, dev)
