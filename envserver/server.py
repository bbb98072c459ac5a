"""The state one envserver process shares between its surfaces: config, env class, sessions, counters."""

from __future__ import annotations

from typing import Any

from . import envs
from .config import ServerConfig
from .env import Environment
from .errors import ServerError
from .protocol import ErrorCode
from .sessions import Session, SessionTable


class Stats:
    """Counters for /metrics."""

    __slots__ = ("steps", "resets", "errors", "frames_in", "frames_out", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.steps = self.resets = self.errors = 0
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0


class EnvServer:
    """Everything the routes need: the default environment, the session table, stats."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.env_class: type[Environment] = envs.load(config.env)  # type: ignore[type-arg]
        self.env_class(**config.env_options).close()  # fail at start, not at the first session
        self.sessions = SessionTable(self._make_env, config.max_sessions, config.idle_ttl)
        self.stats = Stats()

    def _make_env(self, **options: Any) -> Environment:  # type: ignore[type-arg]
        return self.env_class(**{**self.config.env_options, **options})

    def open_session(self, key: str | None = None, env: str | None = None, options: dict[str, Any] | None = None) -> Session:
        """Open a session of the default environment, or of ``env`` with its own defaults."""
        if env is None or env == self.config.env:
            return self.sessions.open(key, **(options or {}))
        if ":" in env:  # a module path imports code: only the operator names one (--env), never a client
            raise ServerError(ErrorCode.NOT_FOUND, f"environment {env!r} is not served here; this server serves {self.config.env!r}")
        env_class = envs.load(env)
        return self.sessions.open(key, env_class, **(options or {}))

    async def reset(self, session: Session, seed: int | None, options: dict[str, Any] | None) -> Any:
        self.stats.resets += 1
        return await session.call(session.env.reset, seed=seed, options=options)

    async def step(self, session: Session, raw_action: Any) -> Any:
        action = session.env.parse_action(raw_action)
        self.stats.steps += 1
        return await session.call(session.env.step, action)

    async def state(self, session: Session) -> Any:
        return await session.call(session.env.state)


def coded(exc: BaseException) -> ServerError:
    """Any exception raised by an environment, as a coded error for the client."""
    if isinstance(exc, ServerError):
        return exc
    return ServerError(ErrorCode.EXECUTION_ERROR, f"{type(exc).__name__}: {exc}")
