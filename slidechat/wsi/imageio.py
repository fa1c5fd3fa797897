"""The one image loader: every file decoded whole goes through here (cytology fields of view for
training, ``infer`` and ``chat --image``, and slides given as plain images).

Two rules, applied per call and never by changing PIL's process-wide state:

* **Pixel-count limit.** The size is read from the file's header first (PIL's lazy open decodes no
  pixels); a file declaring more than the limit is refused with one line before any pixel is decoded,
  so a 7 MB PNG declaring 50,000 x 50,000 px costs nothing. The limit is ``max_pixels`` when given,
  else ``$SLIDECHAT_IMAGE_PIXEL_LIMIT``, else :data:`DEFAULT_PIXEL_LIMIT` (2**29 = 536,870,912 px,
  about 23,170 x 23,170): a 20,000 x 20,000 field (400 Mpx, 1.2 GB as RGB) is allowed, a
  50,000 x 50,000 bomb (2.5 Gpx, 7.5 GB as RGB) is not. Larger legitimate images belong in a tiled,
  pyramidal TIFF, which OpenSlide reads tile by tile. PIL's own guard (``Image.MAX_IMAGE_PIXELS``) is
  a global that would refuse a 20k field by default, so identification goes through PIL's plugin
  registry (``Image.ID``/``Image.OPEN``, what ``Image.open`` itself uses) without that global check,
  and the global is never modified.
* **Modes to RGB** (:func:`to_rgb`), each decided here once:

  - 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) keeps its high byte, ``v >> 8`` (65535 ->
    255): scaled by the range of the dtype, not of the image, so intensities mean the same in every
    file (a pale field stays pale; a per-image min-max stretch would not). It is what PIL itself does
    with 48-bit RGB PNGs and what torchvision's ``to_dtype(uint16 -> uint8, scale=True)`` does (a bit
    shift). PIL's own ``convert("RGB")`` clips at 255, which turns any 16-bit image white. 12-bit data
    stored in 16-bit files comes out dark under this rule; that is the file's declared range.
  - ``I`` (32-bit int: how older PIL versions open 16-bit files) is taken as 16-bit data: clipped to
    0..65535, then ``v >> 8``. ``F`` (float) has no defined range and is refused.
  - Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or grey/RGB images with a
    transparent colour) is composited on white, as the slide reader does for transparent areas
    (glass is white): ``out = (c * a + 255 * (255 - a)) / 255``, rounded.
  - Palette ``P``, ``1``, ``L``, ``CMYK`` (``(255 - c) * (255 - k) / 255``, no ICC profile applied),
    ``YCbCr``, ``HSV``: PIL's conversion, which is exact for these.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Tuple

import numpy as np
from PIL import Image

from slidechat.utils.errors import SlideChatError, exception_text
from slidechat.utils.paths import PathLike

#: Environment variable overriding :data:`DEFAULT_PIXEL_LIMIT` (a positive number of pixels).
PIXEL_LIMIT_ENV = "SLIDECHAT_IMAGE_PIXEL_LIMIT"
#: Default pixel-count limit for decoding one image whole (see the module doc for why 2**29).
DEFAULT_PIXEL_LIMIT = 2 ** 29

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageTooLargeError(SlideChatError):
    """The file's header declares more pixels than the limit in force (nothing was decoded)."""


def pixel_limit(max_pixels: Optional[int] = None) -> int:
    """The limit in force: ``max_pixels``, else ``$SLIDECHAT_IMAGE_PIXEL_LIMIT``, else the default."""
    if max_pixels is not None:
        if int(max_pixels) < 1:
            raise SlideChatError(f"pixel limit must be >= 1, got {max_pixels}")
        return int(max_pixels)
    env = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not env:
        return DEFAULT_PIXEL_LIMIT
    try:
        value = int(float(env))
    except ValueError:
        value = 0
    if value < 1:
        raise SlideChatError(f"${PIXEL_LIMIT_ENV}={env!r} is not a positive number of pixels")
    return value


def limit_hint() -> str:
    return f"set {PIXEL_LIMIT_ENV}=<pixels> to raise it"


