"""The wire contract of envserver: every message of both surfaces, their codecs and error codes.

This module imports only msgspec and the standard library, so clients (``rollout``)
can depend on it without pulling in the server.

Two surfaces share these types:

* OpenEnv-compatible JSON (HTTP routes and ``WS /ws``): ``WsMessage`` frames
  ``{"type": ..., "data": {...}}``; tensors are plain lists of floats.
* The fast mux (``WS /v1/mux``): one binary msgpack frame is a list of requests,
  each a tagged array ``[op, id, sid, ...]``, or ``[op, id, sids, ...]`` for the
  many-session ops ``steps`` and ``resets``; the reply frame is a list of
  ``[id, ok, result | error]``. Tensors travel as ``[shape, bytes, dtype]``.
"""

from __future__ import annotations

import enum
from array import array
from typing import Any, Generic, Literal, TypeVar

import msgspec

# --------------------------------------------------------------------------- errors


class ErrorCode(enum.StrEnum):
    """Every error either surface can report, with its HTTP status."""

    INVALID_JSON = "INVALID_JSON"  # unparsable JSON / msgpack
    UNKNOWN_TYPE = "UNKNOWN_TYPE"  # unknown message type or op
    VALIDATION_ERROR = "VALIDATION_ERROR"  # well-formed but wrong fields or types
    INVALID_ACTION = "INVALID_ACTION"  # action not legal in the current state
    EPISODE_OVER = "EPISODE_OVER"  # step without a running episode
    EXECUTION_ERROR = "EXECUTION_ERROR"  # the environment raised
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # no such session (never opened, closed, or expired)
    SESSION_EXISTS = "SESSION_EXISTS"  # open of a session id already in use
    CAPACITY_REACHED = "CAPACITY_REACHED"  # the server's session cap is reached
    FACTORY_ERROR = "FACTORY_ERROR"  # the environment could not be created
    SESSION_ERROR = "SESSION_ERROR"  # any other failure that ends a session
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"  # frame or body over the configured limit
    UNAUTHORIZED = "UNAUTHORIZED"  # missing or wrong bearer token
    NOT_FOUND = "NOT_FOUND"  # unknown route or environment
    FORBIDDEN = "FORBIDDEN"  # an environment this server does not serve, or a foreign Origin

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self, 400)

    @property
    def ends_session(self) -> bool:
        """On ``WS /ws``, whether this error closes the socket (OpenEnv's rule)."""
        return self in (ErrorCode.CAPACITY_REACHED, ErrorCode.FACTORY_ERROR, ErrorCode.SESSION_ERROR)


_HTTP_STATUS = {
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.INVALID_ACTION: 422,
    ErrorCode.EPISODE_OVER: 409,
    ErrorCode.EXECUTION_ERROR: 500,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.SESSION_EXISTS: 409,
    ErrorCode.CAPACITY_REACHED: 503,
    ErrorCode.FACTORY_ERROR: 400,
    ErrorCode.SESSION_ERROR: 500,
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FORBIDDEN: 403,
}


class ErrorInfo(msgspec.Struct, gc=False, omit_defaults=True):
    """A coded error as sent on the wire."""

    code: ErrorCode
    message: str


# --------------------------------------------------------------------------- tensors


