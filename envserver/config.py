"""Server configuration as one immutable value."""

from __future__ import annotations

from typing import Any

import msgspec


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How one envserver process serves its environments."""

    envs: tuple[str, ...] = ("openspiel",)  # what this server serves; the first is the default
    env_options: dict[str, Any] = {}  # operator settings of the default environment, e.g. {"game": "catch"}
    other_env_options: dict[str, dict[str, Any]] = {}  # operator settings of the other environments, by name
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 4096
    idle_ttl: float = 600.0  # seconds a session may sit unused before it is freed
    max_frame_bytes: int = 4 * 1024 * 1024  # WebSocket frames and HTTP bodies
    max_sessions_per_connection: int = 4096
    max_blocking_per_connection: int = 4096  # calls of blocking envs in flight (queued or running) per mux connection
    token: str | None = None  # bearer token required on every route when set
    allow_origins: tuple[str, ...] = ()  # browser Origins allowed besides the server's own
    web: bool = True  # serve the browser play page at /web
    lifetime: float | None = None  # exit by itself after this many seconds

    @property
    def env(self) -> str:
        """The default environment: the first of ``envs``."""
        return self.envs[0]

    def options_of(self, name: str) -> dict[str, Any]:
        """The operator's settings of the served environment ``name``."""
        return self.env_options if name == self.env else self.other_env_options.get(name, {})
