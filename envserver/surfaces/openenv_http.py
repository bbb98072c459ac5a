"""OpenEnv's HTTP routes: health, metadata, schema, reset/step/state, MCP.

``/reset``, ``/step`` and ``/state`` are stateless as in OpenEnv (a fresh environment
per request) unless the request names a session in the ``X-Session-Id`` header; then
``/reset`` opens that session if needed and the others use it. ``?env=NAME`` picks one of
the environments the server serves for a new session (default: the first).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__, envs
from ..errors import ServerError
from ..protocol import (
    ErrorCode,
    HealthStatus,
    HttpResetRequest,
    HttpStepRequest,
    Metadata,
    json_encoder,
    json_schema,
)
from ..server import EnvServer, coded
from ..sessions import Session
from .mcp import handle_jsonrpc
from .openenv_ws import openenv_result

SESSION_HEADER = "x-session-id"


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_encoder.encode(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(error: ServerError) -> Response:
    body = {"detail": error.message, "code": error.code.value}
    return json_response(body, status=error.code.http_status)


async def read_json(request: Request, type_: Any) -> Any:
    """The request body decoded into ``type_``; an empty body decodes as ``{}``."""
    limit = request.app.state.server.config.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServerError(ErrorCode.FRAME_TOO_LARGE, f"body of {declared} bytes exceeds {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServerError(ErrorCode.FRAME_TOO_LARGE, f"body exceeds {limit} bytes")
    try:
        return msgspec.json.decode(bytes(body) or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad request body: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ServerError(ErrorCode.INVALID_JSON, f"invalid JSON: {exc}") from None


def _server(request: Request) -> EnvServer:
    server: EnvServer = request.app.state.server
    return server


async def health(request: Request) -> Response:
    return json_response(HealthStatus())


def _env_class(request: Request) -> Any:
    """The default environment's class, or that of the registered one named by ``?env=``."""
    server = _server(request)
    name = request.query_params.get("env")
    if name is None or name == server.config.env:
        return server.env_class
    return envs.load(name, allow_paths=False)


Handler = Callable[[Request], Awaitable[Response]]


def _coded_errors(handler: Handler) -> Handler:
    """Answer any exception of ``handler`` (an environment's included) as a coded JSON error."""

    @functools.wraps(handler)
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            return error_response(coded(exc))

    return answer


@_coded_errors
async def metadata(request: Request) -> Response:
    env_class = _env_class(request)
    return json_response(
        Metadata(
            name=env_class.name,
            description=env_class.description,
            version=__version__,
            env=env_class.name,
            surfaces=["openenv-http", "openenv-ws:/ws", "mux:/v1/mux"],
            env_class=envs.class_path(env_class),
            observation_type=envs.class_path(env_class.Observation),
            state_type=envs.class_path(env_class.State),
        )
    )


@_coded_errors
async def schema(request: Request) -> Response:
    env_class = _env_class(request)
    return json_response(
        {
            "action": json_schema(env_class.Action),
            "observation": json_schema(env_class.Observation),
            "state": json_schema(env_class.State),
        }
    )


@_coded_errors
async def reset(request: Request) -> Response:
    server = _server(request)
    body: HttpResetRequest = await read_json(request, HttpResetRequest)
    key = request.headers.get(SESSION_HEADER)
    if key is None:
        return await _stateless(request, lambda s: _reset(server, s, body))
    try:
        session = server.sessions.get(_http_key(key))
    except ServerError:
        session = server.open_session(_http_key(key), _env_of(request))
    return json_response(await _reset(server, session, body), headers={SESSION_HEADER: key})


@_coded_errors
async def step(request: Request) -> Response:
    server = _server(request)
    body: HttpStepRequest = await read_json(request, HttpStepRequest)
    key = request.headers.get(SESSION_HEADER)
    if key is None:
        # OpenEnv's stateless step: a fresh environment; ours resets it first so the step is a real one.
        async def fresh_step(session: Session) -> Any:
            await server.reset(session, None, None)
            return await _step(server, session, body)

        return await _stateless(request, fresh_step)
    session = server.sessions.get(_http_key(key))
    return json_response(await _step(server, session, body), headers={SESSION_HEADER: key})


@_coded_errors
async def state(request: Request) -> Response:
    server = _server(request)
    key = request.headers.get(SESSION_HEADER)
    if key is None:
        return await _stateless(request, server.state)
    return json_response(await server.state(server.sessions.get(_http_key(key))))


@_coded_errors
async def close(request: Request) -> Response:
    """End the session named in the header (HTTP sessions otherwise expire by the idle TTL)."""
    server = _server(request)
    key = request.headers.get(SESSION_HEADER)
    if key is None:
        raise ServerError(ErrorCode.VALIDATION_ERROR, f"missing {SESSION_HEADER} header")
    server.sessions.close(server.sessions.get(_http_key(key)))
    return json_response({"closed": key})


async def mcp(request: Request) -> Response:
    server = _server(request)
    try:
        payload = await read_json(request, Any)
    except ServerError as exc:
        return json_response({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": exc.message}})
    return json_response(await handle_jsonrpc(server, None, payload))


def _http_key(key: str) -> str:
    if not 0 < len(key) <= 128:
        raise ServerError(ErrorCode.VALIDATION_ERROR, "session ids are 1 to 128 characters")
    return f"h:{key}"


async def _reset(server: EnvServer, session: Session, body: HttpResetRequest) -> Any:
    result = await server.reset(session, body.seed, body.options)
    return openenv_result(session, result, after_reset=True)


async def _step(server: EnvServer, session: Session, body: HttpStepRequest) -> Any:
    result = await server.step(session, body.action)
    return openenv_result(session, result, after_reset=False)


def _env_of(request: Request) -> str | None:
    """The environment a new session of ``request`` is for (``?env=``; None: the default)."""
    return request.query_params.get("env")


async def _stateless(request: Request, call: Any) -> Response:
    server = _server(request)
    session = server.open_session(None, _env_of(request))
    try:
        return json_response(await call(session))
    finally:
        server.sessions.close(session)
