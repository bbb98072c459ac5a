"""The interface every fleet backend implements: start servers, list them, replace one, stop all."""

from __future__ import annotations

import abc
import contextlib
import enum
import secrets
from collections.abc import AsyncIterator

from ..config import FleetConfig
from ..errors import FleetError


def pool_token(config: FleetConfig) -> str:
    """The bearer token of a pool's servers: the configured one, else a fresh random one."""
    return config.token or secrets.token_urlsafe(32)


class FleetState(enum.Enum):
    """Where a backend that starts once and cannot be restarted is in its life (docker, swarm)."""

    NEW = "new"
    STARTED = "started"
    STOPPED = "stopped"


class FleetBackend(abc.ABC):
    """A set of envserver instances owned by one pool.

    A backend starts its servers in ``start()``, reports their base URLs
    (``http://host:port``), replaces a dead one on request and stops every one
    of them in ``stop()``, which is idempotent and safe after a failed start.
    Use it as an async context manager to get ``stop()`` on every exit path.
    """

    token: str | None = None  # the bearer token the servers require, if any

    @abc.abstractmethod
    async def start(self) -> list[str]:
        """Start the servers, wait until each answers ``/health``, return their URLs."""

    @abc.abstractmethod
    async def replace(self, url: str) -> str:
        """Remove the server at ``url`` (if it still exists) and start a new one; return its URL."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop and remove every server this backend started."""

    @property
    @abc.abstractmethod
    def urls(self) -> list[str]:
        """Base URLs of the servers currently in the fleet."""

    @contextlib.asynccontextmanager
    async def _stopped_if_start_fails(self) -> AsyncIterator[None]:
        """Around ``start``'s work: on any failure, stop what was started, then re-raise."""
        try:
            yield
        except BaseException as exc:
            try:
                await self.stop()
            except FleetError as cleanup:
                exc.add_note(f"cleanup after the failed start also failed: {cleanup}")
            raise

    def describe(self, url: str) -> str:
        """A human-readable name of the server at ``url`` for error messages."""
        return url

    async def __aenter__(self) -> FleetBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
