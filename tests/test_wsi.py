"""Slides, tissue segmentation and patch grids on generated slides opened with real OpenSlide."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from slidechat.utils.errors import SlideChatError
from slidechat.wsi.patching import plan_patches
from slidechat.wsi.slide import Resolution, Slide, resolve_resolution, slide_id
from slidechat.wsi.synthetic import MASK_DOWNSAMPLE
from slidechat.wsi.tissue import TissueParams, segment_tissue, whole_slide_mask


def _truth(path):
    return np.asarray(Image.open(path)) > 0


def test_synthetic_slides_have_aperio_metadata(synthetic_slides):
    import openslide

    o = openslide.OpenSlide(str(synthetic_slides["tumor20"]))
    assert o.properties["openslide.vendor"] == "aperio"
    assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(o.properties["openslide.objective-power"]) == pytest.approx(20)
    o40 = openslide.OpenSlide(str(synthetic_slides["tumor40"]))
    assert float(o40.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert o40.level_count >= 2 and o40.level_downsamples[1] == pytest.approx(4)
    s = Slide(synthetic_slides["nometa"])
    assert s.vendor == "aperio" and s.mpp is None and s.objective is None


@pytest.mark.parametrize("key", ["tumor20", "tumor40", "inflamed20"])
def test_tissue_mask_iou(synthetic_slides, key):
    import cv2

    truth = _truth(synthetic_slides[key + "_mask"])
    with Slide(synthetic_slides[key]) as s:
        tm = segment_tissue(s)
    ours = cv2.resize(tm.mask.astype(np.float32), truth.shape[::-1], interpolation=cv2.INTER_AREA) > 0.5
    iou = (ours & truth).sum() / (ours | truth).sum()
    assert truth.mean() > 0.1
    assert iou >= 0.9, iou


def _truth_fraction(truth, x, y, ps0):
    ds = MASK_DOWNSAMPLE
    return truth[y // ds:(y + ps0) // ds, x // ds:(x + ps0) // ds].mean()


@pytest.mark.parametrize("key,ps0", [("tumor20", 224), ("tumor40", 448)])
def test_patches_lie_in_tissue_at_20x(synthetic_slides, key, ps0):
    truth = _truth(synthetic_slides[key + "_mask"])
    with Slide(synthetic_slides[key]) as s:
        res = resolve_resolution(s)
        grid = plan_patches(s, segment_tissue(s), res, target_magnification=20, patch_size=224)
        assert res.source == "metadata-mpp"
        assert grid.patch_size_level0 == ps0 and grid.read_level == 0 and grid.read_size == ps0
        assert grid.target_mpp == pytest.approx(0.5)
        assert len(grid) > 3 and grid.coords.dtype == np.int64
        W, H = s.dimensions
        for x, y in grid.coords:
            assert 0 <= x <= W - ps0 and 0 <= y <= H - ps0
            assert x % ps0 == 0 and y % ps0 == 0
            assert _truth_fraction(truth, x, y, ps0) >= 0.4
        # row-major order
        order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
        assert (order == np.arange(len(grid))).all()


def test_target_mpp_and_pyramid_level(synthetic_slides):
    with Slide(synthetic_slides["tumor40"]) as s:
        grid = plan_patches(s, segment_tissue(s), resolve_resolution(s), target_mpp=1.0, patch_size=128)
        # 1.0 / 0.25 = 4x: read from the 4x level at its native size
        assert grid.patch_size_level0 == 512 and grid.read_level == 1 and grid.read_size == 128
        assert grid.coords_attrs()["patch_level"] == 1


def test_missing_metadata_needs_flag(synthetic_slides):
    with Slide(synthetic_slides["nometa"]) as s:
        with pytest.raises(SlideChatError) as e:
            resolve_resolution(s)
        assert "--base-mpp" in str(e.value) and "s_nometa" in str(e.value)
        assert resolve_resolution(s, base_mpp=0.5) == Resolution(0.5, 20.0, "user")
        assert resolve_resolution(s, base_magnification=40).mpp == pytest.approx(0.25)


def test_blank_slide_has_no_tissue(synthetic_slides):
    with Slide(synthetic_slides["blank"]) as s:
        tm = segment_tissue(s)
        assert tm.mask.mean() < 0.01
        with pytest.raises(SlideChatError, match="no tissue"):
            plan_patches(s, tm, resolve_resolution(s))
        # whole-image mode keeps every grid position
        g = plan_patches(s, whole_slide_mask(s), resolve_resolution(s))
        assert len(g) == (1024 // 224) ** 2


def test_corrupt_and_missing_files_name_the_file(synthetic_slides, tmp_path):
    with pytest.raises(SlideChatError, match="s_corrupt.svs"):
        Slide(synthetic_slides["corrupt"])
    with pytest.raises(SlideChatError, match="not found"):
        Slide(tmp_path / "nope.svs")


def test_plain_image_and_too_small(synthetic_slides, tmp_path):
    with Slide(synthetic_slides["fov"]) as s:
        assert s.dimensions == (512, 512) and s.level_count == 1 and s.mpp is None
        reg = s.read_region((500, 500), 0, (20, 20))
        assert reg.shape == (20, 20, 3) and (reg[15:, 15:] == 255).all()  # outside = white
        # scattered cells are below the slide-oriented default minimum area: lower it
        tm = segment_tissue(s, TissueParams(min_tissue_area=500))
        assert 0.05 < tm.tissue_fraction < 0.9
        g = plan_patches(s, tm, Resolution(0.5, 20, "user"), tissue_threshold=0.1)
        assert len(g) >= 1
    small = tmp_path / "small.png"
    Image.fromarray(np.full((100, 120, 3), 128, np.uint8)).save(small)
    with Slide(small) as s:
        with pytest.raises(SlideChatError, match="smaller than one patch"):
            plan_patches(s, whole_slide_mask(s), Resolution(0.5, 20, "user"))


def test_slide_id_suffixes():
    assert slide_id("/a/TCGA-AB-1234.01.svs") == "TCGA-AB-1234.01"
    assert slide_id("x/img.ome.tiff") == "img"
    assert slide_id("odd name ü.v2.svs") == "odd name ü.v2"
    assert slide_id("noext") == "noext"


# ----------------------------------------------------------------------------------------------
# resolution metadata that must not be trusted, and the explicit override


def _generic_tiff(path, resolution=None, unit=None):
    """A tiled generic TIFF (not Aperio): tissue-coloured content, optionally a resolution tag."""
    import tifffile

    from slidechat.wsi.synthetic import SlideSpec, render_region, tissue_field

    spec = SlideSpec("dpi", "tumor", 1024, 1024, 0.5, seed=9)
    img = render_region(spec, tissue_field(spec), 0, 0, 1024, 1024, 1.0)
    kw = {} if resolution is None else {"resolution": (resolution, resolution), "resolutionunit": unit}
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg", **kw)
    return path


def test_default_dpi_tiff_resolution_is_not_trusted(tmp_path):
    from slidechat.apps.extract import extract_slides

    path = _generic_tiff(tmp_path / "scan72.tif", 72, "INCH")
    with Slide(path) as s:
        assert s.vendor == "generic-tiff"
        assert s.mpp is None and "72" in s.mpp_rejected  # OpenSlide alone says 352.8 µm/px
        with pytest.raises(SlideChatError, match="--base-mpp") as e:
            resolve_resolution(s)
        assert "72 pixels per inch" in str(e.value)
        assert resolve_resolution(s, base_mpp=0.5) == Resolution(0.5, 20.0, "user")
    s = extract_slides([path], tmp_path / "out", encoder="tiny_test", base_mpp=0.5, progress=False,
                       num_workers=0)
    assert s["done"] == ["scan72"]
    # a real microscope resolution in centimetres is kept
    with Slide(_generic_tiff(tmp_path / "scan_cm.tif", 40000, "CENTIMETER")) as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_rejected is None


def test_base_mpp_overrides_metadata_only_when_asked(synthetic_slides):
    with Slide(synthetic_slides["tumor20"]) as s:  # the file says 0.5 µm/px
        assert resolve_resolution(s, base_mpp=0.25).mpp == pytest.approx(0.5)
        r = resolve_resolution(s, base_mpp=0.25, override=True)
        assert r == Resolution(0.25, 40.0, "user-override")
        grid = plan_patches(s, whole_slide_mask(s), r, target_magnification=20, patch_size=224)
        assert grid.patch_size_level0 == 448 and grid.coords_attrs()["mpp_source"] == "user-override"


# ----------------------------------------------------------------------------------------------
# the fast reader gives the pixels of the plain OpenSlide path


def _reference_patches(path, grid, idx, method):
    """Per patch: OpenSlide read_region at the grid's level -> RGB -> PIL resize/reduce to the patch size."""
    import openslide

    o = openslide.OpenSlide(str(path))
    P, r = grid.patch_size, grid.read_size
    out = []
    for i in idx:
        x, y = grid.coords[i]
        im = o.read_region((int(x), int(y)), grid.read_level, (r, r)).convert("RGB")
        if r != P:
            im = im.reduce(r // P) if method == "reduce" else im.resize((P, P), Image.Resampling.BOX)
        out.append(np.asarray(im))
    o.close()
    return np.stack(out)


@pytest.mark.parametrize("case", ["40x_to_20x", "20x_native", "lower_level", "non_integer"])
def test_patch_reader_matches_openslide_reference(synthetic_slides, case):
    from slidechat.wsi.reader import PatchReader

    key, kw, method = {
        "40x_to_20x": ("tumor40", dict(target_magnification=20, patch_size=224), "reduce"),
        "20x_native": ("tumor20", dict(target_magnification=20, patch_size=224), "reduce"),
        "lower_level": ("tumor40", dict(target_mpp=1.0, patch_size=128), "reduce"),   # level 1 (4x)
        "non_integer": ("tumor40", dict(target_mpp=0.4, patch_size=112), "box"),       # 1.6x, 179 px
    }[case]
    path = synthetic_slides[key]
    with Slide(path) as s:
        grid = plan_patches(s, segment_tissue(s), resolve_resolution(s), tissue_threshold=0.5, **kw)
    idx = np.arange(len(grid))
    ref = _reference_patches(path, grid, idx, method)
    for direct in (True, False):
        reader = PatchReader(path, grid, batch_size=8, direct_tiles=direct, cache_mb=64)
        got = reader.read(idx)
        if direct and case != "non_integer":
            assert reader._slide._tiles is not None  # the fast path really ran
        reader.close()
        assert got.shape == ref.shape and np.array_equal(got, ref), (case, direct)


@pytest.mark.parametrize("key,mag", [("tumor40", 20), ("tumor20", 20)])
def test_band_sized_tile_cache_still_decodes_each_tile_once(synthetic_slides, key, mag):
    """The reader caps its tile cache at the band of tiles a row-major scan reuses (fresh cache memory
    costs a page fault per 4 KB): every tile under the grid must still be decoded exactly once, and the
    cap must be the band (tile rows one patch row spans, + 1 shared with the next, + 1 of slack, across the
    grid's columns), far below the cache_mb asked for."""
    from slidechat.wsi.reader import PatchReader

    path = synthetic_slides[key]
    with Slide(path) as s:
        grid = plan_patches(s, segment_tissue(s), resolve_resolution(s), target_magnification=mag,
                            patch_size=224, tissue_threshold=0.5)
    reader = PatchReader(path, grid, batch_size=8, cache_mb=512)
    got = np.concatenate([reader.read(b) for b in reader.batches])
    tiles = reader._slide._tiles
    lv = tiles.levels[grid.read_level]
    ds = grid.read_downsample
    # the tiles under the patches, from the coordinates alone
    needed = set()
    for x, y in grid.coords:
        lx, ly = int(x // ds), int(y // ds)
        for ty in range(ly // lv.tile_h, (ly + grid.read_size - 1) // lv.tile_h + 1):
            for tx in range(lx // lv.tile_w, (lx + grid.read_size - 1) // lv.tile_w + 1):
                needed.add((ty, tx))
    assert tiles.tiles_decoded == len(needed)
    f = grid.read_size // grid.patch_size
    x0, x1 = int(grid.coords[:, 0].min() // ds), int(grid.coords[:, 0].max() // ds) + grid.read_size
    across = (min(x1, lv.width) - 1) // lv.tile_w - x0 // lv.tile_w + 1
    band = across * (-(-grid.read_size // lv.tile_h) + 2) * (lv.tile_h // f) * (lv.tile_w // f) * 3
    assert tiles._cache_limit == min(band, 512 * 2 ** 20) < 512 * 2 ** 20
    assert tiles._cache_bytes <= tiles._cache_limit
    # buffers kept for reuse are only full-size tiles the cache let go, each taken by the next decode: they
    # never pile up (reduced 40x tiles, which nothing decodes into, are not kept)
    assert sum(len(v) for v in tiles._free.values()) <= 1
    reader.close()
    # the tiles under the grid outnumber what the band holds, so evicted tiles' buffers were decoded into
    # again (and at 40x every tile went through the one scratch buffer before its 2x2 reduce): the
    # pixels must still be OpenSlide's
    assert len(needed) * (lv.tile_h // f) * (lv.tile_w // f) * 3 > tiles._cache_limit
    ref = _reference_patches(path, grid, np.arange(len(grid)), "reduce")
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("key,mag", [("tumor20", 20), ("tumor40", 40)])
def test_recycled_tile_buffers_never_alias_a_cached_tile(synthetic_slides, key, mag):
    """Full-size tiles are decoded into the buffers of tiles the cache evicted: with a cache of a few
    tiles (most tiles evicted and decoded again, in row order and in a shuffled order) every patch must
    still be OpenSlide's pixels; a buffer handed out while its tile is still cached would show here."""
    from slidechat.wsi.reader import PatchReader

    path = synthetic_slides[key]
    with Slide(path) as s:
        grid = plan_patches(s, segment_tissue(s), resolve_resolution(s), target_magnification=mag,
                            patch_size=224, tissue_threshold=0.1)
    ref = _reference_patches(path, grid, np.arange(len(grid)), "reduce")
    order = np.random.default_rng(0).permutation(len(grid))
    reader = PatchReader(path, grid, batch_size=8, cache_mb=4 * 256 * 256 * 3 / 2 ** 20)  # 4 tiles
    assert np.array_equal(np.concatenate([reader.read(b) for b in reader.batches]), ref)
    assert np.array_equal(reader.read(order), ref[order])
    tiles = reader._slide._tiles
    assert tiles.levels[grid.read_level].jpeg is not None  # the decode-into-a-buffer path ran
    assert tiles.tiles_decoded > 2 * len(tiles._cache)      # and tiles were evicted and decoded again
    reader.close()


def test_read_downsampled_fills_every_output_pixel(tmp_path):
    """``read_downsampled`` rounds the output size up (ceil): the last column/row must come from the
    slide too, not be left as uninitialised memory (a uniform slide stays uniform at any downsample)."""
    colour = (123, 45, 67)
    path = tmp_path / "uniform.png"
    Image.new("RGB", (1001, 999), colour).save(path)
    with Slide(path) as slide:
        for ds in (4.0, 3.3, 7.0):
            out = slide.read_downsampled(ds, chunk=256)
            assert out.shape == (math.ceil(999 / ds), math.ceil(1001 / ds), 3)
            assert (out == np.array(colour, np.uint8)).all(), ds


# -- issue 15: readers near the decode limit ---------------------------------------------------------


def _pil_reduce(img, f):
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(f))


def test_fast_2x2_reduce_is_pils_reduce_bit_for_bit():
    """The reference is PIL's own ``reduce`` (what the readers produced before): random pixels cover
    every remainder of the 2x2 sum mod 4, so any rounding difference shows; odd sizes and other
    factors take PIL itself; a tile wider than OpenCV's single-stripe limit is done in strips."""
    from slidechat.wsi.tiles import reduce_blocks

    rng = np.random.default_rng(0)
    for h, w in ((256, 256), (240, 512), (1024, 1024), (6, 10)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(reduce_blocks(img, 2), _pil_reduce(img, 2)), (h, w)
    odd = rng.integers(0, 256, (255, 257, 3), dtype=np.uint8)
    assert np.array_equal(reduce_blocks(odd, 2), _pil_reduce(odd, 2))
    assert np.array_equal(reduce_blocks(odd[:252, :252], 4), _pil_reduce(odd[:252, :252], 4))


def _reduce_in_child(q):
    from slidechat.wsi.tiles import reduce_blocks

    img = np.random.default_rng(1).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    q.put(bool(np.array_equal(reduce_blocks(img, 2), _pil_reduce(img, 2))))


def test_fast_reduce_runs_in_a_forked_reader_after_the_parent_used_opencv_threads():
    """Readers are forked after segmentation ran OpenCV on many threads; the reduce must neither hang
    nor differ there (a hang fails this test by its timeout)."""
    import multiprocessing as mp

    import cv2

    big = np.zeros((4096, 4096, 3), np.uint8)
    cv2.resize(big, (2048, 2048), interpolation=cv2.INTER_AREA)  # the parent's thread pool is in use
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_reduce_in_child, args=(q,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive and p.exitcode == 0 and q.get(timeout=5)


def _grid(path, **kw):
    with Slide(path) as s:
        return plan_patches(s, segment_tissue(s), resolve_resolution(s), tissue_threshold=0.5,
                            **(kw or dict(target_magnification=20, patch_size=224)))


def test_reader_processes_hand_over_the_same_pixels_through_recycled_slots(synthetic_slides):
    """Batches read by 2 forked readers into shared-memory slots (fewer slots than batches, so each is
    reused) equal the in-process reads; the forked readers reuse the parent's checked handle."""
    from slidechat.wsi.reader import SLOTS_PER_READER, PatchReader, ReadFailure, stream_batches

    path = synthetic_slides["tumor40"]
    grid = _grid(path, target_magnification=20, patch_size=112)  # 224 px at 40x, reduced 2x2
    with Slide(path) as slide:
        reader = PatchReader(path, grid, batch_size=2, slide=slide)
        assert slide.reads_directly(grid.read_level)
        ref = reader.read(np.arange(len(grid)))
        assert len(reader.batches) > 2 * SLOTS_PER_READER + 2  # every slot is reused at least once
        got = np.zeros_like(ref)
        seen = []
        for item in stream_batches(reader, reader.batches, 2):
            assert not isinstance(item, ReadFailure), item
            patches, idx, _ = item
            got[idx] = patches  # copied before the next batch may reuse the slot
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(len(grid)))
        assert np.array_equal(got, ref)
        out = np.zeros((3,) + ref.shape[1:], np.uint8)
        assert reader.read(np.arange(3), out) is out and np.array_equal(out, ref[:3])
        reader.close()


def test_a_reader_process_that_dies_ends_the_stream_with_a_failure(synthetic_slides, monkeypatch):
    import os

    from slidechat.wsi.reader import PatchReader, ReadFailure, stream_batches

    path = synthetic_slides["tumor20"]
    reader = PatchReader(path, _grid(path, target_magnification=20, patch_size=112), batch_size=4)
    monkeypatch.setattr(PatchReader, "read", lambda self, idx, out=None: os._exit(3))
    items = list(stream_batches(reader, reader.batches, 2))
    assert isinstance(items[-1], ReadFailure) and "exit code 3" in items[-1].reason
    assert items[-1].path == str(path)


def test_forked_slide_reads_like_its_parent_without_reopening(synthetic_slides):
    """``Slide.forked`` shares the checked direct tile reader (its own descriptor and cache) and opens
    OpenSlide only when a read needs it (a region off the level's pixel grid)."""
    path = synthetic_slides["tumor40"]
    with Slide(path) as s:
        assert s.enable_direct_tiles()
        ref = s.read_region((512, 512), 0, (300, 200))
        twin = s.forked()
        assert twin._osr is None and twin._tiles is not s._tiles
        assert np.array_equal(twin.read_region((512, 512), 0, (300, 200)), ref)
        assert twin._osr is None  # read directly
        off = s.read_region((513, 515), 1, (64, 64))  # level 1 is 4x: (513, 515) is off its grid
        assert np.array_equal(twin.read_region((513, 515), 1, (64, 64)), off)
        assert twin._osr is not None
        twin.close()
        assert np.array_equal(s.read_region((512, 512), 0, (300, 200)), ref)  # the parent is untouched
