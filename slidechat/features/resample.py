"""PIL's resampling (``Image.resize``) reimplemented exactly for batched uint8 tensors.

Pathology encoders were trained with torchvision transforms on PIL images: ``Resize`` runs PIL's
two-pass separable filter on uint8 with fixed-point coefficients (22 fractional bits), rounding to
uint8 after the horizontal pass and again after the vertical one. ``F.interpolate`` on floats is a
different function (no intermediate rounding, bicubic a = -0.75 instead of PIL's -0.5): on CONCH it moves
the features by 0.4-3 %. This module computes PIL's integer arithmetic bit for bit, on whole batches and on
any device (the GPU when there is one), so preprocessing stays exact without a Python loop per patch.

Reference: Pillow ``src/libImaging/Resample.c`` (``precompute_coeffs``, ``normalize_coeffs_8bpc``,
``ImagingResample{Horizontal,Vertical}_8bpc``, ``clip8``). Pass order: horizontal then vertical, as Pillow
does for every square patch (tested bit-exact against the installed Pillow 13). Pillow 13 switches to
vertical-first for some non-square resizes whose height shrinks much more than their width (its exact
rule is not reproduced here); encoders only ever see square patches.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Dict, Tuple

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # as in Pillow: 8 bits of result, 2 bits of headroom in an int32


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    # Pillow multiplies by (0.54f + 0.46f * cos(x)): float constants promoted to double
    return math.sin(x) / x * (float(np.float32(0.54)) + float(np.float32(0.46)) * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


#: name -> (filter function, support), as Pillow's BOX/BILINEAR/HAMMING/BICUBIC/LANCZOS.
FILTERS: Dict[str, Tuple[Callable[[float], float], float]] = {
    "box": (_box, 0.5), "bilinear": (_bilinear, 1.0), "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0),
}


@lru_cache(maxsize=64)
def pil_coefficients(in_size: int, out_size: int, filter: str = "bicubic",
                     in0: float = 0.0, in1: float = -1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Source indices and int32 fixed-point weights ``(out_size, ksize)`` of one PIL resampling pass.

    Mirrors ``precompute_coeffs`` + ``normalize_coeffs_8bpc``; unused taps get weight 0 (index 0).
    ``in0``/``in1`` are the box edges (default: the whole axis).
    """
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; choose from {', '.join(FILTERS)}")
    fn, fsupport = FILTERS[filter]
    if in1 < 0:
        in1 = float(in_size)
    in0, in1 = float(np.float32(in0)), float(np.float32(in1))  # Pillow passes the box as C floats
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, ksize), np.int64)
    wts = np.zeros((out_size, ksize), np.int32)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)      # C (int) truncates toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = sum(k)  # summed in order, as the C loop does
        if ww != 0.0:
            k = [w / ww for w in k]
        for x, w in enumerate(k):
            idx[xx, x] = x + xmin
            fixed = w * (1 << PRECISION_BITS)
            wts[xx, x] = int(-0.5 + fixed) if w < 0 else int(0.5 + fixed)
    return idx, wts


def _pass(x: torch.Tensor, dim: int, out_size: int, filter: str) -> torch.Tensor:
    """One separable pass along ``dim`` of an int32 tensor holding uint8 values; returns int32 0..255."""
    idx, wts = pil_coefficients(int(x.shape[dim]), int(out_size), filter)
    idx_t = torch.from_numpy(idx).to(x.device)
    w_t = torch.from_numpy(wts).to(x.device)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = None
    for t in range(idx.shape[1]):
        if not wts[:, t].any():
            continue
        term = x.index_select(dim, idx_t[:, t]) * w_t[:, t].view(shape)
        acc = term if acc is None else acc.add_(term)
    if acc is None:  # cannot happen for a real filter; keeps the types honest
        acc = torch.zeros_like(x.index_select(dim, idx_t[:, 0]))
    acc.add_(1 << (PRECISION_BITS - 1))
    return torch.bitwise_right_shift(acc, PRECISION_BITS).clamp_(0, 255)


def pil_resize_uint8(patches: torch.Tensor, size: Tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """``Image.resize((w, h), filter)`` of every image in a uint8 batch ``(B, H, W, C)``, bit-exact.

    ``size`` is ``(height, width)``. Like Pillow: horizontal pass first, each pass rounded to uint8,
    nothing done along an axis whose size does not change.
    """
    if patches.dtype != torch.uint8 or patches.dim() != 4:
        raise ValueError(f"expected a uint8 (B, H, W, C) batch, got {patches.dtype} {tuple(patches.shape)}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"bad output size {size}")
    _, h, w, _ = patches.shape
    if (h, w) == (out_h, out_w):
        return patches
    x = patches.to(torch.int32)
    if w != out_w:
        x = _pass(x, 2, out_w, filter)
    if h != out_h:
        x = _pass(x, 1, out_h, filter)
    return x.to(torch.uint8)


def torchvision_resize_size(h: int, w: int, size: int) -> Tuple[int, int]:
    """Output (h, w) of torchvision ``Resize(size)`` (an int: the shorter side), as torchvision computes it."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(size), int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)
