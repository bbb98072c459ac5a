"""Exceptions raised by the rollout client.

    EnvError                     any envfleet client error; carries code, env, server, request
    ├── ServerReplyError         the server answered with a coded error
    │   ├── InvalidAction        the action is not legal now, or malformed
    │   ├── EpisodeOver          step without a running episode
    │   ├── CapacityReached      the server refused a new session
    │   ├── UnknownSession       the session was closed or expired on the server
    │   └── Unauthorized         missing or wrong token
    ├── EnvCrashed               the connection to the server died with the call in flight
    │   └── ProtocolError        the server broke the mux protocol (short reply, unknown request id)
    ├── RequestTimeout           no answer within the deadline
    ├── UnencodableAction        an action, seed or option msgpack cannot carry (also a TypeError)
    ├── RequestTooLarge          the request exceeds the server's frame limit (also a ValueError)
    ├── FleetError               a backend could not start, replace or stop servers
    ├── PoolClosed               the pool (or client) is closed
    └── EvalError                an evaluation job cannot start or go on (output file, policy)
        └── PolicyFailed         the policy raised or chose an illegal action; names the episode
"""

from __future__ import annotations

from typing import Any


class EnvError(Exception):
    """Base class of every envfleet client error."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        env: Any = None,
        server: str | None = None,
        request: int | str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.env = env
        self.server = server
        self.request = request

    def __str__(self) -> str:
        where = [f"{k}={v}" for k, v in (("env", self.env), ("server", self.server), ("request", self.request)) if v is not None]
        return f"{self.message} [{', '.join(where)}]" if where else self.message


class ServerReplyError(EnvError):
    """The server answered the request with a coded error."""


class InvalidAction(ServerReplyError):
    """The action is malformed or not legal in the current state."""


class EpisodeOver(ServerReplyError):
    """A step was sent with no episode running (call reset)."""


class CapacityReached(ServerReplyError):
    """The server refused a new session because it is at its cap."""


class UnknownSession(ServerReplyError):
    """The server does not know the session (closed, or freed after its idle TTL)."""


class Unauthorized(ServerReplyError):
    """The server requires a token the client did not send."""


class EnvCrashed(EnvError):
    """The server or its connection died while the call was in flight."""


class ProtocolError(EnvCrashed):
    """The server broke the mux protocol; the connection is dropped (the pool replaces the server)."""


class RequestTimeout(EnvError):
    """The server did not answer within the request deadline."""


class UnencodableAction(EnvError, TypeError):
    """An action, seed or option that msgpack cannot carry; refused before sending, the connection stays up."""


class RequestTooLarge(EnvError, ValueError):
    """The request does not fit the server's frame limit; refused (by the client, or the server) alone."""


class FleetError(EnvError):
    """A fleet backend could not start, replace or stop its servers."""


class PoolClosed(EnvError):
    """The pool or client was used after it was closed."""


class EvalError(EnvError):
    """An evaluation job cannot start or go on: its output file or its policy is unusable."""


class PolicyFailed(EvalError):
    """The policy raised, or chose an illegal action, in episode ``episode``."""

    def __init__(self, message: str, *, episode: int | None = None, **where: Any) -> None:
        super().__init__(message, **where)
        self.episode = episode


_BY_CODE: dict[str, type[EnvError]] = {
    "INVALID_ACTION": InvalidAction,
    "VALIDATION_ERROR": InvalidAction,
    "EPISODE_OVER": EpisodeOver,
    "CAPACITY_REACHED": CapacityReached,
    "UNKNOWN_SESSION": UnknownSession,
    "UNAUTHORIZED": Unauthorized,
    "FRAME_TOO_LARGE": RequestTooLarge,
}


def from_reply(code: str, message: str, **where: Any) -> EnvError:
    """The exception for a coded error reply."""
    if code == "UNKNOWN_SESSION":
        message += " (an EnvPool env re-opens it on its next reset)"
    return _BY_CODE.get(code, ServerReplyError)(f"{code}: {message}", code=code, **where)
