"""Hostile and unusual images through the one image loader (``slidechat.wsi.imageio``).

Expectations are built independently with numpy from the pixels written (never with the loader):
16-bit grey -> high byte (``v >> 8``), alpha -> composited on white ``(c*a + 255*(255-a)) / 255``,
CMYK -> ``(255-c)*(255-k)/255``, palette -> its palette entries, 1-bit -> 0/255. A decompression
bomb (a 2.4 MB PNG declaring 50,000 x 50,000 px) is refused from its header, in bounded memory.
"""

from __future__ import annotations

import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidechat.data.images import check_image_header, load_image, open_image
from slidechat.utils.errors import SlideChatError
from slidechat.wsi.slide import Slide, resolve_resolution

ROOT = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zero_png(path: Path, w: int, h: int) -> Path:
    """A valid 8-bit grey PNG of zeros without ever holding its pixels: the zlib stream is one
    compressed 1 MiB block of zeros repeated (full flushes make blocks independent) and the Adler-32
    of n zeros is ``(n mod 65521) << 16 | 1``."""
    total = (w + 1) * h  # a filter byte per row
    size = 1 << 20
    n_full, rest = divmod(total, size)
    c = zlib.compressobj(9)
    first = c.compress(bytes(size)) + c.flush(zlib.Z_FULL_FLUSH)
    mid = c.compress(bytes(size)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(bytes(rest)) + c.flush()
    stream = first + mid * (n_full - 1) + tail[:-4] + struct.pack(">I", ((total % 65521) << 16) | 1)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)))
        fh.write(_chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------
# modes -> RGB, against numpy expectations


def _rgb(path: Path) -> np.ndarray:
    out = np.asarray(open_image(path))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out


def _grey3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def test_sixteen_bit_grey_is_scaled_not_white(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    v[0, 0], v[0, 1], v[0, 2] = 0, 65535, 32768
    p = tmp_path / "g16.png"
    Image.fromarray(v).save(p)  # PIL writes a 16-bit grey PNG (mode I;16)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    got = _rgb(p)
    assert np.array_equal(got, _grey3((v // 256).astype(np.uint8)))
    assert got[0, 0, 0] == 0 and got[0, 1, 0] == 255 and got[0, 2, 0] == 128
    assert (got == 255).mean() < 0.05  # not the white image PIL's convert("RGB") makes of it
    # the model path (LLaMA-Factory scaling) sees the same pixels, not white
    big = load_image(p, max_pixels=10 ** 6, min_pixels=1)
    assert np.array_equal(np.asarray(big), _grey3((v // 256).astype(np.uint8)))


def test_sixteen_bit_big_endian_tiff_and_mode_i(tmp_path):
    v = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 53 % 65536).astype(np.uint16)
    p = tmp_path / "g16b.tiff"
    Image.frombytes("I;16B", (40, 30), v.astype(">u2").tobytes()).save(p)
    assert np.array_equal(_rgb(p), _grey3((v >> 8).astype(np.uint8)))
    q = tmp_path / "i32.tiff"
    wide = v.astype(np.int32)
    wide[0, :3] = (-5, 70000, 65535)
    Image.fromarray(wide, "I").save(q)
    want = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
    assert np.array_equal(_rgb(q), _grey3(want))


def _composite(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)[..., None]
    return np.rint(rgb.astype(np.float64) * a / 255 + 255 * (1 - a / 255)).astype(np.uint8)


def test_alpha_is_composited_on_white(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent: white, whatever colour is stored under it
    rgba[0, 1] = (10, 20, 30, 255)
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    got = _rgb(p)
    assert np.array_equal(got, _composite(rgba[..., :3], rgba[..., 3]))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == (10, 20, 30)
    la = rng.integers(0, 256, (20, 24, 2), dtype=np.uint8)
    q = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(q)
    assert np.array_equal(_rgb(q), _composite(_grey3(la[..., 0]), la[..., 1]))


def test_palette_with_transparency_cmyk_and_one_bit(tmp_path):
    palette = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [90, 90, 90]], np.uint8)
    idx = np.random.default_rng(2).integers(0, 4, (16, 18), dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(palette.ravel().tolist())
    p = tmp_path / "pal.png"
    pal.save(p)
    assert np.array_equal(_rgb(p), palette[idx])
    pt = tmp_path / "pal_t.png"
    pal.save(pt, transparency=2)  # palette entry 2 is transparent (PNG tRNS)
    want = palette[idx].copy()
    want[idx == 2] = 255
    assert np.array_equal(_rgb(pt), want)

    cmyk = np.random.default_rng(3).integers(0, 256, (12, 10, 4), dtype=np.uint8)
    c = tmp_path / "c.tiff"
    Image.fromarray(cmyk, "CMYK").save(c)
    k = cmyk[..., 3:].astype(np.float64)
    want_c = np.rint((255 - cmyk[..., :3].astype(np.float64)) * (255 - k) / 255).astype(np.uint8)
    assert np.abs(_rgb(c).astype(int) - want_c).max() <= 1  # integer rounding inside PIL: off by <= 1

    bits = np.random.default_rng(4).integers(0, 2, (9, 17)).astype(bool)
    b = tmp_path / "b.png"
    Image.fromarray(bits).save(b)
    assert np.array_equal(_rgb(b), _grey3(bits.astype(np.uint8) * 255))


def test_slide_given_as_plain_rgba_image_uses_the_same_rules(tmp_path):
    rgba = np.random.default_rng(5).integers(0, 256, (64, 80, 4), dtype=np.uint8)
    p = tmp_path / "field.png"
    Image.fromarray(rgba, "RGBA").save(p)
    with Slide(p) as s:
        assert s.dimensions == (80, 64)
        assert np.array_equal(s.read_region((0, 0), 0, (80, 64)), _composite(rgba[..., :3], rgba[..., 3]))
    v = np.random.default_rng(6).integers(0, 65536, (32, 32), dtype=np.uint16)
    q = tmp_path / "field16.png"
    Image.fromarray(v).save(q)
    with Slide(q) as s:
        assert np.array_equal(s.read_region((0, 0), 0, (32, 32)), _grey3((v >> 8).astype(np.uint8)))


# ----------------------------------------------------------------------------------------------
# pixel-count limit


def test_opening_a_plain_image_slide_leaves_pils_global_limit_alone(synthetic_slides):
    before = Image.MAX_IMAGE_PIXELS
    with Slide(synthetic_slides["fov"]) as s:
        assert s.dimensions == (512, 512)
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


def test_limit_is_per_call_and_independent_of_pils_global(tmp_path, monkeypatch):
    p = tmp_path / "f.png"
    Image.fromarray(np.full((200, 300, 3), 77, np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL alone would refuse 60,000 px
    assert np.asarray(open_image(p)).shape == (200, 300, 3)
    monkeypatch.undo()
    with pytest.raises(SlideChatError, match=r"300 x 200 px .*limit of 59,999 px") as e:
        open_image(p, max_pixels=59_999)
    assert str(p) in str(e.value) and "SLIDECHAT_IMAGE_PIXEL_LIMIT" in str(e.value)
    monkeypatch.setenv("SLIDECHAT_IMAGE_PIXEL_LIMIT", "1000")
    for call in (lambda: open_image(p), lambda: check_image_header(p), lambda: Slide(p)):
        with pytest.raises(SlideChatError, match="over the limit of 1,000 px"):
            call()
    monkeypatch.setenv("SLIDECHAT_IMAGE_PIXEL_LIMIT", "many")
    with pytest.raises(SlideChatError, match="SLIDECHAT_IMAGE_PIXEL_LIMIT"):
        open_image(p)


def test_default_limit_allows_a_20k_field_header(tmp_path):
    """A 20,000 x 20,000 field is legitimate: its header passes the default limit (not decoded here)."""
    small = zero_png(tmp_path / "z.png", 3000, 1000)  # the helper writes a real PNG (> 2 repeated blocks)
    assert np.array_equal(np.asarray(open_image(small)), np.zeros((1000, 3000, 3), np.uint8))
    p = zero_png(tmp_path / "big.png", 20_000, 20_000)
    check_image_header(p)
    with pytest.raises(SlideChatError, match="over the limit"):
        check_image_header(zero_png(tmp_path / "bomb.png", 50_000, 50_000))


def test_bomb_png_refused_by_extraction_in_one_line_and_bounded_memory(tmp_path):
    """extract-features on a 2.4 MB PNG of 50,000 x 50,000 px: one line naming file, size and limit,
    exit 1, no traceback, in a child whose heap is capped at 1.5 GiB (decoding would need 2.5-10 GB)."""
    bomb = zero_png(tmp_path / "bomb.png", 50_000, 50_000)
    assert bomb.stat().st_size < 8 * 2 ** 20
    out = tmp_path / "out"
    cap = int(1.5 * 2 ** 30)

    def limit() -> None:  # RLIMIT_DATA, not RLIMIT_AS: torch maps far more address space than it uses
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    r = subprocess.run([sys.executable, "-m", "slidechat.cli.main", "extract-features", str(bomb), "--out",
                        str(out), "--encoder", "tiny_test", "--no-progress", "--base-mpp", "0.5"],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert errors and all("50000 x 50000 px" in e and "536,870,912" in e and "SLIDECHAT_IMAGE_PIXEL_LIMIT" in e
                          for e in errors), errors
    failures = (out / "failures.csv").read_text()
    assert "bomb" in failures and "over the limit" in failures


# ----------------------------------------------------------------------------------------------
# routing by content


def test_aperio_slide_renamed_png_is_read_as_a_slide(synthetic_slides, tmp_path, caplog):
    renamed = tmp_path / "scan.png"
    shutil.copy(synthetic_slides["tumor20"], renamed)
    with Slide(renamed) as s, Slide(synthetic_slides["tumor20"]) as ref:
        assert s.vendor == ref.vendor == "aperio"
        assert s.level_dimensions == ref.level_dimensions
        assert resolve_resolution(s) == resolve_resolution(ref)
        assert np.array_equal(s.read_region((100, 200), 0, (64, 64)), ref.read_region((100, 200), 0, (64, 64)))
    assert "named .png but the file is a TIFF" in caplog.text


def test_oversized_declared_tiles_are_left_to_openslide(synthetic_slides, monkeypatch):
    """The direct tile reader decodes a whole tile per read: tiles declared larger than MAX_TILE_PIXELS
    (a hostile header) are not read by it; OpenSlide reads the slide, with the same pixels."""
    from slidechat.wsi import tiles

    with Slide(synthetic_slides["tumor20"]) as s:
        ref = s.read_region((256, 256), 0, (128, 128))
        assert s.enable_direct_tiles()  # 256-px tiles: read directly by default
    monkeypatch.setattr(tiles, "MAX_TILE_PIXELS", 255 * 255)
    with Slide(synthetic_slides["tumor20"]) as s:
        assert not s.enable_direct_tiles()
        assert np.array_equal(s.read_region((256, 256), 0, (128, 128)), ref)
