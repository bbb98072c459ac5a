"""``WS /v1/mux``: many sessions per connection, binary msgpack batch frames.

A frame is a list of requests; requests for cheap environments are answered inline in
one pass and their replies leave as one frame (a many-request's reply leaves as soon as
it is ready). Requests for blocking environments run in worker threads (in order per
session) and their replies follow as they finish; at most ``max_blocking_per_connection``
of them are in flight per connection, and past that a request is answered
``CAPACITY_REACHED``. A frame over the size limit is answered ``FRAME_TOO_LARGE`` for each
request it holds. The connection's sessions count as used whenever it sends a frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..errors import ServerError
from ..protocol import (
    OPS,
    Batch,
    Close,
    ErrorCode,
    ErrorInfo,
    GetState,
    MuxRequest,
    Open,
    OpenResult,
    Ping,
    Reply,
    Reset,
    ResetMany,
    Step,
    StepMany,
    VecReset,
    VecStep,
    msgpack_encoder,
    mux_request_decoder,
)
from ..server import EnvServer, coded
from ..sessions import Session
from .columns import VectorSessions
from .metrics import mux_latency

log = logging.getLogger("envserver.surfaces.mux")

_MANY = (StepMany, ResetMany, VecStep, VecReset)


class _Head(msgspec.Struct, array_like=True):
    """The op and id of a request, read without the rest (to name the requests of a refused frame)."""

    op: str
    id: int


_heads_decoder = msgspec.msgpack.Decoder(list[_Head])


class MuxConnection:
    """One client connection and the sessions it opened (closed when it goes away)."""

    def __init__(self, server: EnvServer, websocket: WebSocket) -> None:
        self.server = server
        self.ws = websocket
        self.sessions: dict[int, Session] = {}
        self._outbox: list[Reply] = []
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefix = f"m{id(self):x}:"
        self._now = time.monotonic()  # one clock read per frame marks its sessions used
        self.last_seen = self._now  # the client's last sign of life (a frame): keeps its sessions alive
        self._blocking = 0  # calls of blocking envs in flight
        self._latency = mux_latency(server)
        self._vector = VectorSessions(self._live)  # vstep / vreset

    async def serve(self) -> None:
        writer = asyncio.create_task(self._write_forever())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    self._error(0, ErrorCode.INVALID_JSON, "mux frames are binary msgpack, not text")
                elif not await self._handle_frame(data):
                    return
                if self._outbox and not await self._flush():
                    return
        except WebSocketDisconnect:
            return
        finally:
            for task in self._tasks:
                task.cancel()
            writer.cancel()
            for session in self.sessions.values():
                self.server.sessions.close(session)
            self.sessions.clear()

    # -- frames

    async def _handle_frame(self, data: bytes) -> bool:
        """Answer one frame's requests; False if the peer went away meanwhile.

        The answer to each many-request leaves as soon as it is ready, before the frame's
        next request runs: the client can work on it while the server computes the rest
        (otherwise client and server take turns idling).
        """
        requests = self._decode_frame(data)
        last = len(requests) - 1
        start, count = time.perf_counter(), 0
        for index, request in enumerate(requests):
            count += self._handle(request)  # blocking envs' requests are timed when they finish
            if index < last and type(request) in _MANY:
                self._latency.observe_frame(time.perf_counter() - start, count)
                if not await self._flush():
                    return False
                start, count = time.perf_counter(), 0
        self._latency.observe_frame(time.perf_counter() - start, count)
        return True

    def _decode_frame(self, data: bytes) -> list[MuxRequest]:
        """The frame's requests; what cannot be read is answered with errors."""
        stats = self.server.stats
        stats.frames_in += 1
        stats.bytes_in += len(data)
        self._now = self.last_seen = time.monotonic()
        if len(data) > self.server.config.max_frame_bytes:
            self._refuse_frame(data)
            return []
        try:
            return mux_request_decoder.decode(data)
        except msgspec.ValidationError:  # a subclass of DecodeError: catch it first
            return self._salvage(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # the last two: bad utf-8, deep nesting
            self._error(0, ErrorCode.INVALID_JSON, f"frame is not valid msgpack: {exc}")
            return []

    def _refuse_frame(self, data: bytes) -> None:
        """Answer every request of an oversized frame with FRAME_TOO_LARGE (id 0 if they cannot be read)."""
        message = f"frame of {len(data)} bytes exceeds the limit of {self.server.config.max_frame_bytes} bytes"
        try:
            heads = _heads_decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            heads = []
        for head in heads or [_Head("", 0)]:
            self._error(head.id, ErrorCode.FRAME_TOO_LARGE, f"request {head.id} ({head.op}): {message}" if head.id else message)

    def _salvage(self, data: bytes) -> list[MuxRequest]:
        """Decode a frame with bad requests one by one: answer each bad one, keep the good ones."""
        try:
            items = msgspec.msgpack.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            self._error(0, ErrorCode.INVALID_JSON, f"frame is not valid msgpack: {exc}")
            return []
        if not isinstance(items, list):
            self._error(0, ErrorCode.VALIDATION_ERROR, "a frame must be a list of requests")
            return []
        good: list[MuxRequest] = []
        for item in items:
            try:
                good.append(msgspec.convert(item, MuxRequest))  # type: ignore[arg-type]
            except msgspec.ValidationError as exc:
                rid = item[1] if isinstance(item, list) and len(item) > 1 and type(item[1]) is int else 0
                if isinstance(item, list) and item and item[0] not in OPS:
                    self._error(rid, ErrorCode.UNKNOWN_TYPE, f"unknown op {item[0]!r}; ops: {', '.join(OPS)}")
                else:
                    self._error(rid, ErrorCode.VALIDATION_ERROR, f"bad request: {exc}")
        return good

    def _handle(self, request: MuxRequest) -> bool:
        """Answer ``request`` now, or start it in a worker thread (blocking envs; then False)."""
        rid = request.id
        kind = type(request)
        try:
            if kind is Open:
                self._open(request)  # type: ignore[arg-type]
                return True
            if kind is StepMany or kind is ResetMany:
                return self._many(request)  # type: ignore[arg-type]
            if kind is Ping:
                self._outbox.append(Reply(rid, True, None))
                return True
            if kind is VecStep or kind is VecReset:
                self._columns(request)  # type: ignore[arg-type]
                return True
            session = self._live(request.sid)  # type: ignore[union-attr]
            env = session.env
            if env.blocking:
                self._reserve(1)
                self._spawn(request, session)
                return False
            if kind is Step:  # the hot path
                self.server.stats.steps += 1
                result = env.step(env.parse_action(request.action))  # type: ignore[union-attr]
            else:
                result = self._run_inline(request, session)
            self._outbox.append(Reply(rid, True, result))
        except Exception as exc:
            self._outbox.append(Reply(rid, False, self._failure(exc)))
        return True

    def _reserve(self, calls: int) -> None:
        """Count ``calls`` more blocking calls in flight, or refuse them past the connection's bound."""
        limit = self.server.config.max_blocking_per_connection
        if self._blocking + calls > limit:
            raise ServerError(
                ErrorCode.CAPACITY_REACHED,
                f"connection has {self._blocking} calls of blocking environments in flight, the limit is {limit}; retry after some finish",
            )
        self._blocking += calls

    def _live(self, sid: int) -> Session:
        """The open session ``sid``, marked used by this frame."""
        session = self.sessions.get(sid)
        if session is None:
            raise ServerError(ErrorCode.UNKNOWN_SESSION, f"no session {sid} on this connection")
        if session.closed:  # expired by the idle TTL
            del self.sessions[sid]
            raise ServerError(ErrorCode.UNKNOWN_SESSION, f"session {sid} expired after {self.server.config.idle_ttl:g} s idle")
        session.last_used = self._now
        return session

    def _many(self, request: StepMany | ResetMany) -> bool:
        """Answer a many-request with one ``Batch``: cheap envs inline (True), blocking ones in one task (False)."""
        stepping = type(request) is StepMany
        args = request.actions if stepping else request.seeds  # type: ignore[union-attr]
        sids = request.sids
        if len(args) != len(sids):
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"{len(sids)} sids but {len(args)} {'actions' if stepping else 'seeds'}")
        options = None if stepping else request.options  # type: ignore[union-attr]
        results: list[Any] = []
        failures: dict[int, ErrorInfo] = {}
        deferred: list[tuple[int, Session]] = []
        for index, sid in enumerate(sids):
            try:
                session = self._live(sid)
                env = session.env
                if env.blocking:
                    self._reserve(1)
                    deferred.append((index, session))
                    results.append(None)
                elif stepping:
                    results.append(env.step(env.parse_action(args[index])))
                else:
                    results.append(self.server.reset_now(env, args[index], options))
            except Exception as exc:
                results.append(None)
                failures[index] = self._failure(exc)
        stats = self.server.stats  # EnvServer.step and .reset count the deferred ones
        if stepping:
            stats.steps += len(sids) - len(deferred)
        else:
            stats.resets += len(sids) - len(deferred)
        if not deferred:
            self._outbox.append(Reply(request.id, True, Batch(results, failures)))
            return True
        started = time.perf_counter()

        # Start the calls now, not inside ``finish``: each queues on its session before any later request does.
        calls = [
            asyncio.ensure_future(self.server.step(session, args[index]) if stepping else self.server.reset(session, args[index], options))
            for index, session in deferred
        ]

        async def finish() -> None:
            try:
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                self._blocking -= len(calls)
            for (index, _), outcome in zip(deferred, outcomes):
                if isinstance(outcome, Exception):
                    failures[index] = self._failure(outcome)
                else:
                    results[index] = outcome
            self._latency.observe(time.perf_counter() - started)
            self._outbox.append(Reply(request.id, True, Batch(results, failures)))
            self._wakeup.set()

        self._track(asyncio.create_task(finish()))
        return False

    def _columns(self, request: VecStep | VecReset) -> None:
        """Answer a columnar batch with one reply of packed arrays (envserver/surfaces/columns.py)."""
        columns = self._vector.handle(request)
        stats = self.server.stats
        if type(request) is VecStep:
            stats.steps += len(request.sids)
        else:
            stats.resets += len(request.sids)
        stats.errors += len(columns.failures)
        self._outbox.append(Reply(request.id, True, columns))

    def _failure(self, exc: Exception) -> ErrorInfo:
        error = coded(exc)
        if error is not exc:
            log.exception("environment failed", exc_info=exc)
        self.server.stats.errors += 1
        return ErrorInfo(error.code, error.message)

    def _run_inline(self, request: MuxRequest, session: Session) -> Any:
        env = session.env
        match request:
            case Reset(seed=seed, options=options):
                self.server.stats.resets += 1
                return self.server.reset_now(env, seed, options)
            case GetState():
                return env.state()
            case Close():
                self._close(request.sid, session)
                return None
        raise ServerError(ErrorCode.UNKNOWN_TYPE, f"unknown op in {request!r}")

    async def _run_blocking(self, request: MuxRequest, session: Session) -> Any:
        match request:
            case Step(action=action):
                return await self.server.step(session, action)
            case Reset(seed=seed, options=options):
                return await self.server.reset(session, seed, options)
            case GetState():
                return await self.server.state(session)
            case Close():
                self._close(request.sid, session)
                return None
        raise ServerError(ErrorCode.UNKNOWN_TYPE, f"unknown op in {request!r}")

    def _spawn(self, request: MuxRequest, session: Session) -> None:
        started = time.perf_counter()

        async def run() -> None:
            try:
                # Await first: the writer swaps ``_outbox`` meanwhile, so look it up only afterwards.
                result = await self._run_blocking(request, session)
                self._outbox.append(Reply(request.id, True, result))
            except Exception as exc:
                self._outbox.append(Reply(request.id, False, self._failure(exc)))
            finally:
                self._blocking -= 1
            self._latency.observe(time.perf_counter() - started)
            self._wakeup.set()

        self._track(asyncio.create_task(run()))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)  # cancelled when the connection ends
        task.add_done_callback(self._tasks.discard)

    def _open(self, request: Open) -> None:
        existing = self.sessions.get(request.sid)
        if existing is not None and existing.closed:  # expired: the client may open it again
            del self.sessions[request.sid]
        elif existing is not None:
            raise ServerError(ErrorCode.SESSION_EXISTS, f"session {request.sid} is already open on this connection")
        if len(self.sessions) >= self.server.config.max_sessions_per_connection:
            raise ServerError(
                ErrorCode.CAPACITY_REACHED,
                f"connection has {len(self.sessions)} sessions, the limit per connection",
            )
        session = self.server.open_session(f"{self._prefix}{request.sid}", request.env, request.options)
        session.owner = self
        self.sessions[request.sid] = session
        self._outbox.append(Reply(request.id, True, OpenResult(request.sid, session.env.name)))

    def _close(self, sid: int, session: Session) -> None:
        self.sessions.pop(sid, None)
        self._vector.forget(sid)
        self.server.sessions.close(session)

    def _error(self, rid: int, code: ErrorCode, message: str) -> None:
        self.server.stats.errors += 1
        self._outbox.append(Reply(rid, False, ErrorInfo(code, message)))

    # -- writing

    async def _flush(self) -> bool:
        """Send every reply waiting in the outbox as one frame; False if the peer is gone."""
        replies, self._outbox = self._outbox, []
        if not replies:
            return True
        frame = msgpack_encoder.encode(replies)
        stats = self.server.stats
        stats.frames_out += 1
        stats.bytes_out += len(frame)
        try:
            await self.ws.send_bytes(frame)
        except Exception:  # peer gone: the receive loop sees the disconnect and cleans up
            return False
        return True

    async def _write_forever(self) -> None:
        """Send the replies of blocking environments, which arrive between frames."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not await self._flush():
                return


async def mux_endpoint(websocket: WebSocket) -> None:
    server: EnvServer = websocket.app.state.server
    await websocket.accept()
    await MuxConnection(server, websocket).serve()
