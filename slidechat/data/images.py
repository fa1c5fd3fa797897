"""Field-of-view images as CytoChat saw them: LLaMA-Factory's image scaling for Qwen2-VL.

LLaMA-Factory (``mm_plugin.BasePlugin._preprocess_image`` + ``Qwen2VLPlugin._preprocess_image``, the
commit CytoChat pins) shrinks an image whose area exceeds ``image_max_pixels`` by ``sqrt(max / (w*h))``,
enlarges one below ``image_min_pixels`` by ``sqrt(min / (w*h))`` (new sides truncated with ``int``),
converts to RGB, raises each side to at least 28 px and caps the aspect ratio at 180:1 when it exceeds
200:1. Resizes use PIL's default filter for ``Image.resize``, as there. Qwen2-VL's own processor then
snaps the result to multiples of 28 (``smart_resize``); that step stays in the processor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

from PIL import Image

from slidechat.utils.errors import SlideChatError

PathLike = Union[str, os.PathLike]

IMAGE_MAX_PIXELS = 768 * 768
IMAGE_MIN_PIXELS = 32 * 32
MIN_SIDE = 28


def scale_image(img: Image.Image, max_pixels: int = IMAGE_MAX_PIXELS,
                min_pixels: int = IMAGE_MIN_PIXELS) -> Image.Image:
    """LLaMA-Factory's Qwen2-VL image preprocessing (area limits, RGB, sides >= 28, aspect <= 200)."""
    if img.width * img.height > max_pixels:
        factor = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((int(img.width * factor), int(img.height * factor)))
    if img.width * img.height < min_pixels:
        factor = math.sqrt(min_pixels / (img.width * img.height))
        img = img.resize((int(img.width * factor), int(img.height * factor)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if min(img.width, img.height) < MIN_SIDE:
        img = img.resize((max(img.width, MIN_SIDE), max(img.height, MIN_SIDE)))
    if img.width / img.height > 200:
        img = img.resize((img.height * 180, img.height))
    if img.height / img.width > 200:
        img = img.resize((img.width, img.width * 180))
    return img


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image; a missing, truncated or non-image file is a SlideChatError."""
    p = Path(path)
    if not p.is_file():
        raise SlideChatError("image not found", p)
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()  # mode kept: scale_image resizes first, then converts (as LLaMA-Factory)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise SlideChatError(f"cannot read image ({type(e).__name__}: {e})", p) from None


def load_image(path: PathLike, max_pixels: int = IMAGE_MAX_PIXELS,
               min_pixels: int = IMAGE_MIN_PIXELS) -> Image.Image:
    """Read ``path`` and apply :func:`scale_image`; errors name the file."""
    return scale_image(open_image(path), max_pixels=max_pixels, min_pixels=min_pixels)


def check_image_header(path: PathLike) -> None:
    """Cheap readability check (header only) used when a dataset is read; full decode happens at load."""
    p = Path(path)
    if not p.is_file():
        raise SlideChatError("image not found", p)
    try:
        with Image.open(p) as im:
            w, h = im.size
    except Exception as e:
        raise SlideChatError(f"cannot read image ({type(e).__name__}: {e})", p) from None
    if w < 1 or h < 1:
        raise SlideChatError(f"image has no pixels ({w}x{h})", p)
