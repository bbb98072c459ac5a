"""The Starlette application: routes of both surfaces wired to one ``EnvServer``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from .auth import LoopbackHostCheck, OriginCheck, TokenAuth, is_loopback
from .config import ServerConfig
from .executor import finish_background
from .protocol import ErrorCode
from .server import EnvServer
from .surfaces import openenv_http as http
from .surfaces.metrics import metrics_endpoint
from .surfaces.mux import mux_endpoint
from .surfaces.openapi import openapi_document
from .surfaces.openenv_ws import ws_endpoint
from .surfaces.web.routes import web_routes


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method) as coded JSON like every other error."""
    assert isinstance(exc, HTTPException)
    code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.VALIDATION_ERROR
    return http.json_response({"detail": exc.detail, "code": code.value}, status=exc.status_code, headers=dict(exc.headers) if exc.headers else None)


def create_app(config: ServerConfig | None = None) -> Starlette:
    """Build the ASGI app for ``config`` (loads the environment classes now, so errors show at start)."""
    config = config or ServerConfig()
    server = EnvServer(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(server.sessions.reap_forever(min(30.0, config.idle_ttl / 4)))
        try:
            yield
        finally:
            reaper.cancel()
            server.sessions.close_all()
            await finish_background(10.0)  # environments' cleanups (reaping sandboxes) end before the loop does

    async def openapi(request: Request) -> Response:
        return http.json_response(openapi_document(server.env_class))

    routes = [
        Route("/health", http.health),
        Route("/metadata", http.metadata),
        Route("/schema", http.schema),
        Route("/openapi.json", openapi),
        Route("/reset", http.reset, methods=["POST"]),
        Route("/step", http.step, methods=["POST"]),
        Route("/state", http.state),
        Route("/close", http.close, methods=["POST"]),
        Route("/mcp", http.mcp, methods=["POST"]),
        Route("/metrics", metrics_endpoint),
        WebSocketRoute("/ws", ws_endpoint),
        WebSocketRoute("/v1/mux", mux_endpoint),
    ]
    if config.web:
        routes += web_routes()
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    if config.token:
        app.add_middleware(TokenAuth, token=config.token)
    elif is_loopback(config.host):
        app.add_middleware(LoopbackHostCheck)  # no token to stop DNS rebinding
    app.add_middleware(OriginCheck, allowed=config.allow_origins)  # added last: runs first
    return app
