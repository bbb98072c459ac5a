"""The state one envserver process shares between its surfaces: config, env classes, sessions, counters.

This is where the operator's choices are enforced for every surface: a session opens only
for an environment the server was started with (``FORBIDDEN`` otherwise), and a client may
set only the options its environment declares in ``session_options`` (``VALIDATION_ERROR``
otherwise); everything else comes from the operator's ``--env-options``.
"""

from __future__ import annotations

import functools
from typing import Any

from . import envs
from .config import ServerConfig
from .env import Environment
from .errors import ServerError
from .protocol import ErrorCode
from .sessions import Session, SessionTable

EnvClass = type[Environment]  # type: ignore[type-arg]
MAX_NAMED = 10  # refused option names an error message lists


class Stats:
    """Counters for /metrics."""

    __slots__ = ("steps", "resets", "errors", "frames_in", "frames_out", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.steps = self.resets = self.errors = 0
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0


class EnvServer:
    """Everything the routes need: the served environments, the session table, stats."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.env_classes: dict[str, EnvClass] = {}  # by the name the operator gave and by the class's own name
        self._operator_options: dict[EnvClass, dict[str, Any]] = {}
        for spec in config.envs:
            env_class = envs.load(spec)
            options = config.options_of(spec)
            try:
                env_class(**options).close()  # fail at start, not at the first session
            except Exception as exc:
                raise coded(exc, ErrorCode.FACTORY_ERROR, f"cannot create {spec}") from None
            self.env_classes[spec] = self.env_classes[env_class.name] = env_class
            self._operator_options[env_class] = options
        self.env_class: EnvClass = self.env_classes[config.env]
        self.sessions = SessionTable(self._make_env, config.max_sessions, config.idle_ttl)
        self.stats = Stats()

    def _make_env(self, env_class: EnvClass | None = None, /, **options: Any) -> Environment:  # type: ignore[type-arg]
        """A new environment: the operator's settings overlaid with the (checked) client options."""
        env_class = env_class or self.env_class
        return env_class(**{**self._operator_options[env_class], **options})

    def served(self, env: str | None) -> EnvClass:
        """The class of the served environment ``env`` (None: the default); FORBIDDEN for any other."""
        if env is None:
            return self.env_class
        env_class = self.env_classes.get(env)
        if env_class is None:
            raise ServerError(
                ErrorCode.FORBIDDEN, f"this server does not serve {env[:100]!r}; it serves {', '.join(self.config.envs)}"
            )
        return env_class

    def open_session(self, key: str | None = None, env: str | None = None, options: dict[str, Any] | None = None) -> Session:
        """Open a session of the default environment, or of the served ``env``, with client ``options``."""
        env_class = self.served(env)
        if options:
            check_session_options(env_class, options)
        return self.sessions.open(key, functools.partial(self._make_env, env_class), **(options or {}))

    def reset_now(self, env: Environment, seed: int | None, options: dict[str, Any] | None) -> Any:  # type: ignore[type-arg]
        """Reset a cheap environment inline (the mux fast path), with the client's options checked."""
        if options:
            check_session_options(type(env), options)
        return env.reset(seed=seed, options=options)

    async def reset(self, session: Session, seed: int | None, options: dict[str, Any] | None) -> Any:
        if options:
            check_session_options(type(session.env), options)
        self.stats.resets += 1
        return await session.call(session.env.reset, seed=seed, options=options)

    async def step(self, session: Session, raw_action: Any) -> Any:
        action = session.env.parse_action(raw_action)
        self.stats.steps += 1
        return await session.call(session.env.step, action)

    async def state(self, session: Session) -> Any:
        return await session.call(session.env.state)


def check_session_options(env_class: EnvClass, options: dict[str, Any]) -> None:
    """Raise VALIDATION_ERROR naming every option a client may not set on ``env_class``."""
    refused = [name for name in options if name not in env_class.session_options]
    if refused:
        allowed = ", ".join(sorted(env_class.session_options)) or "none"
        named = ", ".join(repr(name[:100]) for name in refused[:MAX_NAMED])
        if len(refused) > MAX_NAMED:
            named += f" and {len(refused) - MAX_NAMED} more"
        raise ServerError(
            ErrorCode.VALIDATION_ERROR,
            f"{env_class.name} does not let a client set {named} (only the server's operator can); "
            f"options a session may set: {allowed}",
        )


def coded(exc: BaseException, code: ErrorCode = ErrorCode.EXECUTION_ERROR, context: str = "") -> ServerError:
    """Any exception raised by an environment, as a coded error for the client."""
    if isinstance(exc, ServerError):
        return exc
    return ServerError(code, f"{context + ': ' if context else ''}{type(exc).__name__}: {exc}")
