"""The chat routes of ``slidechat serve``: questions, streamed answers, evidence maps, reports.

Model work runs on the engine's one worker thread (``ChatEngine.executor``), never on the event loop or
the tile thread pool: a slow answer does not hold up the viewer. A streamed answer is handed over through a
thread-safe queue; when the reader goes away the next token raises
:class:`~slidechat.apps.serve.sessions.GenerationCancelled` in the worker, so the model is freed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from slidechat.apps.serve.catalog import Catalog, SlideEntry, UnknownSlide
from slidechat.apps.serve.report import session_report
from slidechat.apps.serve.sessions import (ChatEngine, ChatRequestError, ChatResult, GenerationCancelled,
                                          UnknownSession)
from slidechat.utils.errors import SlideChatError, exception_text, one_line

logger = logging.getLogger(__name__)

NO_MODEL = "no model loaded: start slidechat serve with --checkpoint (slide) or --model_name_or_path"
#: how often a streaming response looks for new tokens (seconds)
_POLL_S = 0.02
#: The report is one self-contained file: its own inline styles and data: pictures, nothing else (no
#: script, no request anywhere); the app's policy, which allows styles from the server only, would
#: strip its look.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message, 500)}, status_code=status)


class _Refused(Exception):
    """A request refused before the model is asked: HTTP ``status`` and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Question:
    entry: SlideEntry
    question: str
    session: Optional[str]
    field: Optional[Dict[str, float]]


async def _parse(request: Request, catalog: Catalog, max_chars: int) -> _Question:
    """The checked body of a chat request (any problem -> :class:`_Refused` with its status)."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise _Refused(400, "request body is not JSON") from None
    if not isinstance(body, dict):
        raise _Refused(422, 'request body must be a JSON object {"slide", "question", "session", "field"}')
    slide, question, session, field = (body.get(k) for k in ("slide", "question", "session", "field"))
    if not isinstance(slide, str) or not slide:
        raise _Refused(422, "slide: a slide id from /api/slides is required")
    if not isinstance(question, str):
        raise _Refused(422, "question: text is required")
    question = question.strip()
    if not question:
        raise _Refused(422, "question is empty")
    if len(question) > max_chars:
        raise _Refused(422, f"question has {len(question)} characters; at most {max_chars}")
    if session is not None and not isinstance(session, str):
        raise _Refused(422, "session: a session id string or null")
    if field is not None:
        ok = isinstance(field, dict) and all(
            isinstance(field.get(k), (int, float)) and not isinstance(field.get(k), bool)
            and math.isfinite(field[k]) for k in ("x", "y", "w", "h"))
        if not ok:
            raise _Refused(422, 'field: {"x", "y", "w", "h"} numbers in level-0 px, or null')
        field = {k: float(field[k]) for k in ("x", "y", "w", "h")}
    try:
        entry = catalog.get(slide)
    except UnknownSlide as e:
        raise _Refused(404, str(e)) from None
    return _Question(entry, question, session or None, field)


def _result_json(result: ChatResult, engine: ChatEngine) -> Dict[str, Any]:
    out = result.to_json()
    out["model_line"] = engine.model_line
    return out


def _failure(exc: BaseException) -> _Refused:
    """The HTTP status and line of an engine failure (a bug is logged with its traceback)."""
    if isinstance(exc, ChatRequestError):
        return _Refused(exc.status, str(exc))
    if isinstance(exc, UnknownSession):
        return _Refused(404, str(exc))
    if isinstance(exc, SlideChatError):
        return _Refused(422, str(exc))
    logger.error("chat failed: %s", exception_text(exc), exc_info=exc)
    return _Refused(500, f"the model failed: {exception_text(exc)}")


def chat_router(engine: Optional[ChatEngine], catalog: Catalog) -> APIRouter:
    """The chat routes over ``catalog``'s slides; ``engine`` None -> the viewer works, chat says no model."""
    router = APIRouter()
    max_chars = int(catalog.config.max_question_chars)
    if engine is not None:
        engine.attach_catalog(catalog)

    @router.get("/api/model")
    def model_info() -> Dict[str, Any]:
        if engine is None:
            return {"family": None, "model_line": NO_MODEL}
        return {"family": engine.family, "model_line": engine.model_line}

    async def question_of(request: Request) -> "_Question | Response":
        """The request's checked question, or the JSON error to answer with (no model: 503)."""
        if engine is None:
            return _error(503, NO_MODEL)
        try:
            return await _parse(request, catalog, max_chars)
        except _Refused as r:
            return _error(r.status, str(r))

    @router.post("/api/chat")
    async def chat(request: Request) -> Response:
        q = await question_of(request)
        if isinstance(q, Response):
            return q
        assert engine is not None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(engine.executor, lambda: engine.ask(
                q.entry, q.question, q.session, q.field))
        except Exception as e:  # every failure is one JSON line
            r = _failure(e)
            return _error(r.status, str(r))
        return JSONResponse(_result_json(result, engine))

    @router.post("/api/chat/stream")
    async def chat_stream(request: Request) -> Response:
        q = await question_of(request)
        if isinstance(q, Response):
            return q
        assert engine is not None
        lines: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        gone = threading.Event()

        def on_token(piece: str) -> None:
            if gone.is_set():
                raise GenerationCancelled()
            lines.put({"token": piece})

        def on_progress(text: str) -> None:
            lines.put({"progress": text})

        def work() -> None:
            try:
                result = engine.ask(q.entry, q.question, q.session, q.field, on_token=on_token,
                                    on_progress=on_progress)
                lines.put({"done": True, **_result_json(result, engine)})
            except GenerationCancelled:
                logger.info("answer stopped: the reader went away")
            except Exception as e:  # the last line says what went wrong
                lines.put({"error": one_line(str(_failure(e)), 500)})
            finally:
                lines.put(None)

        engine.executor.submit(work)

        async def ndjson() -> AsyncIterator[bytes]:
            try:
                while True:
                    # every line queued since the last poll goes out in one write (one per token cost
                    # the stream ~10 % of its tokens/s on CPU)
                    chunk, finished = [], False
                    while True:
                        try:
                            item = lines.get_nowait()
                        except queue.Empty:
                            break
                        if item is None:
                            finished = True
                            break
                        chunk.append(json.dumps(item) + "\n")
                    if chunk:
                        yield "".join(chunk).encode("utf-8")
                    if finished:
                        return
                    if not chunk:
                        await asyncio.sleep(_POLL_S)
            finally:
                gone.set()  # a reader that left stops the model at its next token

        return StreamingResponse(ndjson(), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store"})

    @router.get("/api/sessions/{session_id}/turns/{turn}/evidence.png")
    def evidence_png(session_id: str, turn: int) -> Response:
        if engine is None:
            return _error(404, NO_MODEL)
        try:
            t = engine.turn(session_id, turn)
        except UnknownSession as e:
            return _error(404, str(e))
        if t.heatmap_png is None:
            return _error(404, f"turn {turn} of session {session_id} has no evidence map")
        return Response(t.heatmap_png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/api/sessions/{session_id}/report.html")
    def report(session_id: str) -> Response:
        if engine is None:
            return _error(404, NO_MODEL)
        try:
            s = engine.session(session_id)
        except UnknownSession as e:
            return _error(404, str(e))
        try:
            html_text = session_report(s, engine.model_line)
        except SlideChatError as e:
            return _error(422, f"report not written: {e}")
        return HTMLResponse(html_text, headers={
            "Content-Disposition": f'inline; filename="slidechat-{s.entry.id}-{session_id[:8]}.html"',
            "Content-Security-Policy": REPORT_CSP})

    return router
