"""``EnvClient``: one server, one multiplexed WebSocket, automatic micro-batching.

Every request issued while the writer is busy (or during the same event-loop tick)
leaves in one binary frame; replies are routed back to their futures by request id.
A dead or closed connection fails every call in flight at once with ``EnvCrashed``.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import aiohttp
import msgspec

from envserver.protocol import (
    OBSERVATION_TYPES,
    STATE_TYPES,
    Close,
    ErrorInfo,
    GetState,
    MuxRequest,
    Open,
    OpenResult,
    Ping,
    Reset,
    Step,
    StepResult,
    msgpack_decoder,
    msgpack_encoder,
    mux_reply_decoder,
)

from .errors import EnvCrashed, EnvError, PoolClosed, RequestTimeout, from_reply

_error_decoder = msgspec.msgpack.Decoder(ErrorInfo)
_open_decoder = msgpack_decoder(OpenResult)
_none_decoder = None


class ClientState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    BROKEN = "broken"  # the connection died; every call fails with EnvCrashed
    CLOSED = "closed"


class _Batch:
    """Replies of several requests gathered into one future."""

    __slots__ = ("future", "results", "remaining")

    def __init__(self, future: asyncio.Future[list[Any]], size: int) -> None:
        self.future = future
        self.results: list[Any] = [None] * size
        self.remaining = size


# in-flight entry: (future or batch, index in batch or -1, decoder, env label, deadline)
_Entry = tuple[Any, int, Any, Any, float]


class EnvClient:
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
        max_frame_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.url = url.rstrip("/")
        self.env = env
        self.state = ClientState.NEW
        self._token = token
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._max_frame_bytes = max_frame_bytes
        obs_type = OBSERVATION_TYPES.get(env, Any)
        self._step_decoder = msgpack_decoder(StepResult[obs_type])  # type: ignore[valid-type]
        self._state_decoder = msgpack_decoder(STATE_TYPES.get(env, Any))
        self._ids = itertools.count(1)
        self._sids = itertools.count(1)
        self._inflight: dict[int, _Entry] = {}
        self._outbox: list[MuxRequest] = []
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

    # -- lifecycle

    async def connect(self) -> EnvClient:
        if self.state is not ClientState.NEW:
            raise PoolClosed(f"client is {self.state.value}", server=self.url)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        try:
            self._ws = await asyncio.wait_for(
                self._http.ws_connect(f"{self.url}/v1/mux", heartbeat=self._heartbeat, max_msg_size=0, compress=0),
                self._connect_timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            await self._http.close()
            self.state = ClientState.BROKEN
            raise EnvCrashed(f"cannot connect: {exc!r}", server=self.url) from exc
        self.state = ClientState.OPEN
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._ended = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._read_forever(), name=f"envclient-read {self.url}"),
            asyncio.create_task(self._write_forever(), name=f"envclient-write {self.url}"),
            asyncio.create_task(self._expire_forever(), name=f"envclient-deadlines {self.url}"),
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
        if self._ws is not None:
            await asyncio.wait_for(self._ws.close(), 5.0) if not self._ws.closed else None
        if self._http is not None and not was_new:
            await self._http.close()

    async def __aenter__(self) -> EnvClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_broken(self) -> None:
        """Return when the connection has ended (died, or closed)."""
        if self._ended is None:
            raise PoolClosed("client was never connected", server=self.url)
        await self._ended.wait()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- typed calls

    def new_sid(self) -> int:
        return next(self._sids)

    # Each call returns the future of its reply (await it): no coroutine frame per call.

    def open(self, sid: int, env: str | None = None, options: dict[str, Any] | None = None, *, label: Any = None) -> Awaitable[OpenResult]:
        """Open session ``sid`` of ``env`` (default: the server's) with ``options``."""
        return self._call(Open(next(self._ids), sid, env, options or {}), _open_decoder, label)

    def reset(self, sid: int, seed: int | None = None, options: dict[str, Any] | None = None, *, label: Any = None) -> Awaitable[StepResult[Any]]:
        return self._call(Reset(next(self._ids), sid, seed, options), self._step_decoder, label)

    def step(self, sid: int, action: Any, *, label: Any = None) -> Awaitable[StepResult[Any]]:
        return self._call(Step(next(self._ids), sid, action), self._step_decoder, label)

    def get_state(self, sid: int, *, label: Any = None) -> Awaitable[Any]:
        return self._call(GetState(next(self._ids), sid), self._state_decoder, label)

    def close_session(self, sid: int, *, label: Any = None) -> Awaitable[None]:
        return self._call(Close(next(self._ids), sid), _none_decoder, label)

    async def ping(self) -> float:
        """Round-trip time of one request, in seconds."""
        start = time.perf_counter()
        await self._call(Ping(next(self._ids), 0), _none_decoder, None)
        return time.perf_counter() - start

    def batch(self, op: str, sids: Sequence[int], args: Sequence[Any], labels: Sequence[Any] | None = None) -> asyncio.Future[list[Any]]:
        """Send one request per session in one frame; the future gives results or exceptions in order.

        ``op`` is "step" (``args``: actions), "reset" (``args``: seeds) or "state" (``args`` ignored).
        """
        self._check_open()
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        batch = _Batch(future, len(sids))
        if not sids:
            future.set_result([])
            return future
        deadline = time.monotonic() + self._request_timeout
        ids = self._ids
        if op == "step":
            requests: list[MuxRequest] = [Step(next(ids), sid, arg) for sid, arg in zip(sids, args)]
            decoder = self._step_decoder
        elif op == "reset":
            requests = [Reset(next(ids), sid, arg, None) for sid, arg in zip(sids, args)]
            decoder = self._step_decoder
        elif op == "state":
            requests = [GetState(next(ids), sid) for sid in sids]
            decoder = self._state_decoder
        else:
            raise ValueError(f"unknown batch op {op!r}")
        inflight = self._inflight
        for index, request in enumerate(requests):
            inflight[request.id] = (batch, index, decoder, labels[index] if labels else request.sid, deadline)
        self._outbox.extend(requests)
        self._wake()
        return future

    # -- machinery

    def _check_open(self) -> None:
        if self.state is not ClientState.OPEN:
            if self.broken_reason:  # died, whether or not closed since: the server is gone
                raise EnvCrashed(f"connection lost: {self.broken_reason}", server=self.url)
            raise PoolClosed(f"client is {self.state.value}", server=self.url)

    def _call(self, request: MuxRequest, decoder: Any, label: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if self.state is not ClientState.OPEN:
            try:
                self._check_open()
            except EnvError as exc:
                exc.request, exc.env = request.id, label if label is not None else request.sid
                future.set_exception(exc)
                return future
        self._inflight[request.id] = (
            future,
            -1,
            decoder,
            label if label is not None else request.sid,
            time.monotonic() + self._request_timeout,
        )
        self._outbox.append(request)
        if not self._wake_pending:
            self._wake_pending = True
            self._wakeup.set()  # type: ignore[union-attr]
        return future

    def _wake(self) -> None:
        if not self._wake_pending and self._wakeup is not None:
            self._wake_pending = True
            self._wakeup.set()

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
                    for frame in self._frames(requests):
                        self.frames_sent += 1
                        await ws.send_bytes(frame)
                    self.requests_sent += len(requests)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            self._broken(f"send failed: {exc!r}")

    def _frames(self, requests: list[MuxRequest]) -> list[bytes]:
        """Encode ``requests``, halving the batch until every frame fits the server's limit."""
        frame = msgpack_encoder.encode(requests)
        if len(frame) <= self._max_frame_bytes or len(requests) == 1:
            return [frame]
        half = len(requests) // 2
        return self._frames(requests[:half]) + self._frames(requests[half:])

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
        inflight = self._inflight
        for reply in mux_reply_decoder.decode(data):
            entry = inflight.pop(reply.id, None)
            if entry is None:
                if reply.id == 0 and not reply.ok:  # the server could not read a whole frame
                    info = _error_decoder.decode(reply.body)
                    self._broken(f"server rejected a frame: {info.code}: {info.message}")
                continue
            decoder, label = entry[2], entry[3]
            failed = not reply.ok
            value: Any
            if failed:
                info = _error_decoder.decode(reply.body)
                value = from_reply(info.code, info.message, env=label, server=self.url, request=reply.id)
            else:
                try:
                    value = decoder.decode(reply.body) if decoder is not None else None
                except msgspec.MsgspecError as exc:
                    failed = True
                    value = EnvError(f"cannot decode reply: {exc}", env=label, server=self.url, request=reply.id)
            _settle(entry, value, failed)

    async def _expire_forever(self) -> None:
        interval = min(1.0, self._request_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            expired = []
            for rid, entry in self._inflight.items():  # insertion order == deadline order
                if entry[4] > now:
                    break
                expired.append(rid)
            for rid in expired:
                entry = self._inflight.pop(rid)
                self._resolve_error(entry, RequestTimeout(f"no reply within {self._request_timeout:g} s", env=entry[3], server=self.url, request=rid))

    def _broken(self, reason: str) -> None:
        if self.state is ClientState.OPEN:
            self.state = ClientState.BROKEN
            self.broken_reason = reason
        self._fail_all(EnvCrashed, reason)
        if self._ended is not None:
            self._ended.set()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _fail_all(self, kind: type[EnvError], reason: str) -> None:
        inflight, self._inflight = self._inflight, {}
        self._outbox.clear()
        for rid, entry in inflight.items():
            self._resolve_error(entry, kind(reason, env=entry[3], server=self.url, request=rid))

    @staticmethod
    def _resolve_error(entry: _Entry, error: EnvError) -> None:
        _settle(entry, error, True)


def _settle(entry: _Entry, value: Any, failed: bool) -> None:
    """Deliver one reply (or error) to the single call or the batch slot waiting for it."""
    target, index = entry[0], entry[1]
    if index < 0:
        if not target.done():
            if failed:
                target.set_exception(value)
            else:
                target.set_result(value)
        return
    target.results[index] = value  # a batch reports errors in place
    target.remaining -= 1
    if target.remaining == 0 and not target.future.done():
        target.future.set_result(target.results)
