"""The FastAPI app of ``slidechat serve``: slide list, DeepZoom tiles, overlay layers, the page.

Image routes are plain ``def`` functions, run in FastAPI's thread pool, so a slow chat answer (which
runs on the chat engine's own worker thread) never holds up the tiles of another viewer. Every error
is a JSON ``{"error": "<one line>"}`` with a 4xx/5xx status, never a traceback page.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from slidechat.apps.serve.catalog import Catalog, PatchGrid, SlideEntry, UnknownSlide, read_patch_grid
from slidechat.apps.serve.chat_routes import chat_router
from slidechat.apps.serve.config import ServeConfig
from slidechat.apps.serve.layers import (grid_svg, screening_png, segment_slide_tissue, tissue_png,
                                         tissue_svg)
from slidechat.apps.serve.security import GuardMiddleware, is_loopback, safe_join
from slidechat.apps.serve.sessions import ChatEngine
from slidechat.apps.serve.tiles import TileNotFound, TileServer
from slidechat.evaluation.screening import FieldRow, read_field_table
from slidechat.utils.errors import SlideChatError, exception_text, one_line

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
OSD_ENV = "SLIDECHAT_OPENSEADRAGON"
OSD_SETUP_HINT = "run tools/setup_env.sh (it installs OpenSeadragon with npm)"
TILE_CACHE_CONTROL = "public, max-age=3600"


def find_openseadragon() -> Optional[Path]:
    """The folder holding ``openseadragon.min.js``: ``$SLIDECHAT_OPENSEADRAGON``, else the one
    tools/setup_env.sh installs under the environment's prefix; ``None`` when neither has it."""
    env = os.environ.get(OSD_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(sys.prefix) / "share" / "slidechat-web" / "node_modules" / "openseadragon" / "build"
                      / "openseadragon")
    for c in candidates:
        if (c / "openseadragon.min.js").is_file():
            return c.resolve()
    return None


def public_message(exc: SlideChatError) -> str:
    """The error's line for a client: the file's name, not where it lives on the server."""
    if exc.path is None:
        return str(exc)
    msg = f"{Path(exc.path).name}: {exc.reason}"
    return f"{msg} ({exc.hint})" if exc.hint else msg


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message, 500)}, status_code=status)


