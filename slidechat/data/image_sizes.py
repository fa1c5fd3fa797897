"""LLaMA-Factory's image-size arithmetic for the Qwen VL families, written once.

LLaMA-Factory (``mm_plugin.BasePlugin._preprocess_image`` + ``Qwen2VLPlugin._preprocess_image``, the
commit CytoChat pins) shrinks an image whose area exceeds ``image_max_pixels`` by ``sqrt(max / (w*h))``,
enlarges one below ``image_min_pixels`` by ``sqrt(min / (w*h))`` (new sides truncated with ``int``),
then raises each side to at least 28 px and caps the aspect ratio at 180:1 when it exceeds 200:1. The
pixels (:func:`slidechat.data.images.scale_image`) and the box conversions
(:mod:`slidechat.evaluation.boxes`) both follow :func:`lf_resize_steps`, so they cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

from slidechat.utils.errors import SlideChatError

Size = Tuple[int, int]  # (width, height)

#: LLaMA-Factory's defaults (``scripts/vllm_infer.py`` and its data arguments)
IMAGE_MAX_PIXELS = 768 * 768
IMAGE_MIN_PIXELS = 32 * 32
#: the shortest side LLaMA-Factory's Qwen2-VL plugin lets through
MIN_SIDE = 28


def lf_resize_steps(size: Size, max_pixels: Optional[int] = IMAGE_MAX_PIXELS,
                    min_pixels: Optional[int] = IMAGE_MIN_PIXELS) -> Iterator[Tuple[str, Size]]:
    """Each resize LLaMA-Factory makes, in order, as ``(stage, (width, height))``: ``"area"`` steps (the
    pixel-count limits) come before ``"shape"`` steps (sides >= 28, aspect <= 200), as there (the image is
    made RGB between the two). ``None`` skips a limit; with both ``None`` nothing is resized (images fed
    to the processor directly)."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = int(w * f), int(h * f)
        yield "area", (w, h)
    if min_pixels is not None and w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        w, h = int(w * f), int(h * f)
        yield "area", (w, h)
    if max_pixels is None and min_pixels is None:
        return
    if min(w, h) < MIN_SIDE:
        w, h = max(w, MIN_SIDE), max(h, MIN_SIDE)
        yield "shape", (w, h)
    if w / h > 200:
        w = h * 180
        yield "shape", (w, h)
    if h / w > 200:
        h = w * 180
        yield "shape", (w, h)


def lf_scaled_size(image_size: Sequence[int], image_max_pixels: Optional[int] = IMAGE_MAX_PIXELS,
                   image_min_pixels: Optional[int] = IMAGE_MIN_PIXELS) -> Size:
    """The size LLaMA-Factory hands the processor: the last of :func:`lf_resize_steps`.

    ``image_max_pixels=None`` (and ``image_min_pixels=None``) skip that step: images fed to the
    processor directly (transformers / vLLM without LLaMA-Factory).
    """
    out = int(image_size[0]), int(image_size[1])
    if out[0] <= 0 or out[1] <= 0:
        raise SlideChatError(f"image size {image_size!r} must be positive")
    for _, out in lf_resize_steps(out, image_max_pixels, image_min_pixels):
        pass
    return out
