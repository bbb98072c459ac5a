"""``OpenEnvClient``: drive an unmodified OpenEnv server over its ``WS /ws``, as ``EnvClient`` drives envserver.

    EnvPool(n=64, backend="endpoints", endpoints=("openenv+ws://127.0.0.1:8000",))

OpenEnv gives each WebSocket its own environment and answers one JSON frame per request,
in order, so each session is one WebSocket here, with one request in flight at a time.
The class offers the calls ``EnvPool`` makes of ``EnvClient`` (open, reset, step,
get_state, close_session, batch, wait_broken, close), so pools, ``rollout eval``, crash
handling and the dashboard work unchanged. Observations arrive as plain JSON data.

A session whose socket the server closes after an error that ends sessions
(``CAPACITY_REACHED``, ``FACTORY_ERROR``, ``SESSION_ERROR``) fails alone; a socket lost
any other way means the server is gone: every call fails with ``EnvCrashed`` and the pool
replaces the server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec

from envserver.protocol import OpenResult, StepResult

from .client import _ENCODE_ERRORS, DEFAULT_MAX_FRAME_BYTES, ClientLifecycle, ClientState, EnvClient, _plain, _unencodable
from .errors import EnvCrashed, EnvError, PoolClosed, RequestTimeout, RequestTooLarge, UnencodableAction, UnknownSession, from_reply

SCHEMES = ("openenv+ws://", "openenv+wss://")
_ENDS_SESSION = frozenset({"CAPACITY_REACHED", "FACTORY_ERROR", "SESSION_ERROR"})


def is_openenv_url(url: str) -> bool:
    """Whether ``url`` names an OpenEnv server (``openenv+ws://host:port``)."""
    return url.startswith(SCHEMES)


def http_url(url: str) -> str:
    """The HTTP base URL of a server URL: ``openenv+ws://h:p`` -> ``http://h:p``; others unchanged."""
    if url.startswith("openenv+wss://"):
        return "https://" + url[len("openenv+wss://") :].rstrip("/")
    if url.startswith("openenv+ws://"):
        return "http://" + url[len("openenv+ws://") :].rstrip("/")
    return url.rstrip("/")


def client_class(url: str) -> type[EnvClient] | type[OpenEnvClient]:
    """The client that speaks the protocol of the server at ``url``."""
    return OpenEnvClient if is_openenv_url(url) else EnvClient


class _Frame(msgspec.Struct):
    type: str
    data: msgspec.Raw = msgspec.Raw(b"null")


class _Observation(msgspec.Struct):
    observation: Any
    reward: float | None = None
    done: bool = False


class _Error(msgspec.Struct):
    message: str = "(no message)"
    code: str = "SESSION_ERROR"


_frame_decoder = msgspec.json.Decoder(_Frame)
_observation_decoder = msgspec.json.Decoder(_Observation)
_error_decoder = msgspec.json.Decoder(_Error)
_encoder = msgspec.json.Encoder(enc_hook=_plain)  # numpy actions as plain values, as on the mux


class _Session:
    """One session: its WebSocket, the replies awaited on it (in order), and why it ended."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, reset_data: dict[str, Any]) -> None:
        self.ws = ws
        self.reset_data = reset_data
        self.waiting: deque[asyncio.Future[_Frame]] = deque()
        self.lock = asyncio.Lock()
        self.ended: EnvError | None = None  # set when the server ended this session (alone)
        self.last_error: _Error | None = None
        self.closing = False
        self.reader: asyncio.Task[None] | None = None


class OpenEnvClient(ClientLifecycle):
    """Sessions on one OpenEnv server, one WebSocket each; the call surface of ``EnvClient``."""

    def __init__(
        self,
        url: str,
        *,
        env: str = "openenv",
        token: str | None = None,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        heartbeat: float = 5.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.url = url.rstrip("/")
        self.env = env
        self.max_frame_bytes = max_frame_bytes
        self.state = ClientState.NEW
        self.broken_reason = ""
        self._ws_url = self.url.replace("openenv+", "", 1) + "/ws"
        self._token = token
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._sids = itertools.count(1)
        self._sessions: dict[int, _Session] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ended: asyncio.Event | None = None
        self.frames_sent = 0
        self.requests_sent = 0

    # -- lifecycle

    async def connect(self) -> OpenEnvClient:
        """Check the server answers; sessions connect their own sockets in ``open``."""
        if self.state is not ClientState.NEW:
            raise PoolClosed(f"client is {self.state.value}", server=self.url)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        self._ended = asyncio.Event()
        self.state = ClientState.OPEN
        return self

    async def close(self) -> None:
        """Close every session's socket; calls still in flight fail with ``PoolClosed``."""
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        if self._ended is not None:
            self._ended.set()
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(self._drop(s, PoolClosed("client closed", server=self.url)) for s in sessions), return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    @property
    def in_flight(self) -> int:
        return sum(len(s.waiting) for s in self._sessions.values())

    # -- calls

    def new_sid(self) -> int:
        return next(self._sids)

    async def open(self, sid: int, env: str | None = None, options: dict[str, Any] | None = None, *, label: Any = None) -> OpenResult:
        """Connect session ``sid``'s WebSocket; ``options`` are sent with each of its resets (OpenEnv has no session options)."""
        self._check_open(label)
        assert self._http is not None
        if sid in self._sessions:
            raise EnvError(f"session {sid} is already open", env=label, server=self.url)
        try:
            ws = await asyncio.wait_for(
                self._http.ws_connect(self._ws_url, heartbeat=self._heartbeat, max_msg_size=0, compress=0), self._connect_timeout
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._broken(f"cannot connect: {exc!r}")
            raise EnvCrashed(f"cannot connect: {exc!r}", env=label, server=self.url) from exc
        if self.state is not ClientState.OPEN:  # closed or broken while connecting: this socket has no owner
            await ws.close()
            self._check_open(label)
        session = _Session(ws, dict(options or {}))
        session.reader = asyncio.create_task(self._read_forever(sid, session), name=f"openenv-read {self.url} {sid}")
        self._sessions[sid] = session
        return OpenResult(sid, env or self.env)

    async def reset(self, sid: int, seed: int | None = None, options: dict[str, Any] | None = None, *, label: Any = None) -> StepResult[Any]:
        session = self._session(sid, label)
        data = {**session.reset_data, **(options or {})}
        if seed is not None:
            data["seed"] = seed
        frame = await self._request(sid, session, {"type": "reset", "data": data}, label)
        return self._result(frame, label)

    async def step(self, sid: int, action: Any, *, label: Any = None) -> StepResult[Any]:
        if isinstance(action, int) and not isinstance(action, bool):
            action = {"action_id": action}  # as envserver's OpenSpiel takes a bare id
        frame = await self._request(sid, self._session(sid, label), {"type": "step", "data": action}, label)
        return self._result(frame, label)

    async def get_state(self, sid: int, *, label: Any = None) -> Any:
        frame = await self._request(sid, self._session(sid, label), {"type": "state"}, label)
        return msgspec.json.decode(frame.data)

    async def close_session(self, sid: int, *, label: Any = None) -> None:
        session = self._sessions.pop(sid, None)
        if session is not None:
            await self._drop(session, UnknownSession(f"session {sid} closed", env=label, server=self.url))

    def batch(self, op: str, sids: Sequence[int], args: Sequence[Any], labels: Sequence[Any] | None = None) -> asyncio.Future[list[Any]]:
        """Reset (``args``: seeds) or step (``args``: actions) many sessions; exceptions in place of failures."""
        if op not in ("step", "reset"):
            raise ValueError(f"unknown batch op {op!r}; batch ops: step, reset")
        self._check_open(None)
        names = list(labels) if labels else list(sids)
        call = self.step if op == "step" else self.reset
        calls = [call(sid, arg, label=name) for sid, arg, name in zip(sids, args, names)]
        return asyncio.ensure_future(asyncio.gather(*calls, return_exceptions=True))  # type: ignore[arg-type]

    async def ping(self) -> float:
        raise EnvError("OpenEnv servers have no ping request", server=self.url)

    # -- machinery

    def _check_open(self, label: Any) -> None:
        if self.state is not ClientState.OPEN:
            if self.broken_reason:
                raise EnvCrashed(f"connection lost: {self.broken_reason}", env=label, server=self.url)
            raise PoolClosed(f"client is {self.state.value}", env=label, server=self.url)

    def _session(self, sid: int, label: Any) -> _Session:
        self._check_open(label)
        session = self._sessions.get(sid)
        if session is None:
            raise UnknownSession(f"no session {sid} on this client", env=label, server=self.url)
        if session.ended is not None:
            raise session.ended
        return session

    async def _request(self, sid: int, session: _Session, message: dict[str, Any], label: Any) -> _Frame:
        """Send one frame and await its reply; the session's requests go one at a time.

        A request that cannot be encoded, or that exceeds ``max_frame_bytes``, fails alone before sending.
        """
        try:
            text = _encoder.encode(message).decode()
        except _ENCODE_ERRORS as exc:
            raise UnencodableAction(_unencodable(exc), env=label, server=self.url) from exc
        if len(text) > self.max_frame_bytes:
            raise RequestTooLarge(f"a {len(text):,}-byte frame exceeds the {self.max_frame_bytes:,}-byte limit; not sent", env=label, server=self.url)
        async with session.lock:
            if session.ended is not None:
                raise session.ended
            self._check_open(label)
            future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
            session.waiting.append(future)
            try:
                await session.ws.send_str(text)
            except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                session.waiting.remove(future)
                raise EnvCrashed(f"send failed: {exc!r}", env=label, server=self.url) from exc
            self.frames_sent += 1
            self.requests_sent += 1
            try:
                frame = await asyncio.wait_for(asyncio.shield(future), self._request_timeout)
            except asyncio.TimeoutError:
                # A late reply would answer the next request: this session cannot go on.
                future.cancel()  # its error is raised here, not left on an unread future
                error = RequestTimeout(f"no reply within {self._request_timeout:g} s; session abandoned", env=label, server=self.url)
                self._sessions.pop(sid, None)
                await self._drop(session, error)
                raise error from None
            except asyncio.CancelledError:
                future.cancel()  # stays queued: its reply, when it comes, is read and dropped, keeping replies in step
                raise
        if frame.type == "error":
            info = _error_decoder.decode(frame.data)
            raise from_reply(info.code, info.message, env=label, server=self.url)
        return frame

    def _result(self, frame: _Frame, label: Any) -> StepResult[Any]:
        if frame.type != "observation":
            raise EnvError(f"expected an observation frame, got {frame.type!r}", env=label, server=self.url)
        try:
            reply = _observation_decoder.decode(frame.data)
        except msgspec.ValidationError as exc:
            raise EnvError(f"cannot decode reply: {exc}", env=label, server=self.url) from None
        return StepResult(reply.observation, 0.0 if reply.reward is None else float(reply.reward), reply.done, False, {})

    async def _read_forever(self, sid: int, session: _Session) -> None:
        """Hand each reply to the oldest waiting request; notice how the socket ends."""
        ws = session.ws
        reason = "server closed the connection"
        try:
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    if message.type is aiohttp.WSMsgType.ERROR:
                        reason = f"connection error: {ws.exception()!r}"
                        break
                    continue
                try:
                    frame = _frame_decoder.decode(message.data)
                except msgspec.DecodeError as exc:
                    reason = f"unreadable frame: {exc}"
                    break
                if frame.type == "error":
                    session.last_error = _error_decoder.decode(frame.data)
                if session.waiting:
                    future = session.waiting.popleft()
                    if not future.done():
                        future.set_result(frame)
        except Exception as exc:  # any failure here must fail the calls, never strand them
            reason = f"reader failed: {exc!r}"
        if session.closing or self.state is not ClientState.OPEN:
            return
        last = session.last_error
        if last is not None and last.code in _ENDS_SESSION:  # the server ended this session only
            session.ended = from_reply(last.code, last.message, env=sid, server=self.url)
            self._fail_waiting(session, session.ended)
            return
        if ws.close_code is not None:
            reason += f" (code {ws.close_code})"
        self._broken(reason)

    def _fail_waiting(self, session: _Session, error: EnvError) -> None:
        while session.waiting:
            future = session.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    async def _drop(self, session: _Session, error: EnvError) -> None:
        """Close one session's socket (OpenEnv's close frame first) and fail what waits on it."""
        session.closing = True
        self._fail_waiting(session, error)
        if not session.ws.closed:
            try:
                await asyncio.wait_for(session.ws.send_str('{"type":"close"}'), 2.0)
            except (ConnectionError, aiohttp.ClientError, RuntimeError, asyncio.TimeoutError):
                pass  # the socket is going away anyway
            await asyncio.wait_for(session.ws.close(), 5.0)
        if session.reader is not None and session.reader is not asyncio.current_task():
            session.reader.cancel()
            await asyncio.gather(session.reader, return_exceptions=True)

    def _broken(self, reason: str) -> None:
        if self.state is ClientState.OPEN:
            self.state = ClientState.BROKEN
            self.broken_reason = reason
        for sid, session in self._sessions.items():
            self._fail_waiting(session, EnvCrashed(reason, env=sid, server=self.url))
        if self._ended is not None:
            self._ended.set()
