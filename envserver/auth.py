"""Who may talk to the server: a bearer token on every route, and no browser from a foreign Origin.

A server on loopback without a token also takes only requests addressed to a loopback
name, so a page whose own name resolves to 127.0.0.1 (DNS rebinding) cannot pass for it.

Both checks are ASGI middleware that answer before any route (so before any session opens):
over HTTP with a coded JSON error, on a WebSocket with the same error as the handshake's
HTTP response (403 where the ASGI server cannot send a body).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qs, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import ErrorCode, json_encoder

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


async def refuse(scope: Scope, send: Send, status: int, code: ErrorCode, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer an HTTP request or a WebSocket handshake with a coded JSON error, without running the app."""
    body = json_encoder.encode({"detail": detail, "code": code.value})
    head = [(b"content-type", b"application/json"), *(headers or [])]
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        await send({"type": "websocket.http.response.start", "status": status, "headers": head})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value)
    return None


def is_page_route(path: str) -> bool:
    """Whether ``path`` belongs to the browser play page (the only routes that take ``?token=``)."""
    return path == "/web" or path.startswith("/web/")


class TokenAuth:
    """Require ``Authorization: Bearer <token>``; the play page's routes also take ``?token=``.

    Browsers can set no header on a page load or a WebSocket, hence the query string there;
    everywhere else a token in a URL (which ends up in logs and histories) is not accepted.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await refuse(scope, send, 401, ErrorCode.UNAUTHORIZED, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])

    def _allowed(self, scope: Scope) -> bool:
        given = b""
        authorization = _header(scope, b"authorization")
        if authorization is not None and authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        elif is_page_route(scope.get("path", "")):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [""])[0].encode()
        return hmac.compare_digest(given, self._token)


def _origin_key(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    return scheme, host.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def _parse_origin(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin)
        if not parts.scheme or not parts.hostname:
            return None
        return _origin_key(parts.scheme.lower(), parts.hostname, parts.port)
    except ValueError:  # a bad port
        return None


class OriginCheck:
    """Refuse any request whose ``Origin`` is neither the server's own nor one the operator allowed.

    Browsers send ``Origin`` on WebSockets and on cross-site POSTs; a page on another site must
    not drive this server (cross-site WebSocket hijacking, CSRF). Programs send no ``Origin``
    and pass unchecked. The server's own origin is the request's scheme and ``Host`` header.
    """

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] = ()) -> None:
        self.app = app
        self._allowed = {key for key in map(_parse_origin, allowed) if key is not None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            origin = _header(scope, b"origin")
            if origin is not None and not self._trusted(scope, origin.decode("latin-1")):
                detail = f"requests from Origin {origin.decode('latin-1')[:200]!r} are refused; the server allows its own origin"
                await refuse(scope, send, 403, ErrorCode.FORBIDDEN, detail + (" and those given by --allow-origin" if self._allowed else ""))
                return
        await self.app(scope, receive, send)

    def _trusted(self, scope: Scope, origin: str) -> bool:
        key = _parse_origin(origin)
        if key is None:  # "null" (sandboxed frames, file://) or garbage
            return False
        if key in self._allowed:
            return True
        host = _header(scope, b"host")
        scheme = _HTTP_SCHEME.get(scope.get("scheme", "http"), "http")
        own = _parse_origin(f"{scheme}://{host.decode('latin-1')}") if host else None
        return own is not None and key == own


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, without port) names this machine's loopback."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LoopbackHostCheck:
    """Refuse requests whose ``Host`` is not a loopback name: for a tokenless server bound to loopback.

    A hostile page can make its own name resolve to 127.0.0.1 (DNS rebinding); the browser
    then sends that name as ``Host`` and as ``Origin``, which the Origin check takes for the
    server's own. Programs on this machine address it as 127.0.0.1, ::1 or localhost.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = (_header(scope, b"host") or b"").decode("latin-1")
            name = urlsplit(f"//{host}").hostname if host else None
            if name is not None and not is_loopback(name):
                detail = f"requests for host {host[:200]!r} are refused: this server answers to loopback names only"
                await refuse(scope, send, 403, ErrorCode.FORBIDDEN, detail)
                return
        await self.app(scope, receive, send)
