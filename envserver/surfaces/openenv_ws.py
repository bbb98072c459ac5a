"""``WS /ws``: OpenEnv's JSON protocol, one session per connection, one reply per request.

``/ws?env=NAME`` opens the session of one of the served environments (default: the first).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..errors import ServerError
from ..protocol import ErrorCode, HttpResetRequest, OpenEnvResult, json_encoder, ws_message_decoder
from ..server import EnvServer, coded
from ..sessions import Session
from .mcp import handle_jsonrpc

log = logging.getLogger("envserver.ws")

def openenv_result(session: Session, result: Any, *, after_reset: bool) -> OpenEnvResult:
    """OpenEnv's shape of a step result: reward and done next to the observation."""
    observation = session.env.openenv_observation(result.observation)
    return OpenEnvResult(observation, None if after_reset else result.reward, result.terminated or result.truncated)


async def ws_endpoint(websocket: WebSocket) -> None:
    server: EnvServer = websocket.app.state.server
    await websocket.accept()
    try:
        session = server.open_session(None, websocket.query_params.get("env"))
    except ServerError as exc:  # capacity or factory failure: tell, then close (as OpenEnv does)
        await _send_error(websocket, exc)
        await websocket.close(1000)
        return
    try:
        await _serve(server, session, websocket)
    except WebSocketDisconnect:
        pass
    finally:
        server.sessions.close(session)


async def _serve(server: EnvServer, session: Session, websocket: WebSocket) -> None:
    limit = server.config.max_frame_bytes
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text") or message.get("bytes") or b""
        if len(raw) > limit:
            await _send_error(websocket, ServerError(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(raw)} bytes exceeds {limit}"))
            continue
        try:
            request = ws_message_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            await _send_error(websocket, ServerError(ErrorCode.VALIDATION_ERROR, f"bad message: {exc}"))
            continue
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            await _send_error(websocket, ServerError(ErrorCode.INVALID_JSON, f"invalid JSON: {exc}"))
            continue
        if request.type == "close":
            await websocket.close(1000)
            return
        try:
            reply = await _answer(server, session, request.type, request.data)
        except Exception as exc:
            error = coded(exc)
            if error is not exc:
                log.exception("environment failed on %s", request.type)
            server.stats.errors += 1
            await _send_error(websocket, error)
            if error.code.ends_session:
                await websocket.close(1000)
                return
            continue
        await websocket.send_text(json_encoder.encode(reply).decode())


async def _answer(server: EnvServer, session: Session, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    match kind:
        case "reset":
            try:
                args = msgspec.convert(data, HttpResetRequest)  # the HTTP body's fields; others are dropped, as OpenEnv does
            except msgspec.ValidationError as exc:
                raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad reset data: {exc}") from None
            result = await server.reset(session, args.seed, args.options)
            return {"type": "observation", "data": openenv_result(session, result, after_reset=True)}
        case "step":
            result = await server.step(session, data)
            return {"type": "observation", "data": openenv_result(session, result, after_reset=False)}
        case "state":
            return {"type": "state", "data": await server.state(session)}
        case "mcp":
            return {"type": "mcp", "data": await handle_jsonrpc(server, session, data)}
    raise ServerError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}; expected reset, step, state, close or mcp")


async def _send_error(websocket: WebSocket, error: ServerError) -> None:
    frame = {"type": "error", "data": {"message": error.message, "code": error.code.value}}
    await websocket.send_text(json_encoder.encode(frame).decode())
