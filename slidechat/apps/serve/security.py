"""The server's guards: files only from inside their folder, a token off loopback, a body-size limit.

They sit in front of every route (:class:`GuardMiddleware`), so a route cannot forget them.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "slidechat_token"
#: The one inline ``<style>`` OpenSeadragon 6.1.1 injects (its mobile focus-outline rule,
#: ``openseadragon.js``: "Injecting mobile-only CSS"), allowed by its hash and nothing else inline.
OSD_STYLE_HASH = "'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='"
#: Scripts and styles from this server only; pictures may also be data: URLs (reports, overlays).
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; "
                           f"style-src 'self' {OSD_STYLE_HASH}; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                           "form-action 'self'")
SECURITY_HEADERS: List[Tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]

Scope = Dict[str, Any]
Message = Dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def safe_join(folder: Path, relative: str) -> Optional[Path]:
    """``folder/relative`` when it is an existing file inside ``folder``; ``None`` for anything else.

    Refuses ``..`` parts, absolute paths, backslashes and NUL before touching the file system, then
    resolves symlinks and checks the result is still inside ``folder`` (a link may point anywhere).
    """
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        return None
    parts = relative.split("/")
    if any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        return None
    base = Path(folder).resolve()
    try:
        target = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _names_loopback(host_header: Optional[str]) -> bool:
    """Whether a Host header (``name[:port]``, ``[v6]:port``) names this machine's loopback."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.lower() == "localhost" or is_loopback(host)


def new_token() -> str:
    """A random access token for a server bound to a non-loopback address."""
    return secrets.token_urlsafe(24)


def _json_response(status: int, error: str, extra: Optional[List[Tuple[bytes, bytes]]] = None
                   ) -> Tuple[Message, Message]:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += SECURITY_HEADERS + [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())]
    return ({"type": "http.response.start", "status": status, "headers": headers + (extra or [])},
            {"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> Optional[str]:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class GuardMiddleware:
    """ASGI middleware: token check (when a token is set), body-size limit, security headers.

    The token may come as ``Authorization: Bearer T``, the ``slidechat_token`` cookie, or ``?token=T``;
    the query form sets the cookie (HttpOnly) so the page's own requests carry it.
    """

    def __init__(self, app: Any, token: Optional[str], max_body_bytes: int, loopback_only: bool = False) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = int(max_body_bytes)
        # bound to loopback: a request must also name a loopback host, or a web page the user visits could
        # point a DNS name of its own at 127.0.0.1 and read the slides through the browser (DNS rebinding)
        self.loopback_only = bool(loopback_only)

    def _token_ok(self, scope: Scope) -> Tuple[bool, bool]:
        """(accepted, came from the query string)."""
        assert self.token is not None
        want = self.token.encode()
        auth = _header(scope, b"authorization") or ""
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), want):
            return True, False
        cookie = _cookie(scope, TOKEN_COOKIE)
        if cookie and hmac.compare_digest(cookie.encode(), want):
            return True, False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        for t in query.get("token", []):
            if hmac.compare_digest(t.encode(), want):
                return True, True
        return False, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        set_cookie = False
        if self.loopback_only and not _names_loopback(_header(scope, b"host")):
            for m in _json_response(403, "this server answers requests for 127.0.0.1 / localhost only "
                                         "(the Host header names another host)"):
                await send(m)
            return
        if self.token is not None:
            ok, set_cookie = self._token_ok(scope)
            if not ok:
                for m in _json_response(401, "a valid access token is required (Authorization: Bearer <token> "
                                             "or ?token=<token>)", [(b"www-authenticate", b"Bearer")]):
                    await send(m)
                return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                for m in _json_response(400, "bad Content-Length header"):
                    await send(m)
                return
            if too_big:
                await self._refuse_size(send)
                return
        if scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS"):
            # read the whole (small) body first: a chunked body over the limit is refused before any route runs
            chunks: List[bytes] = []
            size = 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._refuse_size(send)
                    return
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False
            upstream = receive  # the server's; `receive` is rebound to the replay below

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await upstream()  # later messages: the client's disconnect

            receive = replay

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                if b"content-security-policy" not in present:  # a route may set a stricter/other one
                    headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
                if set_cookie:
                    headers.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                                                   "Path=/".encode()))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, guarded_send)

    async def _refuse_size(self, send: Send) -> None:
        for m in _json_response(413, f"request body larger than {self.max_body_bytes} bytes"):
            await send(m)
