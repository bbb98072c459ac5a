"""The session table: one environment instance per session, a cap, an idle TTL, ordered calls."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Protocol
from collections.abc import Callable

from .env import Environment
from .errors import ServerError
from .executor import run_blocking
from .protocol import ErrorCode

log = logging.getLogger("envserver.sessions")


class Owner(Protocol):
    """What owns sessions (a mux connection): its ``last_seen`` keeps them alive."""

    last_seen: float  # time.monotonic() of its last sign of life


class Session:
    """One environment instance and what the server knows about its use.

    ``owner``, if set, is the connection that opened it: the session counts as used
    whenever its owner was last heard from, so a live client's sessions never expire.
    """

    __slots__ = ("key", "env", "last_used", "closed", "owner", "_lock")

    def __init__(self, key: str, env: Environment) -> None:  # type: ignore[type-arg]
        self.key = key
        self.env = env
        self.last_used = time.monotonic()
        self.closed = False
        self.owner: Owner | None = None
        self._lock: asyncio.Lock | None = None

    def idle_since(self) -> float:
        """When the session (or its owner) was last used, ``time.monotonic()``."""
        owner = self.owner
        return self.last_used if owner is None else max(self.last_used, owner.last_seen)

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one env method: inline for cheap envs, in a worker thread, in order, for blocking ones."""
        if self.closed:
            raise ServerError(ErrorCode.UNKNOWN_SESSION, f"session {self.key} is closed")
        self.last_used = time.monotonic()
        if not self.env.blocking:
            return method(*args, **kwargs)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # FIFO: requests of one session run in arrival order
            if self.closed:
                raise ServerError(ErrorCode.UNKNOWN_SESSION, f"session {self.key} is closed")
            return await run_blocking(method, *args, **kwargs)


class SessionTable:
    """All live sessions of one server, bounded by ``max_sessions`` and reaped after ``idle_ttl``."""

    def __init__(self, factory: Callable[..., Environment], max_sessions: int, idle_ttl: float) -> None:  # type: ignore[type-arg]
        self._factory = factory
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self.opened_total = 0
        self.refused_total = 0
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: str) -> Session:
        session = self._sessions.get(key)
        if session is None:
            raise ServerError(ErrorCode.UNKNOWN_SESSION, f"unknown session {key!r} (never opened, closed or expired)")
        return session

    def open(self, key: str | None = None, factory: Callable[..., Environment] | None = None, **options: Any) -> Session:  # type: ignore[type-arg]
        """Create a session (with a fresh key unless given) or raise CAPACITY_REACHED / FACTORY_ERROR."""
        if len(self._sessions) >= self.max_sessions:
            self.refused_total += 1
            raise ServerError(
                ErrorCode.CAPACITY_REACHED,
                f"server at capacity: {len(self._sessions)}/{self.max_sessions} sessions active",
            )
        key = key if key is not None else f"s{next(self._ids)}"
        if key in self._sessions:
            raise ServerError(ErrorCode.SESSION_EXISTS, f"session {key!r} is already open")
        try:
            env = (factory or self._factory)(**options)
        except ServerError as exc:
            raise ServerError(ErrorCode.FACTORY_ERROR, exc.message) from None
        except Exception as exc:
            log.exception("environment factory failed")
            raise ServerError(ErrorCode.FACTORY_ERROR, f"cannot create environment: {exc}") from None
        session = Session(key, env)
        self._sessions[key] = session
        self.opened_total += 1
        return session

    def close(self, session: Session) -> None:
        """End a session and release its environment; closing twice is harmless."""
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.key, None)
        try:
            session.env.close()
        except Exception:
            log.exception("closing session %s failed", session.key)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.close(session)

    def expire_idle(self, now: float | None = None) -> int:
        """Close every session unused (and whose owner was silent) for ``idle_ttl`` seconds; return how many."""
        deadline = (now if now is not None else time.monotonic()) - self.idle_ttl
        idle = [s for s in self._sessions.values() if s.idle_since() < deadline]
        for session in idle:
            self.close(session)
        self.expired_total += len(idle)
        return len(idle)

    async def reap_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            count = self.expire_idle()
            if count:
                log.info("expired %d idle sessions", count)
