"""Field-of-view images as CytoChat saw them: LLaMA-Factory's image scaling for Qwen2-VL.

LLaMA-Factory (``mm_plugin.BasePlugin._preprocess_image`` + ``Qwen2VLPlugin._preprocess_image``, the
commit CytoChat pins) shrinks an image whose area exceeds ``image_max_pixels`` by ``sqrt(max / (w*h))``,
enlarges one below ``image_min_pixels`` by ``sqrt(min / (w*h))`` (new sides truncated with ``int``),
converts to RGB, raises each side to at least 28 px and caps the aspect ratio at 180:1 when it exceeds
200:1. Resizes use PIL's default filter for ``Image.resize``, as there. Qwen2-VL's own processor then
snaps the result to multiples of 28 (``smart_resize``); that step stays in the processor.

Files are decoded by the project's one image loader (:mod:`slidechat.wsi.imageio`): a pixel-count limit
read from the header (``$SLIDECHAT_IMAGE_PIXEL_LIMIT``) and its mode rules. Images reach the scaling
as RGB already, which for RGB/L/CMYK/1 files gives LLaMA-Factory's pixels exactly; it deliberately
differs where LLaMA-Factory's ``convert("RGB")`` is wrong: 16-bit grey (clipped to white there),
alpha (dropped there, exposing whatever colour is under transparent pixels; composited on white
here) and palette images (resized with nearest neighbour there, as palette indices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

from PIL import Image

from slidechat.data.image_sizes import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, lf_resize_steps
from slidechat.utils.paths import PathLike
from slidechat.wsi.imageio import image_size, read_image, to_rgb


def scale_image(img: Image.Image, max_pixels: int = IMAGE_MAX_PIXELS,
                min_pixels: int = IMAGE_MIN_PIXELS) -> Image.Image:
    """LLaMA-Factory's Qwen2-VL image preprocessing (area limits, RGB, sides >= 28, aspect <= 200): each
    resize of :func:`slidechat.data.image_sizes.lf_resize_steps`, the image made RGB after the area ones."""
    for stage, size in lf_resize_steps(img.size, max_pixels, min_pixels):
        if stage == "shape" and img.mode != "RGB":
            img = to_rgb(img)
        img = img.resize(size)
    if img.mode != "RGB":
        img = to_rgb(img)  # the loader's mode rules (16-bit, alpha on white, ...), not PIL's convert
    return img


def open_image(path: PathLike, max_pixels: Optional[int] = None) -> Image.Image:
    """Decode a whole image as RGB through the one image loader (:func:`slidechat.wsi.imageio.read_image`).

    ``max_pixels`` is the decoding limit (default ``$SLIDECHAT_IMAGE_PIXEL_LIMIT`` or the loader's);
    a missing, truncated, over-limit or non-image file is a SlideChatError naming it.
    """
    return read_image(path, max_pixels)


def load_image(path: PathLike, max_pixels: int = IMAGE_MAX_PIXELS,
               min_pixels: int = IMAGE_MIN_PIXELS) -> Image.Image:
    """Read ``path`` and apply :func:`scale_image`; errors name the file.

    ``max_pixels``/``min_pixels`` are LLaMA-Factory's scaling targets, not the decoding limit.
    """
    return scale_image(open_image(path), max_pixels=max_pixels, min_pixels=min_pixels)


@dataclass(frozen=True)
class PreparedImage:
    """An image already read and scaled by LLaMA-Factory's rule (:func:`prepare_image`).

    The type says "do not scale again": the batch builder
    (:func:`slidechat.data.qwen2vl_batch.prepare_generation_batch`) hands it to the processor as it is,
    while raw PIL images and paths get :func:`scale_image` there. The rule is applied once, as in
    LLaMA-Factory: a second pass is not always a no-op (an enlarged image's truncated sides can fall
    under ``min_pixels`` again).
    """

    image: Image.Image

    @property
    def size(self) -> Tuple[int, int]:
        return self.image.size


def prepare_image(image: Union[PathLike, Image.Image, PreparedImage], max_pixels: int = IMAGE_MAX_PIXELS,
                  min_pixels: int = IMAGE_MIN_PIXELS) -> PreparedImage:
    """A path (read, then scaled) or a PIL image (scaled) as a :class:`PreparedImage`; one that is
    prepared already is returned as it is (its scaling is not redone with these limits)."""
    if isinstance(image, PreparedImage):
        return image
    if isinstance(image, Image.Image):
        return PreparedImage(scale_image(image, max_pixels, min_pixels))
    return PreparedImage(load_image(image, max_pixels, min_pixels))


def check_image_header(path: PathLike) -> None:
    """Cheap check (header only) used when a dataset is read: readable, has pixels, within the decoding
    limit, so a bad or oversized image is refused before any model loads; full decode happens at load."""
    image_size(path)