class Tensor(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A dense array: its shape, the raw little-endian values, and their dtype.

    On the mux it travels as ``[shape, bytes, dtype]``, which msgspec decodes with no
    Python call per tensor; the OpenEnv JSON surface sends the values as a flat list of
    numbers instead (``flat_tensors``).
    """

    shape: tuple[int, ...]
    data: bytes
    dtype: Literal["float32", "uint8"] = "float32"

    def tolist(self) -> list[float]:
        """The flat values as Python numbers."""
        values: array[Any] = array(_TYPECODES[self.dtype])
        values.frombytes(self.data)
        return values.tolist()

    def numpy(self) -> Any:
        """The values as a numpy array of ``shape`` (imports numpy on first use)."""
        import numpy as np

        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype!r})"


_TYPECODES = {"float32": "f", "uint8": "B"}


def flat_tensors(obj: Any) -> Any:
    """A struct as the JSON surface sends it: a dict whose tensors are flat lists of numbers."""
    fields = msgspec.structs.asdict(obj)
    for name, value in fields.items():
        if type(value) is Tensor:
            fields[name] = value.tolist()
    return fields


# --------------------------------------------------------------------------- environment payloads

Obs = TypeVar("Obs")


class StepResult(msgspec.Struct, Generic[Obs], gc=False):
    """What ``reset`` and ``step`` return (Gymnasium's five values, observation first)."""

    observation: Obs
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated



# --------------------------------------------------------------------------- mux: WS /v1/mux


class _Request(msgspec.Struct, array_like=True, tag_field="op", forbid_unknown_fields=True, gc=False):
    id: int


class _MuxRequest(_Request):
    sid: int


class Open(_MuxRequest, tag="open"):
    """Open session ``sid`` on this connection (the client picks sids)."""

    env: str | None = None  # None: the server's default environment
    options: dict[str, Any] = {}


class Reset(_MuxRequest, tag="reset"):
    seed: int | None = None
    options: dict[str, Any] | None = None


class Step(_MuxRequest, tag="step"):
    action: Any = None


class GetState(_MuxRequest, tag="state"):
    pass


class Close(_MuxRequest, tag="close"):
    pass


class Ping(_MuxRequest, tag="ping"):
    pass


class StepMany(_Request, tag="steps"):
    """Step many sessions in one request: ``actions[i]`` for ``sids[i]``; the reply body is a ``Batch``."""

    sids: list[int]
    actions: list[Any]


class ResetMany(_Request, tag="resets"):
    """Reset many sessions in one request: ``seeds[i]`` for ``sids[i]``; the reply body is a ``Batch``."""

    sids: list[int]
    seeds: list[int | None]
    options: dict[str, Any] | None = None


# ---- columnar batches (``vstep``/``vreset``): k sessions in, packed arrays out

AutoReset = Literal["next_step", "same_step", "disabled"]


class VecStep(_Request, tag="vstep"):
    """Step k sessions with discrete actions; the reply body is ``Columns``.

    ``actions`` holds k little-endian int64 values. ``autoreset`` follows Gymnasium 1.x:
    ``next_step`` resets a session that ended on the previous step (its action is
    ignored), ``same_step`` resets it in the step that ended it (the last observation goes
    to ``Columns.final_obs``), ``disabled`` never resets. Episode e of a session reset with
    base seed b is seeded ``episode_seed(b, e)``.
    """

    sids: list[int]
    actions: bytes
    autoreset: AutoReset = "next_step"
    text: bool = False  # also send each session's text rendering


class VecReset(_Request, tag="vreset"):
    """Reset k sessions: ``seeds[i]`` is session i's base seed (None: unseeded); the reply body is ``Columns``.

    ``episodes[i]`` (default 0) is the index of the episode to start, so a client that
    lost a server can resume a session's seed sequence on the replacement.
    """

    sids: list[int]
    seeds: list[int | None]
    episodes: list[int] | None = None
    text: bool = False


MuxRequest = Open | Reset | Step | GetState | Close | Ping | StepMany | ResetMany | VecStep | VecReset
OPS = ("open", "reset", "step", "state", "close", "ping", "steps", "resets", "vstep", "vreset")


class Columns(msgspec.Struct, array_like=True, gc=False):
    """The body of a ``vstep``/``vreset`` reply: little-endian arrays over the request's k sessions.

    Row i belongs to ``sids[i]``. A failed row (see ``failures``) is zeros. ``mask`` is the
    legal-action mask (one byte per action, 1 = legal) of environments with discrete
    actions; ``final_obs`` (``same_step`` only, when a row ended) holds the last observation
    of each row that ended in this step and was reset (read only those rows).
    """

    obs_shape: tuple[int, ...]
    obs: bytes  # float32 [k, *obs_shape]
    reward: bytes  # float64 [k]
    terminated: bytes  # uint8 [k]
    truncated: bytes  # uint8 [k]
    num_actions: int = 0  # 0: no discrete actions, no mask
    mask: bytes = b""  # uint8 [k, num_actions]
    failures: dict[int, ErrorInfo] = {}  # row -> why it failed
    final_obs: bytes = b""  # float32 [k, *obs_shape], same_step only, when a row ended
    text: list[str] | None = None


def episode_seed(seed: int, episode: int) -> int:
    """The seed of episode ``episode`` of a run (or session) seeded ``seed`` (SplitMix64 of both)."""
    z = (seed * 0x9E3779B97F4A7C15 + (episode + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: fits every seed type downstream


# ---- end columnar batches

T = TypeVar("T")


class Batch(msgspec.Struct, Generic[T], array_like=True, gc=False):
    """The body of a ``StepMany``/``ResetMany`` reply: ``results[i]`` for ``sids[i]``, None where it failed."""

    results: list[T | None]
    failures: dict[int, ErrorInfo] = {}  # index in ``sids`` -> why it failed


class Reply(msgspec.Struct, array_like=True, gc=False):
    """One answer in a reply frame: ``body`` is the result when ``ok``, else an ``ErrorInfo``."""

    id: int
    ok: bool
    body: Any = None


class RawReply(msgspec.Struct, array_like=True, gc=False):
    """A reply whose body is left undecoded until the caller knows its type."""

    id: int
    ok: bool
    body: msgspec.Raw = msgspec.Raw(b"\xc0")


class OpenResult(msgspec.Struct, gc=False):
    sid: int
    env: str


# --------------------------------------------------------------------------- OpenEnv surface


class WsMessage(msgspec.Struct, forbid_unknown_fields=True):
    """A frame on OpenEnv's ``WS /ws``: ``type`` is reset, step, state, close or mcp."""

    type: str
    data: dict[str, Any] = {}


class OpenEnvResult(msgspec.Struct, omit_defaults=False):
    """OpenEnv's reply to reset/step: reward and done lifted out of the observation."""

    observation: Any
    reward: float | None
    done: bool


class HttpStepRequest(msgspec.Struct):
    action: dict[str, Any] | int
    timeout_s: float | None = None
    request_id: str | None = None


class HttpResetRequest(msgspec.Struct):
    seed: int | None = None
    episode_id: str | None = None
    options: dict[str, Any] | None = None


class Metadata(msgspec.Struct):
    name: str
    description: str
    version: str
    env: str
    surfaces: list[str]
    # Where the environment's classes live (``module:QualName``): a client that can import the
    # types decodes into them; otherwise it decodes generic data guided by ``/schema``.
    env_class: str | None = None
    observation_type: str | None = None
    state_type: str | None = None


class HealthStatus(msgspec.Struct):
    status: str = "healthy"


# --------------------------------------------------------------------------- codecs

msgpack_encoder = msgspec.msgpack.Encoder()
json_encoder = msgspec.json.Encoder()
mux_request_decoder = msgspec.msgpack.Decoder(list[MuxRequest])
mux_reply_decoder = msgspec.msgpack.Decoder(list[RawReply])
ws_message_decoder = msgspec.json.Decoder(WsMessage)


def msgpack_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type_)


def json_decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


# How the JSON surface describes a tensor; clients find tensor fields in /schema by it.
FLAT_TENSOR_SCHEMA = {"type": "array", "items": {"type": "number"}, "description": "tensor values, flattened"}


def json_schemas(types: tuple[Any, ...], ref_template: str = "#/$defs/{name}") -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """JSON Schemas of ``types`` and their shared components, as the JSON surface sends them (flat tensors)."""
    schemas, components = msgspec.json.schema_components(types, ref_template=ref_template)
    if "Tensor" in components:
        components["Tensor"] = FLAT_TENSOR_SCHEMA
    return schemas, components


def json_schema(type_: Any) -> dict[str, Any]:
    (schema,), components = json_schemas((type_,))
    if components:
        schema["$defs"] = components
    return schema


def convert(obj: Any, type_: Any) -> Any:
    """Validate builtins into ``type_`` (strict: no silent str -> int)."""
    return msgspec.convert(obj, type_)
