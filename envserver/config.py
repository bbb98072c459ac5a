"""Server configuration as one immutable value."""

from __future__ import annotations

from typing import Any

import msgspec


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How one envserver process serves its environment."""

    env: str = "openspiel"
    env_options: dict[str, Any] = {}  # defaults for every session, e.g. {"game": "catch"}
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 4096
    idle_ttl: float = 600.0  # seconds a session may sit unused before it is freed
    max_frame_bytes: int = 4 * 1024 * 1024  # WebSocket frames and HTTP bodies
    max_sessions_per_connection: int = 4096
    max_blocking_per_connection: int = 4096  # calls of blocking envs in flight (queued or running) per mux connection
    token: str | None = None  # bearer token required on every route when set
    web: bool = True  # serve the browser play page at /web
    lifetime: float | None = None  # exit by itself after this many seconds