class _Layers:
    """Per-slide overlay data computed once: tissue contours, patch grids, screening rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: Dict[Tuple[str, str, str], Any] = {}

    def _get(self, kind: str, entry: SlideEntry, path: Path, compute: Any) -> Any:
        try:
            stamp = str(path.stat().st_mtime_ns)
        except OSError as e:
            raise SlideChatError(f"cannot read {kind} file: {exception_text(e)}", path.name) from e
        key = (kind, entry.id, stamp)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = compute()
        with self._lock:
            self._cache[key] = value
        return value

    def tissue(self, entry: SlideEntry) -> Tuple[List[Any], Tuple[int, int]]:
        return self._get("tissue", entry, entry.path, lambda: segment_slide_tissue(str(entry.path)))

    def grid(self, entry: SlideEntry) -> PatchGrid:
        if entry.features is None:
            raise UnknownSlide("this slide has no feature file (no patch grid)", entry.id)
        path = entry.features
        return self._get("grid", entry, path, lambda: read_patch_grid(path))

    def screening(self, entry: SlideEntry) -> List[FieldRow]:
        if entry.screening is None:
            raise UnknownSlide("this slide has no screening output", entry.id)
        path = entry.screening
        return self._get("screening", entry, path, lambda: read_field_table(path))


def _level0_size(info: Dict[str, Any]) -> Tuple[int, int]:
    if info.get("error") or not info.get("width"):
        raise SlideChatError(f"slide cannot be read: {info.get('error')}", info["id"])
    return int(info["width"]), int(info["height"])


def create_app(config: ServeConfig, engine: Optional[ChatEngine] = None) -> FastAPI:
    """The app for ``config``; ``engine`` (a loaded model) enables the chat routes' answers.

    A non-loopback host without a token is refused: the slides would be open to the network.
    """
    if not is_loopback(config.host) and not config.token:
        raise SlideChatError(f"host {config.host} is not loopback: a token is required")
    catalog = Catalog(config)
    tiles = TileServer(config.tile_cache_mb)
    layers = _Layers()
    osd_dir = find_openseadragon()

    app = FastAPI(title="slidechat serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.catalog = catalog
    app.state.tiles = tiles
    app.state.engine = engine

    # -- errors: JSON, one line ------------------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"not found: {request.url.path}"
        return _error(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if errs:
            e = errs[0]
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
            msg = f"{where}: {e.get('msg', 'invalid')}"
        else:
            msg = "invalid request"
        return _error(422, msg)

    @app.exception_handler(SlideChatError)
    async def _slidechat_error(request: Request, exc: SlideChatError) -> JSONResponse:
        if isinstance(exc, (UnknownSlide, TileNotFound)):
            status = 404
        else:
            status = int(getattr(exc, "status", 422))
        return _error(status if 400 <= status < 600 else 422, public_message(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # one line here; the server prints the traceback itself
        logger.error("%s %s failed: %s", request.method, request.url.path, exception_text(exc))
        return _error(500, f"internal error: {type(exc).__name__}")

    # -- page and static files -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> Response:
        index = safe_join(STATIC_DIR, "index.html")
        if index is None:
            return _error(404, "the page (static/index.html) is not installed")
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    @app.get("/static/{path:path}", include_in_schema=False)
    def static(path: str) -> Response:
        target = safe_join(STATIC_DIR, path)
        if target is None:
            return _error(404, f"no such static file: {path}")
        return FileResponse(target, headers={"Cache-Control": "no-cache"})

    @app.get("/vendor/osd/{path:path}", include_in_schema=False)
    def vendor_osd(path: str) -> Response:
        target = safe_join(osd_dir, path) if osd_dir is not None else None
        if target is None:
            why = "" if osd_dir is not None else f" (OpenSeadragon is not installed: {OSD_SETUP_HINT})"
            return _error(404, f"no such file: {path}{why}")
        return FileResponse(target, headers={"Cache-Control": "public, max-age=86400"})

    # -- slides ----------------------------------------------------------------------------------
    def layer_names(entry: SlideEntry) -> List[str]:
        names = ["tissue"]
        if entry.features is not None:
            names.append("grid")
        if entry.screening is not None:
            names.append("screening")
        return names

    @app.get("/api/slides")
    def list_slides() -> List[Dict[str, Any]]:
        out = []
        for entry in catalog.entries():
            info = catalog.info(entry.id)
            out.append({k: info[k] for k in ("id", "name", "width", "height", "mpp", "has_features",
                                              "has_screening", "error")}
                       | {"thumbnail": f"/api/slides/{entry.id}/thumbnail.jpg"})
        return out

    @app.get("/api/slides/{slide_id}.dzi")
    def dzi(slide_id: str) -> Response:
        entry = catalog.get(slide_id)
        return Response(tiles.dzi(entry), media_type="application/xml",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/api/slides/{slide_id}_files/{level:int}/{col:int}_{row:int}.jpeg")
    def tile(slide_id: str, level: int, col: int, row: int) -> Response:
        entry = catalog.get(slide_id)
        return Response(tiles.tile(entry, level, col, row), media_type="image/jpeg",
                        headers={"Cache-Control": TILE_CACHE_CONTROL})

    @app.get("/api/slides/{slide_id}")
    def slide_info(slide_id: str) -> Dict[str, Any]:
        entry = catalog.get(slide_id)
        info = catalog.info(slide_id)
        names = layer_names(entry) if not info.get("error") else []
        urls = {"tissue": f"/api/slides/{entry.id}/layers/tissue.svg",
                "grid": f"/api/slides/{entry.id}/layers/grid.svg",
                "screening": f"/api/slides/{entry.id}/layers/screening.png"}
        return info | {"layers": names, "layer_urls": {n: urls[n] for n in names},
                       "dzi": f"/api/slides/{entry.id}.dzi",
                       "thumbnail": f"/api/slides/{entry.id}/thumbnail.jpg"}

    @app.get("/api/slides/{slide_id}/thumbnail.jpg")
    def thumbnail(slide_id: str) -> Response:
        entry = catalog.get(slide_id)
        return Response(tiles.thumbnail(entry), media_type="image/jpeg",
                        headers={"Cache-Control": TILE_CACHE_CONTROL})

    @app.get("/api/slides/{slide_id}/layers/tissue.svg")
    def tissue_layer_svg(slide_id: str) -> Response:
        entry = catalog.get(slide_id)
        contours, size = layers.tissue(entry)
        return Response(tissue_svg(contours, size, f"tissue of {entry.name}"), media_type="image/svg+xml")

    @app.get("/api/slides/{slide_id}/layers/tissue.png")
    def tissue_layer_png(slide_id: str) -> Response:
        entry = catalog.get(slide_id)
        contours, size = layers.tissue(entry)
        return Response(tissue_png(contours, size), media_type="image/png")

    @app.get("/api/slides/{slide_id}/layers/grid.svg")
    def grid_layer(slide_id: str) -> Response:
        entry = catalog.get(slide_id)
        size = _level0_size(catalog.info(slide_id))
        return Response(grid_svg(layers.grid(entry), size), media_type="image/svg+xml")

    @app.get("/api/slides/{slide_id}/layers/screening.png")
    def screening_layer(slide_id: str) -> Response:
        entry = catalog.get(slide_id)
        size = _level0_size(catalog.info(slide_id))
        return Response(screening_png(layers.screening(entry), size), media_type="image/png")

    @app.get("/api/slides/{slide_id}/screening.json")
    def screening_rows(slide_id: str) -> List[Dict[str, Any]]:
        entry = catalog.get(slide_id)
        return [{"x": r.x, "y": r.y, "size": r.size_level0, "score": r.score} for r in layers.screening(entry)]

    app.include_router(chat_router(engine, catalog))
    app.add_middleware(GuardMiddleware, token=config.token, max_body_bytes=config.max_body_bytes,
                       loopback_only=is_loopback(config.host))
    logger.debug("serve app: %d slides under %s", len(catalog.entries()), config.slides)
    return app
