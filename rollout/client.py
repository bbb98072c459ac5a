"""``EnvClient``: one server, one multiplexed WebSocket, automatic micro-batching.

Every request issued while the writer is busy (or during the same event-loop tick)
leaves in one binary frame, and consecutive ``step`` (or ``reset``) calls on any of
the connection's sessions join one ``steps`` (``resets``) request: the server answers
them in one pass and the client decodes all their results in one call. Replies are
routed back to their futures by request id. A dead or closed connection fails every
call in flight at once with ``EnvCrashed``.

Nothing that goes in or out may leave a call unanswered: an action msgpack cannot carry
(numpy scalars and arrays are turned into plain values) or a request over the server's
frame limit fails that call alone before anything is sent; a reply that breaks the
protocol (fewer results than sessions, a request id never sent) drops the connection with
``ProtocolError``; every request has a deadline. While the client is idle it pings the
server every ``heartbeat`` seconds, which keeps its sessions from expiring.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self

import aiohttp
import msgspec

from envserver.protocol import (
    Batch,
    Close,
    Columns,
    ErrorInfo,
    GetState,
    MuxRequest,
    Open,
    OpenResult,
    Ping,
    ResetMany,
    StepMany,
    StepResult,
    VecReset,
    VecStep,
    msgpack_decoder,
    mux_reply_decoder,
)

from .envtypes import WireTypes, fetch_wire_types
from .errors import (
    EnvCrashed,
    EnvError,
    PoolClosed,
    ProtocolError,
    RequestTimeout,
    RequestTooLarge,
    UnencodableAction,
    from_reply,
)

log = logging.getLogger("rollout.client")

_error_decoder = msgspec.msgpack.Decoder(ErrorInfo)
_open_decoder = msgpack_decoder(OpenResult)
_columns_decoder = msgpack_decoder(Columns)

DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024  # envserver's default --max-frame-bytes


def _plain(obj: Any) -> Any:
    """``enc_hook``: numpy scalars and arrays as plain values (numpy is imported only when one shows up)."""
    if type(obj).__module__ == "numpy":
        import numpy

        if isinstance(obj, numpy.generic | numpy.ndarray):
            return obj.tolist()
    raise TypeError(f"cannot send a {type(obj).__module__}.{type(obj).__qualname__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_plain)
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError)  # what msgspec raises for a value msgpack cannot carry


def _unencodable(exc: Exception) -> str:
    return (
        f"cannot encode the request: {exc}; actions, seeds and options must be msgpack values "
        "(None, bool, int, float, str, bytes, lists and dicts of them) or numpy scalars and arrays"
    )


class ClientState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    BROKEN = "broken"  # the connection died; every call fails with EnvCrashed
    CLOSED = "closed"


class _Batch:
    """The result list of one batched call, filled by one or more replies."""

    __slots__ = ("future", "results", "remaining")

    def __init__(self, future: asyncio.Future[list[Any]], size: int) -> None:
        self.future = future
        self.results: list[Any] = [None] * size
        self.remaining = size


class _Pending:
    """Who waits on one in-flight request, and how to read its reply.

    ``target`` is a future (one call: ``labels`` is its env label), a list of futures
    (per-env calls joined into one many-request) or a ``_Batch`` whose result
    ``positions[i]`` is the i-th session's.
    """

    __slots__ = ("target", "labels", "decoder", "deadline", "positions")

    def __init__(self, target: Any, labels: Any, decoder: Any, deadline: float, positions: Sequence[int] = ()) -> None:
        self.target = target
        self.labels = labels
        self.decoder = decoder
        self.deadline = deadline
        self.positions = positions

    def deliver(self, value: Any, server: str, request: int) -> str:
        """Hand a decoded reply to the waiters (a failed slot of a many-request gets its coded error).

        Return what is wrong with a reply that breaks the protocol ("" if nothing); its waiters
        are then failed with ``ProtocolError``.
        """
        target = self.target
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_result(value)
            return ""
        results, labels = value.results, self.labels
        size = len(labels)
        if len(results) != size or any(not 0 <= index < size for index in value.failures):
            problem = f"protocol error: reply to request {request} carries {len(results)} results (failures at {sorted(value.failures)}) for {size} sessions"
            self.fail(ProtocolError, problem, server=server, request=request)
            return problem
        for index, info in value.failures.items():
            results[index] = from_reply(info.code, info.message, env=labels[index], server=server, request=request)
        if type(target) is not list:
            self._fill(results)  # a batch reports errors in place
            return ""
        for future, result in zip(target, results):
            if future.done():  # cancelled by its caller
                continue
            if value.failures and isinstance(result, EnvError):
                future.set_exception(result)
            else:
                future.set_result(result)
        return ""

    def fail(self, error: Callable[..., EnvError], *args: Any, **where: Any) -> None:
        """Fail every waiter with ``error(*args, env=its label, **where)``."""
        target = self.target
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_exception(error(*args, env=self.labels, **where))
        elif type(target) is list:
            for future, label in zip(target, self.labels):
                if not future.done():
                    future.set_exception(error(*args, env=label, **where))
        else:
            self._fill([error(*args, env=label, **where) for label in self.labels])

    def _fill(self, values: list[Any]) -> None:
        batch = self.target
        results, positions = batch.results, self.positions
        if type(positions) is range:  # the common case: one contiguous run of the batch
            results[positions.start : positions.stop] = values
        else:
            for position, value in zip(positions, values):
                results[position] = value
        batch.remaining -= len(values)
        if batch.remaining <= 0 and not batch.future.done():
            batch.future.set_result(results)

    def pick(self, indices: Sequence[int]) -> _Pending:
        """The waiters of the sessions at ``indices`` of this many-request (same deadline)."""
        labels = [self.labels[i] for i in indices]
        if type(self.target) is list:
            return _Pending([self.target[i] for i in indices], labels, self.decoder, self.deadline)
        return _Pending(self.target, labels, self.decoder, self.deadline, [self.positions[i] for i in indices])


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a keepalive ping that failed is no one's error


# The argument list of each many-request, by type.
_ARGS = {StepMany: "actions", ResetMany: "seeds"}


class ClientLifecycle:
    """What every client shares: ``async with`` connects and closes it, ``wait_broken`` waits for its end."""

    url: str
    _ended: asyncio.Event | None

    async def connect(self) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        client: Self = await self.connect()
        return client

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_broken(self) -> None:
        """Return when the connection has ended (the server lost, or the client closed)."""
        if self._ended is None:
            raise PoolClosed("client was never connected", server=self.url)
        await self._ended.wait()


class EnvClient(ClientLifecycle):
    """A connection to one envserver's ``/v1/mux``; typed calls on numbered sessions."""

    def __init__(
        self,
        url: str,
        *,
        env: str = "openspiel",
        token: str | None = None,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        heartbeat: float = 5.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.url = url.rstrip("/")
        self.env = env
        self.state = ClientState.NEW
        self._token = token
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._max_frame_bytes = max_frame_bytes
        self.use_types(WireTypes())  # connect() reads the server's
        self._ids = itertools.count(1)
        self._sids = itertools.count(1)
        self._inflight: dict[int, _Pending] = {}
        self._outbox: list[MuxRequest] = []
        self._joinable: StepMany | ResetMany | None = None  # the outbox's last request, if per-env calls may join it
        self._wakeup: asyncio.Event | None = None
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by connect()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.broken_reason = ""
        self._ended: asyncio.Event | None = None
        self.frames_sent = 0
        self.requests_sent = 0
        self.timeouts = 0  # sessions whose request got no answer within its deadline

    # -- lifecycle

    async def connect(self) -> EnvClient:
        if self.state is not ClientState.NEW:
            raise PoolClosed(f"client is {self.state.value}", server=self.url)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        try:
            self._ws = await asyncio.wait_for(
                self._http.ws_connect(f"{self.url}/v1/mux", heartbeat=self._heartbeat or None, max_msg_size=0, compress=0),
                self._connect_timeout,
            )
        except BaseException as exc:  # also cancelled: the session is closed on every way out
            await asyncio.shield(self._http.close())
            self.state = ClientState.BROKEN
            if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (401, 403):  # a wrong token or Origin
                code = "UNAUTHORIZED" if exc.status == 401 else "FORBIDDEN"
                raise from_reply(code, f"the server refused the connection (HTTP {exc.status})", server=self.url) from exc
            if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | OSError):
                raise EnvCrashed(f"cannot connect: {exc!r}", server=self.url) from exc
            raise
        self.use_types(await fetch_wire_types(self._http, self.url, self.env, self._connect_timeout))
        self.state = ClientState.OPEN
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._ended = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._read_forever(), name=f"envclient-read {self.url}"),
            asyncio.create_task(self._write_forever(), name=f"envclient-write {self.url}"),
            asyncio.create_task(self._tick_forever(), name=f"envclient-deadlines {self.url}"),
        ]
        return self

    async def close(self) -> None:
        """Close the connection; calls still in flight fail with ``PoolClosed``."""
        if self.state is ClientState.CLOSED:
            return
        was_new = self.state is ClientState.NEW
        self.state = ClientState.CLOSED
        self._fail_all(PoolClosed, "client closed")
        if self._ended is not None:
            self._ended.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self._ws is not None and not self._ws.closed:
                await asyncio.wait_for(self._ws.close(), 5.0)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            pass  # the peer is gone: nothing to say goodbye to
        finally:
            if self._http is not None and not was_new:
                await asyncio.shield(self._http.close())

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def use_types(self, types: WireTypes) -> None:
        """Decode observations and states into ``types`` from now on."""
        self.wire_types = types
        self._batch_decoder = msgpack_decoder(Batch[StepResult[types.observation]])  # type: ignore[name-defined]
        self._state_decoder = msgpack_decoder(types.state)

    # -- typed calls

    def new_sid(self) -> int:
        return next(self._sids)

    # Each call returns the future of its reply (await it): no coroutine frame per call.

    def open(self, sid: int, env: str | None = None, options: dict[str, Any] | None = None, *, label: Any = None) -> Awaitable[OpenResult]:
        """Open session ``sid`` of ``env`` (default: the server's) with ``options``."""
        return self._call(Open(next(self._ids), sid, env, options or {}), _open_decoder, label)

    def reset(self, sid: int, seed: int | None = None, options: dict[str, Any] | None = None, *, label: Any = None) -> Awaitable[StepResult[Any]]:
        return self._join(ResetMany, sid, seed, options, label)

    def step(self, sid: int, action: Any, *, label: Any = None) -> Awaitable[StepResult[Any]]:
        return self._join(StepMany, sid, action, None, label)

    def get_state(self, sid: int, *, label: Any = None) -> Awaitable[Any]:
        return self._call(GetState(next(self._ids), sid), self._state_decoder, label)

    def close_session(self, sid: int, *, label: Any = None) -> Awaitable[None]:
        return self._call(Close(next(self._ids), sid), None, label)

    async def ping(self) -> float:
        """Round-trip time of one request, in seconds."""
        start = time.perf_counter()
        await self._call(Ping(next(self._ids), 0), None, None)
        return time.perf_counter() - start

    def batch(self, op: str, sids: Sequence[int], args: Sequence[Any], labels: Sequence[Any] | None = None) -> asyncio.Future[list[Any]]:
        """Step (``args``: actions) or reset (``args``: seeds) many sessions in one request.

        The future gives one result per session, in order, with an exception in place of each that failed.
        """
        kind = {"step": StepMany, "reset": ResetMany}.get(op)
        if kind is None:
            raise ValueError(f"unknown batch op {op!r}; batch ops: step, reset")
        self._check_open()
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        if not sids:
            future.set_result([])
            return future
        request = kind(next(self._ids), list(sids), list(args))
        size = len(request.sids)
        if len(getattr(request, _ARGS[kind])) != size:
            raise ValueError(f"{size} sessions but {len(args)} {_ARGS[kind]}")
        deadline = time.monotonic() + self._request_timeout
        pending = _Pending(_Batch(future, size), list(labels) if labels else request.sids, self._batch_decoder, deadline, range(size))
        self._inflight[request.id] = pending
        self._send(request)
        return future

    def vstep(self, sids: list[int], actions: bytes, autoreset: str = "next_step", *, text: bool = False, label: Any = None) -> asyncio.Future[Columns]:
        """Step many sessions in one columnar request (``actions``: k little-endian int64); the future gives ``Columns``."""
        return self._call(VecStep(next(self._ids), sids, actions, autoreset, text), _columns_decoder, label)  # type: ignore[arg-type]

    def vreset(self, sids: list[int], seeds: list[int | None], episodes: list[int] | None = None, *, text: bool = False, label: Any = None) -> asyncio.Future[Columns]:
        """Reset many sessions in one columnar request (``seeds``: base seeds); the future gives ``Columns``."""
        return self._call(VecReset(next(self._ids), sids, seeds, episodes, text), _columns_decoder, label)

    # -- machinery

    def _check_open(self) -> None:
        if self.state is not ClientState.OPEN:
            if self.broken_reason:  # died, whether or not closed since: the server is gone
                raise EnvCrashed(f"connection lost: {self.broken_reason}", server=self.url)
            raise PoolClosed(f"client is {self.state.value}", server=self.url)

    def _refused(self, future: asyncio.Future[Any], label: Any) -> asyncio.Future[Any]:
        try:
            self._check_open()
        except EnvError as exc:
            exc.env = label
            future.set_exception(exc)
        return future

    def _call(self, request: MuxRequest, decoder: Any, label: Any) -> asyncio.Future[Any]:
        """Send one request on its own; its reply body is decoded with ``decoder``."""
        future: asyncio.Future[Any] = self._loop.create_future()
        if label is None:
            label = getattr(request, "sid", None)
        if self.state is not ClientState.OPEN:
            return self._refused(future, label)
        self._inflight[request.id] = _Pending(future, label, decoder, time.monotonic() + self._request_timeout)
        self._send(request)
        return future

    def _join(self, kind: type[StepMany | ResetMany], sid: int, arg: Any, options: dict[str, Any] | None, label: Any) -> asyncio.Future[Any]:
        """Add one session's step or reset to the many-request being gathered (or start one)."""
        future: asyncio.Future[Any] = self._loop.create_future()
        if label is None:
            label = sid
        if self.state is not ClientState.OPEN:
            return self._refused(future, label)
        request = self._joinable
        if request is None or type(request) is not kind or (kind is ResetMany and request.options is not options):  # type: ignore[union-attr]
            request = kind(next(self._ids), [], [])
            if kind is ResetMany:
                request.options = options  # type: ignore[union-attr]
            self._inflight[request.id] = _Pending([], [], self._batch_decoder, time.monotonic() + self._request_timeout)
            self._send(request)
            self._joinable = request
        pending = self._inflight[request.id]
        pending.target.append(future)
        pending.labels.append(label)
        request.sids.append(sid)
        (request.actions if kind is StepMany else request.seeds).append(arg)  # type: ignore[union-attr]
        return future

    def _send(self, request: MuxRequest) -> None:
        self._outbox.append(request)
        self._joinable = None  # keep each session's requests in order: nothing joins a request sent before this one
        if not self._wake_pending:
            self._wake_pending = True
            self._wakeup.set()  # type: ignore[union-attr]

    async def _write_forever(self) -> None:
        assert self._ws is not None and self._wakeup is not None
        ws, wakeup = self._ws, self._wakeup
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                self._wake_pending = False
                while self._outbox:
                    requests, self._outbox = self._outbox, []
                    self._joinable = None
                    for frame in self._frames(requests):
                        self.frames_sent += 1
                        await ws.send_bytes(frame)
                    self.requests_sent += len(requests)
        except Exception as exc:  # the connection (or this task) is gone: never stay OPEN without a writer
            self._broken(f"send failed: {exc!r}")

    def _frames(self, requests: list[MuxRequest]) -> list[bytes]:
        """Encode ``requests``, halving the batch (or a many-request) until every frame fits the server's limit.

        What cannot be encoded, or does not fit even alone, fails its waiters here and is not sent.
        """
        try:
            frame = _encoder.encode(requests)
        except _ENCODE_ERRORS:
            requests = self._encodable(requests)
            if not requests:
                return []
            frame = _encoder.encode(requests)
        if len(frame) <= self._max_frame_bytes:
            return [frame]
        if len(requests) > 1:
            half = len(requests) // 2
            return self._frames(requests[:half]) + self._frames(requests[half:])
        request = requests[0]
        if type(request) in _ARGS and len(request.sids) > 1:  # type: ignore[union-attr]
            return self._frames(self._split(request))  # type: ignore[arg-type]
        pending = self._inflight.pop(request.id, None)
        if pending is not None:
            message = f"request of {len(frame):,} bytes exceeds the server's frame limit of {self._max_frame_bytes:,} bytes; it was not sent"
            pending.fail(RequestTooLarge, message, code="FRAME_TOO_LARGE", server=self.url, request=request.id)
        return []

    def _encodable(self, requests: list[MuxRequest]) -> list[MuxRequest]:
        """``requests`` without what msgpack cannot carry: each bad call fails alone with ``UnencodableAction``."""
        kept: list[MuxRequest] = []
        for request in requests:
            try:
                _encoder.encode(request)
                kept.append(request)
                continue
            except _ENCODE_ERRORS as exc:
                error = exc
            pending = self._inflight.pop(request.id, None)
            if pending is None:  # nobody waits any more
                continue
            field = _ARGS.get(type(request))
            if field is None:
                pending.fail(UnencodableAction, _unencodable(error), server=self.url, request=request.id)
                continue
            args = getattr(request, field)
            good, bad = [], []
            for index, arg in enumerate(args):
                try:
                    _encoder.encode(arg)
                    good.append(index)
                except _ENCODE_ERRORS as exc:
                    bad.append((index, exc))
            for index, reason in bad:
                pending.pick([index]).fail(UnencodableAction, _unencodable(reason), server=self.url, request=request.id)
            if not bad:  # the options of a ResetMany: every session's call fails
                pending.fail(UnencodableAction, _unencodable(error), server=self.url, request=request.id)
            elif good:
                piece = msgspec.structs.replace(
                    request, sids=[request.sids[i] for i in good], **{field: [args[i] for i in good]}  # type: ignore[union-attr]
                )
                self._inflight[piece.id] = pending.pick(good)
                kept.append(piece)
        return kept

    def _split(self, request: StepMany | ResetMany) -> list[MuxRequest]:
        """Two requests, each for half of ``request``'s sessions, with the waiters split to match (same deadline)."""
        pending = self._inflight.pop(request.id, None)
        if pending is None:  # nobody waits any more (failed or expired meanwhile)
            return []
        field = _ARGS[type(request)]
        args, size = getattr(request, field), len(request.sids)
        half = size // 2
        halves: list[MuxRequest] = []
        for part in (range(half), range(half, size)):
            piece = msgspec.structs.replace(request, id=next(self._ids), sids=request.sids[part.start : part.stop], **{field: args[part.start : part.stop]})
            self._inflight[piece.id] = pending.pick(part)
            halves.append(piece)
        return halves

    async def _read_forever(self) -> None:
        assert self._ws is not None
        ws = self._ws
        reason = "server closed the connection"
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    self._dispatch(message.data)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    reason = f"connection error: {ws.exception()!r}"
                    break
        except Exception as exc:  # any failure here must fail the calls, never strand them
            reason = f"reader failed: {exc!r}"
        if ws.close_code is not None and reason == "server closed the connection":
            reason += f" (code {ws.close_code})"
        self._broken(reason)

    def _dispatch(self, data: bytes) -> None:
        inflight, url = self._inflight, self.url
        for reply in mux_reply_decoder.decode(data):
            rid = reply.id
            pending = inflight.pop(rid, None)
            if pending is None:
                if rid == 0 and not reply.ok:  # the server could not read a whole frame
                    info = _error_decoder.decode(reply.body)
                    self._broken(f"server rejected a frame: {info.code}: {info.message}")
                elif rid >= next(self._ids):  # (a late reply to an expired request is not an error)
                    self._broken(f"protocol error: reply to request {rid}, which was never sent", ProtocolError)
                continue
            if not reply.ok:
                info = _error_decoder.decode(reply.body)
                pending.fail(from_reply, info.code, info.message, server=url, request=rid)
                continue
            try:
                value = pending.decoder.decode(reply.body) if pending.decoder is not None else None
            except msgspec.MsgspecError as exc:
                pending.fail(ProtocolError, f"cannot decode reply: {exc}", server=url, request=rid)
                continue
            problem = pending.deliver(value, url, rid)
            if problem:
                self._broken(problem, ProtocolError)

    async def _tick_forever(self) -> None:
        """Fail requests past their deadline; ping the server when nothing was sent for ``heartbeat`` seconds."""
        interval = min(1.0, self._request_timeout / 4, self._heartbeat / 2 if self._heartbeat else 1.0)
        frames, quiet_since = self.frames_sent, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            expired = [rid for rid, pending in self._inflight.items() if pending.deadline <= now]
            for rid in expired:
                pending = self._inflight.pop(rid)
                self.timeouts += len(pending.labels) if type(pending.labels) is list else 1
                pending.fail(RequestTimeout, f"no reply within {self._request_timeout:g} s", server=self.url, request=rid)
            if self.frames_sent != frames:
                frames, quiet_since = self.frames_sent, now
            elif self._heartbeat and now - quiet_since >= self._heartbeat:
                quiet_since = now  # a sign of life: the server counts its sessions' idle time from the last frame
                self._call(Ping(next(self._ids), 0), None, None).add_done_callback(_ignore_outcome)

    def _broken(self, reason: str, kind: type[EnvError] = EnvCrashed) -> None:
        if self.state is ClientState.OPEN:
            self.state = ClientState.BROKEN
            self.broken_reason = reason
            log.warning("connection to %s lost: %s", self.url, reason)
        self._fail_all(kind, reason)
        if self._ended is not None:
            self._ended.set()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _fail_all(self, kind: type[EnvError], reason: str) -> None:
        inflight, self._inflight = self._inflight, {}
        self._outbox.clear()
        self._joinable = None
        for rid, pending in inflight.items():
            pending.fail(kind, reason, server=self.url, request=rid)