def sniff_format(path: PathLike) -> Optional[str]:
    """The container a file's first bytes announce (``png``, ``jpeg``, ``tiff``, ``bigtiff``,
    ``dicom``, ``bmp``, ``gif``, ``webp``), or None; used to route a file by content, not by name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "bigtiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _identify(fh: BinaryIO, filename: str) -> Image.Image:
    """``Image.open`` without its global decompression-bomb check (the caller applies a per-call limit).

    Same registry and order as ``Image.open``: common plugins first (``preinit``), then all (``init``).
    """
    prefix = fh.read(16)
    tried = set()
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            ok = accept(prefix) if accept else True
            if not ok or isinstance(ok, str):
                continue
            fh.seek(0)
            try:
                return factory(fh, filename)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise Image.UnidentifiedImageError("not an image file PIL can identify")


@contextlib.contextmanager
def open_header(path: PathLike, max_pixels: Optional[int] = None, *,
                check_limit: bool = True, hint: Optional[str] = None) -> Iterator[Image.Image]:
    """The lazily opened image (header read, no pixels decoded), refused when over the pixel limit.

    Errors are :class:`SlideChatError` naming the file: missing, not an image, zero-sized, too large.
    """
    p = Path(path)
    if not p.is_file():
        raise SlideChatError("image not found", p)
    limit = pixel_limit(max_pixels) if check_limit else None
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise SlideChatError(f"cannot read image ({exception_text(e)})", p) from None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns on odd headers; the error below is the message
                im = _identify(fh, str(p))
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
            raise SlideChatError(f"cannot read image ({exception_text(e)})", p) from None
        w, h = im.size
        if w < 1 or h < 1:
            raise SlideChatError(f"image has no pixels ({w}x{h})", p)
        if limit is not None and w * h > limit:
            raise ImageTooLargeError(
                f"image is {w} x {h} px ({w * h:,} px), over the limit of {limit:,} px for decoding a "
                "whole image", p,
                hint=hint or limit_hint())
        yield im
    finally:
        fh.close()


def image_size(path: PathLike, max_pixels: Optional[int] = None, *, check_limit: bool = True
               ) -> Tuple[int, int]:
    """``(width, height)`` from the header only; over the pixel limit is an error unless
    ``check_limit=False`` (when only the size is wanted, nothing is decoded)."""
    with open_header(path, max_pixels, check_limit=check_limit) as im:
        return im.size


def read_image(path: PathLike, max_pixels: Optional[int] = None, *, hint: Optional[str] = None
               ) -> Image.Image:
    """Decode ``path`` whole into an ``RGB`` image (:func:`to_rgb`), after the header's size passed the
    pixel limit; missing, truncated, over-limit or unsupported files are a one-line SlideChatError."""
    p = Path(path)
    with open_header(p, max_pixels, hint=hint) as im:
        try:
            with warnings.catch_warnings():  # a corrupt file should fail with one clear error
                warnings.simplefilter("ignore")
                im.load()
        except Exception as e:
            raise SlideChatError(f"cannot read image ({exception_text(e)})", p) from None
        return to_rgb(im, p)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight (non-premultiplied) colour over white: ``(c * a + 255 * (255 - a)) / 255``, rounded.

    ``rgb`` uint8 ``(..., 3)``, ``alpha`` uint8 ``(...)``; fully opaque input is returned unchanged.
    The numerator over 255 (odd) is never a half, so integer ``(n + 127) // 255`` is exact rounding.
    """
    if alpha.size == 0 or int(alpha.min()) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))


def to_rgb(img: Image.Image, path: Optional[PathLike] = None) -> Image.Image:
    """``img`` as ``RGB`` under the module's mode rules (16-bit scaled, alpha on white, ...)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(img)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        grey = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(grey), "L").convert("RGB")
    if mode == "F":
        raise SlideChatError("32-bit float image: its intensity range is not defined", path,
                             hint="save it as an 8-bit or 16-bit image")
    if mode in ("RGBa", "La"):  # premultiplied: straight alpha first
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
        mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        try:
            rgba = np.asarray(img.convert("RGBA"))
        except (ValueError, OSError) as e:
            raise SlideChatError(f"cannot convert {mode} image to RGB ({exception_text(e)})", path) from None
        return Image.fromarray(composite_on_white(rgba[..., :3], rgba[..., 3]), "RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise SlideChatError(f"cannot convert {mode} image to RGB ({exception_text(e)})", path) from None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 -> RGB: transparent pixels (outside the scanned area) become white, like glass.

    OpenSlide hands back straight (un-premultiplied) RGBA, so this is the same composite on white as
    for image files (:func:`slidechat.wsi.imageio.composite_on_white`): one rule for every path.
    """
    return composite_on_white(rgba[..., :3], rgba[..., 3])
