"""``slidechat serve``'s viewer API: slide list, DeepZoom geometry, tiles, layers, and the guards
(path traversal, body size, token, unreadable slides, a slow chat not blocking tiles).

Expected values are computed here from their rules (the DeepZoom pyramid rule, the H5 coordinates,
the colour map), not read back from the server's own code.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import h5py
import numpy as np
import openslide
import pytest
import uvicorn
from fastapi.testclient import TestClient
from matplotlib import colormaps
from PIL import Image

from serve_fixtures import build_serve_setup, write_screening_output
from slidechat.apps.serve.app import create_app
from slidechat.apps.serve.config import ServeConfig
from slidechat.apps.serve.layers import render_patch_heatmap
from slidechat.apps.serve.security import is_loopback, safe_join
from slidechat.apps.serve.sessions import ChatEngine, ChatResult
from slidechat.apps.serve.tiles import ByteLRU
from slidechat.cli.main import main as cli_main
from slidechat.utils.errors import SlideChatError

TILE, OVERLAP = 254, 1
SVG_NS = "{http://www.w3.org/2000/svg}"
SCREENED = "demo_000_tumor"
SCREEN_FIELDS = [(0, 0, 512, 0.25), (1024, 512, 512, 0.9), (2048, 1536, 512, 0.6)]

#: the Host TestClient sends: an app bound to loopback answers loopback names only (DNS rebinding)
LOCAL = "http://127.0.0.1"


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    return build_serve_setup(tmp_path_factory.getbasetemp() / "serve_setup")


@pytest.fixture(scope="module")
def roots(setup: Dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """A slide root with the demo slides plus the awkward cases: a corrupt file, a name needing an
    URL-safe id, a duplicate id in a sub-folder, a link escaping the root, a link staying inside."""
    base = tmp_path_factory.mktemp("serve_api")
    root = base / "slides"
    (root / "sub").mkdir(parents=True)
    for p in sorted(Path(setup["slides"]).iterdir()):
        shutil.copy(p, root / p.name)
    shutil.copy(root / "demo_001_normal.svs", root / "sub" / "demo_001_normal.svs")  # duplicate id
    shutil.copy(root / "field_tumor.png", root / "my field #1.png")
    (root / "broken.svs").write_bytes(b"II*\x00" + b"\x17" * 4096)  # a TIFF header, then garbage
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(root / "demo_002_inflamed.svs", outside / "secret.svs")
    (root / "escape.svs").symlink_to(outside / "secret.svs")
    (root / "inside_link.png").symlink_to(root / "field_tumor.png")
    screening = base / "screening"
    write_screening_output(screening, SCREENED, SCREEN_FIELDS)
    return {"root": root, "outside": outside, "screening": screening, "features": Path(setup["features"])}


@pytest.fixture(scope="module")
def config(roots: Dict[str, Path]) -> ServeConfig:
    return ServeConfig(slides=roots["root"], features=roots["features"], screening=roots["screening"],
                       max_body_bytes=4096)


@pytest.fixture(scope="module")
def client(config: ServeConfig) -> Iterator[TestClient]:
    with TestClient(base_url=LOCAL, app=create_app(config), raise_server_exceptions=False) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _LiveServer:
    """uvicorn on 127.0.0.1 in a thread, stopped at the end of the test's scope."""

    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def get_raw(self, raw_path: str, timeout: float = 30) -> Tuple[int, bytes, Dict[str, str]]:
        """GET exactly ``raw_path`` (no client-side normalisation of dots or escapes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest("GET", raw_path, skip_accept_encoding=True)
            conn.endheaders()
            r = conn.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()


@pytest.fixture(scope="module")
def live(config: ServeConfig) -> Iterator[_LiveServer]:
    with _LiveServer(create_app(config)) as srv:
        yield srv


# -- independent rules -------------------------------------------------------------------------------
def deepzoom_levels(width: int, height: int) -> List[Tuple[int, int]]:
    """Level sizes of a DeepZoom pyramid: level L = ceil(size / 2^(max_level - L)), 1 x 1 at level 0."""
    max_level = math.ceil(math.log2(max(width, height)))
    return [(math.ceil(width / 2 ** (max_level - lv)), math.ceil(height / 2 ** (max_level - lv)))
            for lv in range(max_level + 1)]


def tile_extent(level_side: int, index: int) -> int:
    """Side of tile ``index`` along one axis: its share of the level plus the overlap on inner edges."""
    n = math.ceil(level_side / TILE)
    core = min(TILE, level_side - TILE * index)
    return core + (OVERLAP if index > 0 else 0) + (OVERLAP if index < n - 1 else 0)


def slide_size(path: Path) -> Tuple[int, int]:
    with openslide.open_slide(str(path)) as s:
        return tuple(int(v) for v in s.dimensions)  # type: ignore[return-value]


def assert_json_error(r: Any, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


# -- the list and one slide ----------------------------------------------------------------------------
def test_list_ids_sizes_and_side_files(client: TestClient, roots: Dict[str, Path]) -> None:
    r = client.get("/api/slides")
    assert r.status_code == 200
    rows = r.json()
    ids = [row["id"] for row in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for sid in ids:
        assert all(ch.isalnum() or ch in "._-" for ch in sid), sid
    by_name: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    # the link escaping the root is not listed, by any name; the link inside the root is
    assert "escape.svs" not in by_name and "secret.svs" not in by_name
    assert "inside_link.png" in by_name
    assert len(by_name["demo_001_normal.svs"]) == 2  # the copy in sub/ gets its own id
    # side files are named by slide id: only one of two same-named slides gets them
    assert sorted(r["has_features"] for r in by_name["demo_001_normal.svs"]) == [False, True]
    assert by_name["my field #1.png"][0]["id"] not in ("my field #1", "")
    for name in ("demo_000_tumor.svs", "demo_001_normal.svs", "demo_002_inflamed.svs"):
        row = min(by_name[name], key=lambda r: r["id"])
        w, h = slide_size(roots["root"] / name)
        assert (row["width"], row["height"]) == (w, h)
        assert row["mpp"] == pytest.approx(float(openslide.OpenSlide(str(roots["root"] / name))
                                                 .properties["openslide.mpp-x"]))
        assert row["has_features"] is True
        assert row["thumbnail"] == f"/api/slides/{row['id']}/thumbnail.jpg"
        assert row["has_screening"] is (row["id"] == SCREENED)
    assert by_name["field_tumor.png"][0]["has_features"] is False
    assert by_name["broken.svs"][0]["error"]


def test_a_slide_added_later_is_listed(roots: Dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(roots["root"] / "field_tumor.png", root / "a.png")
    with TestClient(base_url=LOCAL, app=create_app(ServeConfig(slides=root))) as c:
        assert [r["id"] for r in c.get("/api/slides").json()] == ["a"]
        assert_json_error(c.get("/api/slides/b"), 404)
        time.sleep(0.01)
        shutil.copy(roots["root"] / "field_tumor.png", root / "b.png")
        assert [r["id"] for r in c.get("/api/slides").json()] == ["a", "b"]
        assert c.get("/api/slides/b.dzi").status_code == 200


def test_tile_cache_keeps_to_its_byte_budget() -> None:
    cache = ByteLRU(100)
    for i in range(5):
        cache.put(i, bytes(30))
    assert cache.size_bytes <= 100
    assert cache.get(0) is None and cache.get(4) == bytes(30)  # oldest dropped, newest kept
    cache.get(2)  # used: now the newest
    cache.put(9, bytes(30))
    assert cache.get(2) is not None and cache.get(3) is None
    cache.put("big", bytes(101))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get("big") is None and cache.get(9) is not None


def test_info_counts_patches_and_lists_layers(client: TestClient, roots: Dict[str, Path]) -> None:
    info = client.get(f"/api/slides/{SCREENED}").json()
    with h5py.File(roots["features"] / "h5_files" / f"{SCREENED}.h5", "r") as f:
        n = len(f["coords"])
    assert info["n_patches"] == n and info["levels"] >= 1 and info["error"] is None
    assert set(info["layers"]) == {"tissue", "grid", "screening"}
    plain = client.get("/api/slides/field_tumor").json()
    assert plain["layers"] == ["tissue"] and plain["mpp"] is None and (plain["width"], plain["height"]) == (512, 512)


# -- DeepZoom -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sid,name", [("demo_000_tumor", "demo_000_tumor.svs"), ("field_tumor", "field_tumor.png")])
def test_dzi_matches_the_slide(client: TestClient, roots: Dict[str, Path], sid: str, name: str) -> None:
    r = client.get(f"/api/slides/{sid}.dzi")
    assert r.status_code == 200 and "xml" in r.headers["content-type"]
    root = ET.fromstring(r.text)
    assert root.tag.endswith("Image")
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("254", "1", "jpeg")
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert size is not None
    assert (int(size.get("Width")), int(size.get("Height"))) == slide_size(roots["root"] / name)


def test_tiles_have_the_deepzoom_size_at_every_level(client: TestClient, roots: Dict[str, Path]) -> None:
    w, h = slide_size(roots["root"] / "demo_000_tumor.svs")
    levels = deepzoom_levels(w, h)
    top = len(levels) - 1
    checked = 0
    for lv in (0, 3, top - 3, top - 1, top):
        lw, lh = levels[lv]
        cols, rows = math.ceil(lw / TILE), math.ceil(lh / TILE)
        for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2), (cols - 1, 0)}:
            r = client.get(f"/api/slides/demo_000_tumor_files/{lv}/{col}_{row}.jpeg")
            assert r.status_code == 200, (lv, col, row, r.text[:200])
            assert r.headers["content-type"] == "image/jpeg" and "max-age" in r.headers["cache-control"]
            img = Image.open(io.BytesIO(r.content))
            assert img.format == "JPEG"
            assert img.size == (tile_extent(lw, col), tile_extent(lh, row)), (lv, col, row)
            checked += 1
        # one past the last column / row of the level is outside the pyramid
        assert_json_error(client.get(f"/api/slides/demo_000_tumor_files/{lv}/{cols}_0.jpeg"), 404)
        assert_json_error(client.get(f"/api/slides/demo_000_tumor_files/{lv}/0_{rows}.jpeg"), 404)
    assert checked >= 10
    assert_json_error(client.get(f"/api/slides/demo_000_tumor_files/{top + 1}/0_0.jpeg"), 404)
    assert_json_error(client.get("/api/slides/demo_000_tumor_files/-1/0_0.jpeg"), 404)


def test_full_resolution_tile_shows_the_slide_pixels(client: TestClient, roots: Dict[str, Path]) -> None:
    w, h = slide_size(roots["root"] / "demo_000_tumor.svs")
    top = len(deepzoom_levels(w, h)) - 1
    col, row = 3, 2  # an inner tile: its level-0 origin is col * 254 - overlap
    r = client.get(f"/api/slides/demo_000_tumor_files/{top}/{col}_{row}.jpeg")
    tile = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float64)
    with openslide.OpenSlide(str(roots["root"] / "demo_000_tumor.svs")) as s:
        ref = np.asarray(s.read_region((col * TILE - OVERLAP, row * TILE - OVERLAP), 0,
                                       (tile.shape[1], tile.shape[0])).convert("RGB"), dtype=np.float64)
    assert np.abs(tile - ref).mean() < 6.0  # JPEG loss only; a shifted tile differs by far more
    shifted = np.abs(tile[:, 8:] - ref[:, :-8]).mean()
    assert shifted > np.abs(tile - ref).mean()


def test_thumbnail(client: TestClient, roots: Dict[str, Path]) -> None:
    w, h = slide_size(roots["root"] / "demo_000_tumor.svs")
    img = Image.open(io.BytesIO(client.get("/api/slides/demo_000_tumor/thumbnail.jpg").content))
    assert img.format == "JPEG" and max(img.size) == 256
    assert img.size[0] / img.size[1] == pytest.approx(w / h, rel=0.02)


# -- layers ------------------------------------------------------------------------------------------------
def _viewbox(svg: ET.Element) -> Tuple[float, ...]:
    return tuple(float(v) for v in svg.get("viewBox", "").split())


def test_grid_layer_is_the_h5_patches(client: TestClient, roots: Dict[str, Path]) -> None:
    r = client.get(f"/api/slides/{SCREENED}/layers/grid.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    svg = ET.fromstring(r.text)
    w, h = slide_size(roots["root"] / f"{SCREENED}.svs")
    assert _viewbox(svg) == (0, 0, w, h)
    with h5py.File(roots["features"] / "h5_files" / f"{SCREENED}.h5", "r") as f:
        coords = {(int(x), int(y)) for x, y in f["coords"][()]}
        size = int(f["coords"].attrs["patch_size_level0"])
    rects = list(svg.iter(f"{SVG_NS}rect"))
    assert {(int(float(e.get("x"))), int(float(e.get("y")))) for e in rects} == coords
    assert len(rects) == len(coords)
    assert {(float(e.get("width")), float(e.get("height"))) for e in rects} == {(size, size)}
    assert_json_error(client.get("/api/slides/field_tumor/layers/grid.svg"), 404)  # no features


def _path_polygons(d: str) -> List[np.ndarray]:
    polys = []
    for part in d.split("M")[1:]:
        pts = [tuple(float(v) for v in p.strip(" LZ").split(",")) for p in part.replace("Z", "").split("L")
               if p.strip(" LZ")]
        polys.append(np.array(pts))
    return polys


def test_tissue_layer_encloses_the_patches(client: TestClient, roots: Dict[str, Path]) -> None:
    import cv2

    r = client.get(f"/api/slides/{SCREENED}/layers/tissue.svg")
    assert r.status_code == 200
    svg = ET.fromstring(r.text)
    w, h = slide_size(roots["root"] / f"{SCREENED}.svs")
    assert _viewbox(svg) == (0, 0, w, h)
    d = " ".join(p.get("d", "") for p in svg.iter(f"{SVG_NS}path"))
    polys = _path_polygons(d)
    assert polys and all(len(p) >= 3 for p in polys)
    allpts = np.concatenate(polys)
    assert allpts[:, 0].min() >= 0 and allpts[:, 0].max() <= w and allpts[:, 1].min() >= 0 and allpts[:, 1].max() <= h
    # extraction kept patches on tissue: their centres fall inside the drawn contour (even-odd fill)
    ds = 8
    mask = np.zeros((h // ds + 1, w // ds + 1), np.uint8)
    for p in polys:
        layer = np.zeros_like(mask)
        cv2.fillPoly(layer, [np.round(p / ds).astype(np.int32)], 1)
        mask ^= layer
    with h5py.File(roots["features"] / "h5_files" / f"{SCREENED}.h5", "r") as f:
        coords = f["coords"][()]
        size = int(f["coords"].attrs["patch_size_level0"])
    centres = (coords + size / 2) // ds
    inside = mask[centres[:, 1].astype(int), centres[:, 0].astype(int)]
    assert inside.mean() >= 0.9
    assert mask.mean() < 0.9  # the contour is not just the slide's border
    png = Image.open(io.BytesIO(client.get(f"/api/slides/{SCREENED}/layers/tissue.png").content))
    assert png.mode == "RGBA" and max(png.size) <= 2048
    assert png.size[0] / png.size[1] == pytest.approx(w / h, rel=0.01)


def _inferno(v: float) -> np.ndarray:
    return np.round(np.array(colormaps["inferno"](v)[:3]) * 255)


def test_screening_layer_colours_the_fields(client: TestClient, roots: Dict[str, Path]) -> None:
    rows = client.get(f"/api/slides/{SCREENED}/screening.json").json()
    assert [(r["x"], r["y"], r["size"]) for r in rows] == [f[:3] for f in SCREEN_FIELDS]
    assert [r["score"] for r in rows] == pytest.approx([f[3] for f in SCREEN_FIELDS])
    r = client.get(f"/api/slides/{SCREENED}/layers/screening.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))
    w, h = slide_size(roots["root"] / f"{SCREENED}.svs")
    scale = min(1.0, 2048 / max(w, h))
    assert img.shape[:2] == (round(h * scale), round(w * scale))
    for x, y, size, score in SCREEN_FIELDS:  # screening scores are probabilities: colour = inferno(score)
        px = img[int((y + size / 2) * scale), int((x + size / 2) * scale)]
        assert px[3] > 0 and np.abs(px[:3] - _inferno(score)).max() <= 1
    assert img[int(1800 * scale), int(300 * scale), 3] == 0  # no field there
    assert_json_error(client.get("/api/slides/demo_001_normal/layers/screening.png"), 404)
    assert_json_error(client.get("/api/slides/demo_001_normal/screening.json"), 404)


def _rdbu(v: float) -> np.ndarray:
    from matplotlib import colormaps

    return (np.array(colormaps["RdBu_r"](v)[:3]) * 255).round()


def test_patch_heatmap_rule() -> None:
    coords = np.array([[0, 0], [100, 0], [0, 100], [300, 300]])
    scores = np.array([1.0, 4.0, -2.0, 2.0])
    img = render_patch_heatmap(scores, coords, 100, (400, 800), max_side=200, scale="positive")
    assert img.shape == (200, 100, 4) and img.dtype == np.uint8  # scale 0.25 of 400 x 800 (w x h)
    def at(x: int, y: int, im: np.ndarray = img) -> np.ndarray:
        return im[int(y * 0.25), int(x * 0.25)]
    for (x, y), s in zip(coords, scores):
        px = at(x + 50, y + 50)
        if s <= 0:
            assert px[3] == 0  # negative evidence is not drawn on the positive scale
        else:
            assert px[3] > 0 and np.abs(px[:3] - _inferno(s / 4.0)).max() <= 1
    assert at(250, 150)[3] == 0 and at(50, 700)[3] == 0  # no patch there
    both = render_patch_heatmap(scores, coords, 100, (400, 800), max_side=200, scale="minmax")
    assert both[int(150 * 0.25), int(50 * 0.25), 3] > 0  # the negative patch is drawn, at the low end
    assert np.abs(both[int(150 * 0.25), int(50 * 0.25), :3] - _inferno(0.0)).max() <= 1
    # signed (the evidence's default): 0.5 + 0.5 * s / max|s| on a diverging map, so the sign shows
    # (red for, blue against) and a map whose scores are all negative is not empty
    signed = render_patch_heatmap(scores, coords, 100, (400, 800), max_side=200)
    for (x, y), s in zip(coords, scores):
        px = at(x + 50, y + 50, signed)
        assert px[3] > 0 and np.abs(px[:3] - _rdbu(0.5 + 0.5 * s / 4.0)).max() <= 1
    neg = render_patch_heatmap(-np.abs(scores), coords, 100, (400, 800), max_side=200)
    assert all(at(x + 50, y + 50, neg)[3] > 0 for x, y in coords)
    blue = at(150, 50, neg)  # the most negative patch: the blue end
    assert np.abs(blue[:3] - _rdbu(0.0)).max() <= 1 and blue[2] > blue[0]
    with pytest.raises(SlideChatError):
        render_patch_heatmap(scores[:3], coords, 100, (400, 800))
    with pytest.raises(SlideChatError, match="unknown heatmap scale"):
        render_patch_heatmap(scores, coords, 100, (400, 800), scale="log")


# -- guards ------------------------------------------------------------------------------------------------
def test_safe_join(tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "a.txt").write_text("a")
    (tmp_path / "secret.txt").write_text("s")
    (tmp_path / "pub" / "link.txt").symlink_to(tmp_path / "secret.txt")
    pub = tmp_path / "pub"
    assert safe_join(pub, "a.txt") == (pub / "a.txt").resolve()
    for bad in ("../secret.txt", "a/../../secret.txt", "/etc/passwd", str(tmp_path / "secret.txt"),
                "..\\secret.txt", "a.txt\x00", "link.txt", "", ".", "missing.txt", "C:/x"):
        assert safe_join(pub, bad) is None, bad


TRAVERSALS = [
    "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fapp.py", "/static/..%5capp.py",
    "/static/%2fetc%2fpasswd", "/static//etc/passwd", "/static/index.html%00", "/static/%2e%2e/%2e%2e/serve/app.py",
    "/vendor/osd/%2e%2e/%2e%2e/package.json", "/vendor/osd/..%2f..%2fpackage.json",
    "/api/slides/%2e%2e%2fslides%2fescape", "/api/slides/..%2f..%2foutside%2fsecret.dzi",
    "/api/slides/escape.dzi", "/api/slides/secret/thumbnail.jpg",
]


def test_traversal_refused_on_a_real_server(live: _LiveServer) -> None:
    # each target exists (a naive join would serve it): static/../app.py is serve/app.py
    assert (Path(sys.modules["slidechat.apps.serve.app"].__file__).parent / "static" / ".." / "app.py").is_file()
    for raw in TRAVERSALS:
        status, body, headers = live.get_raw(raw)
        assert status in (400, 404), (raw, status)
        assert b"import" not in body and b"openseadragon" not in body.lower(), raw
        if status == 404:
            assert headers["content-type"].startswith("application/json"), raw
    status, body, _ = live.get_raw("/static/index.html")
    assert status == 200 and b"<html" in body.lower()
    status, body, _ = live.get_raw("/vendor/osd/openseadragon.min.js")
    assert status == 200 and b"OpenSeadragon" in body


def test_unknown_slide_is_404_json(client: TestClient) -> None:
    for url in ("/api/slides/nope", "/api/slides/nope.dzi", "/api/slides/nope_files/0/0_0.jpeg",
                "/api/slides/nope/thumbnail.jpg", "/api/slides/nope/layers/tissue.svg",
                "/api/slides/nope/layers/grid.svg", "/api/slides/nope/screening.json", "/api/nothing"):
        assert "nope" in assert_json_error(client.get(url), 404) or url == "/api/nothing"


def test_corrupt_slide_is_listed_and_refused_cleanly(client: TestClient, roots: Dict[str, Path]) -> None:
    row = next(r for r in client.get("/api/slides").json() if r["name"] == "broken.svs")
    assert row["error"] and "\n" not in row["error"] and "broken.svs" in row["error"]
    assert str(roots["root"]) not in row["error"]  # the server's folders are not told to clients
    for url in (f"/api/slides/{row['id']}.dzi", f"/api/slides/{row['id']}_files/0/0_0.jpeg",
                f"/api/slides/{row['id']}/thumbnail.jpg", f"/api/slides/{row['id']}/layers/tissue.svg"):
        r = client.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
        assert str(roots["root"].parent) not in assert_json_error(r, r.status_code)
    info = client.get(f"/api/slides/{row['id']}").json()
    assert info["error"] and info["layers"] == []


def test_body_limit(client: TestClient, config: ServeConfig) -> None:
    big = b"{" + b" " * (config.max_body_bytes + 10) + b"}"
    assert "larger than" in assert_json_error(client.post("/api/chat", content=big,
                                                          headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed body is counted
        for _ in range(8):
            yield b" " * 1024

    assert_json_error(client.post("/api/chat", content=chunks(), headers={"content-type": "application/json"}), 413)
    small = client.post("/api/chat", json={"slide": "nope", "question": "hi"})
    assert small.status_code != 413


def test_security_headers(client: TestClient) -> None:
    for url in ("/api/slides", "/api/slides/demo_000_tumor.dzi", "/api/slides/nope"):
        r = client.get(url)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


def test_loopback_server_refuses_other_host_names(config: ServeConfig) -> None:
    """Bound to loopback, the app answers only requests that name a loopback host: a page on another site
    that points its own DNS name at 127.0.0.1 (DNS rebinding) gets a 403, not the slides."""
    with TestClient(base_url=LOCAL, app=create_app(config)) as c:
        for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.2"):
            assert c.get("/api/slides", headers={"host": host}).status_code == 200, host
        for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example", "0.0.0.0:8000", ""):
            assert_json_error(c.get("/api/slides", headers={"host": host}), 403)
    # bound elsewhere (with its token), any host name may reach it: the token guards it
    app = create_app(ServeConfig(slides=config.slides, host="0.0.0.0", token="t0ken"))
    with TestClient(app) as c:
        assert c.get("/api/slides", headers={"authorization": "Bearer t0ken"}).status_code == 200


def test_token_required_off_loopback(config: ServeConfig) -> None:
    with pytest.raises(SlideChatError):
        create_app(ServeConfig(slides=config.slides, host="0.0.0.0"))  # no token: refused
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    app = create_app(ServeConfig(slides=config.slides, host="0.0.0.0", token="s3cret-token"))
    with TestClient(base_url=LOCAL, app=app) as c:
        for url in ("/api/slides", "/", "/api/slides/demo_000_tumor.dzi", "/vendor/osd/openseadragon.min.js"):
            assert_json_error(c.get(url), 401)
        assert_json_error(c.get("/api/slides", headers={"Authorization": "Bearer wrong"}), 401)
        assert_json_error(c.get("/api/slides?token=wrong"), 401)
        assert c.get("/api/slides", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        r = c.get("/api/slides?token=s3cret-token")
        assert r.status_code == 200
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "slidechat_token=s3cret-token" in cookie
        assert c.get("/api/slides/demo_000_tumor.dzi").status_code == 200  # the cookie alone now
    with TestClient(base_url=LOCAL, app=app, cookies={"slidechat_token": "s3cret-token"}) as fresh:
        assert fresh.get("/api/slides").status_code == 200
    with TestClient(base_url=LOCAL, app=app, cookies={"slidechat_token": "nope"}) as wrong:
        assert_json_error(wrong.get("/api/slides"), 401)


# -- a slow chat does not hold up tiles ----------------------------------------------------------------------
class SlowEngine(ChatEngine):
    """A chat engine whose answer takes 3 s (a big model), answering from no model at all."""

    family = "slide"
    model_line = "model: slow test engine (NOT A MODEL)"

    def __init__(self, delay: float = 3.0) -> None:  # not the base's: no model to load
        self.started = threading.Event()
        self.delay = delay
        self.executor = ThreadPoolExecutor(max_workers=1)  # the engine's one model thread, as the routes expect

    def ask(self, entry: Any, question: str, session: Optional[str], field: Optional[dict] = None,
            on_token: Optional[Callable[[str], None]] = None, **_more: Any) -> ChatResult:
        self.started.set()
        time.sleep(self.delay)
        for piece in ("slow", " answer"):
            if on_token is not None:
                on_token(piece)
        return ChatResult(answer="slow answer", session=session or "s1", turn=1)


def test_slow_chat_does_not_block_tiles(config: ServeConfig, roots: Dict[str, Path]) -> None:
    import httpx

    engine = SlowEngine()
    w, h = slide_size(roots["root"] / "demo_001_normal.svs")
    top = len(deepzoom_levels(w, h)) - 1
    with _LiveServer(create_app(config, engine)) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        result: Dict[str, Any] = {}

        def chat() -> None:
            with httpx.Client(timeout=30) as c:
                r = c.post(f"{base}/api/chat", json={"slide": "demo_001_normal", "question": "what is it?",
                                                      "session": None})
                result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=chat)
        t0 = time.monotonic()
        t.start()
        assert engine.started.wait(10), "the chat route did not call the engine"
        with httpx.Client(timeout=10) as c:
            for col, row in ((1, 1), (2, 3), (4, 2)):  # not requested before: decoded now, not cached
                ts = time.monotonic()
                r = c.get(f"{base}/api/slides/demo_001_normal_files/{top}/{col}_{row}.jpeg")
                assert r.status_code == 200
                assert time.monotonic() - ts < 1.0
        assert time.monotonic() - t0 < 3.0  # the tiles came while the answer was still being made
        t.join(timeout=20)
        engine.executor.shutdown(wait=False)
        assert result.get("status") == 200 and result["body"]["answer"] == "slow answer"


def test_streamed_answer_arrives_whole_through_the_guard(config: ServeConfig) -> None:
    """A POST whose response streams: the guard replays the body it read, then passes the client's
    later messages (the disconnect listener) through, so the stream ends with its last line."""
    import httpx

    engine = SlowEngine(delay=0.0)
    with _LiveServer(create_app(config, engine)) as srv:
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", f"http://127.0.0.1:{srv.port}/api/chat/stream",
                          json={"slide": "demo_001_normal", "question": "what?", "session": None}) as r:
                assert r.status_code == 200
                lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
    engine.executor.shutdown(wait=False)
    assert "".join(m["token"] for m in lines if "token" in m) == "slow answer"
    assert lines[-1].get("done") is True and lines[-1]["answer"] == "slow answer"


# -- the command line ----------------------------------------------------------------------------------------
def test_cli_refuses_bad_inputs_in_one_line(roots: Dict[str, Path], setup: Dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    def run(*argv: str) -> str:
        caplog.clear()
        assert cli_main(["serve", *argv]) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0]
        return errors[0]

    model = ["--model_name_or_path", str(setup["qwen2vl"])]
    assert "--slides" in run("--slides", str(tmp_path / "missing"), *model)
    assert "--features" in run("--slides", str(roots["root"]), "--features", str(tmp_path / "nope"), *model)
    assert "no model" in run("--slides", str(roots["root"]))
    assert "not both" in run("--slides", str(roots["root"]), *model, "--checkpoint", str(setup["slide_model"]))
    monkeypatch.delenv("SLIDECHAT_OPENSEADRAGON", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert "setup_env.sh" in run("--slides", str(roots["root"]), *model)
