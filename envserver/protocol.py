"""The wire contract of envserver: every message of both surfaces, their codecs and error codes.

This module imports only msgspec and the standard library, so clients (``rollout``)
can depend on it without pulling in the server.

Two surfaces share these types:

* OpenEnv-compatible JSON (HTTP routes and ``WS /ws``): ``WsMessage`` frames
  ``{"type": ..., "data": {...}}``; tensors are plain lists of floats.
* The fast mux (``WS /v1/mux``): one binary msgpack frame is a list of requests,
  each a tagged array ``[op, id, sid, ...]``, or ``[op, id, sids, ...]`` for the
  many-session ops ``steps`` and ``resets``; the reply frame is a list of
  ``[id, ok, result | error]``. Tensors travel as packed bytes (msgpack ext 1).
"""

from __future__ import annotations

import enum
import struct
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
}


class ErrorInfo(msgspec.Struct, gc=False, omit_defaults=True):
    """A coded error as sent on the wire."""

    code: ErrorCode
    message: str


# --------------------------------------------------------------------------- tensors


class Tensor:
    """A dense array: shape, dtype ('float32' or 'uint8') and the raw little-endian bytes.

    Built on the server from a list of floats; packed to bytes only when sent on the
    mux, rendered as a list of floats in JSON. Clients get it back lazily:
    ``tolist()`` or ``numpy()`` decode on first use.
    """

    __slots__ = ("shape", "dtype", "_data", "_values")

    _CODES = {"float32": "f", "uint8": "B"}

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str = "float32",
        *,
        data: bytes | None = None,
        values: list[float] | None = None,
    ) -> None:
        if dtype not in self._CODES:
            raise ValueError(f"unsupported tensor dtype {dtype!r}")
        self.shape = tuple(shape)
        self.dtype = dtype
        self._data = data
        self._values = values

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = array(self._CODES[self.dtype], self._values or ()).tobytes()
        return self._data

    def tolist(self) -> list[float]:
        """The flat values as Python numbers."""
        if self._values is None:
            values = array(self._CODES[self.dtype])
            values.frombytes(self.data)
            self._values = [float(v) for v in values]
        return self._values

    def numpy(self) -> Any:
        """The values as a numpy array of ``shape`` (imports numpy on first use)."""
        import numpy as np

        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)

    def to_ext(self) -> msgspec.msgpack.Ext:
        key = (self.dtype, self.shape)
        header = _EXT_HEADERS.get(key)
        if header is None:
            dtype_index = list(self._CODES).index(self.dtype)
            header = struct.pack(f"<BB{len(self.shape)}I", dtype_index, len(self.shape), *self.shape)
            _EXT_HEADERS[key] = header
        return msgspec.msgpack.Ext(TENSOR_EXT, header + self.data)

    @classmethod
    def from_ext(cls, payload: memoryview | bytes) -> Tensor:
        end = 2 + 4 * payload[1]
        key = bytes(payload[:end])
        layout = _EXT_LAYOUTS.get(key)
        if layout is None:
            shape = struct.unpack_from(f"<{payload[1]}I", payload, 2)
            layout = _EXT_LAYOUTS[key] = (shape, list(cls._CODES)[payload[0]])
        tensor = cls.__new__(cls)  # trusted layout: skip __init__'s checks on the hot path
        tensor.shape, tensor.dtype = layout
        tensor._data, tensor._values = bytes(payload[end:]), None
        return tensor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tensor) and (self.shape, self.dtype, self.data) == (
            other.shape,
            other.dtype,
            other.data,
        )

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype!r})"


TENSOR_EXT = 1
_EXT_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_EXT_LAYOUTS: dict[bytes, tuple[tuple[int, ...], str]] = {}


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


class OpenSpielAction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Play ``action_id``; ``game_name``/``game_params`` are OpenEnv's fields, accepted and ignored."""

    action_id: int
    game_name: str | None = None
    game_params: dict[str, Any] | None = None


class OpenSpielObservation(msgspec.Struct, gc=False):
    """One OpenSpiel observation from the agent's seat (OpenEnv's field names plus envfleet's)."""

    legal_actions: list[int]
    current_player_id: int
    game_phase: Literal["initial", "playing", "terminal"]
    info_state: Tensor | None  # information-state tensor, or observation tensor where that is all
    text: str  # the game's observation string (or state string) for the agent
    rewards: list[float]  # every player's reward of the last transition
    returns: list[float]  # every player's return so far
    opponent_last_action: int | None = None
    legal_action_names: list[str] | None = None  # sent when the reset asked for names


class OpenSpielState(msgspec.Struct, gc=False):
    episode_id: str | None
    step_count: int
    game_name: str
    game_params: dict[str, Any]
    agent_player: int
    opponent_policy: str
    num_players: int
    seed: int | None = None
    history: list[int] = []


class EchoAction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    message: str = ""


class EchoObservation(msgspec.Struct, gc=False):
    echoed_message: str
    message_length: int


class EchoState(msgspec.Struct, gc=False):
    episode_id: str | None
    step_count: int


# ---- python sandbox (envserver/envs/python_sandbox.py)


class PythonAction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Python source to run in the session's interpreter, like one notebook cell."""

    code: str = ""


class PythonObservation(msgspec.Struct, gc=False):
    """What running one cell did; ``notice`` says in words which limit was hit and what it cost."""

    stdout: str = ""
    stderr: str = ""  # includes the traceback when the code raised
    exception_type: str | None = None
    exception_message: str | None = None
    exit_code: int | None = None  # the interpreter's exit status if it ended during the step (-N: signal N)
    wall_time: float = 0.0  # seconds
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    state_lost: bool = False  # the interpreter was replaced: earlier variables are gone
    execution_count: int = 0
    notice: str = ""
    prompt: str | None = None  # the task, on reset in task mode
    tests_passed: int | None = None  # task mode: hidden tests passing after this step
    tests_total: int | None = None


class PythonState(msgspec.Struct, gc=False):
    episode_id: str | None
    execution_count: int
    task: str | None = None
    max_steps: int | None = None
    restarts: int = 0  # interpreters replaced after a timeout, crash or limit in this episode
    seed: int | None = None


# ---- end python sandbox

# Observation and state types of the built-in environments, by env name (for typed clients).
OBSERVATION_TYPES: dict[str, type] = {
    "openspiel": OpenSpielObservation,
    "echo": EchoObservation,
    "python_sandbox": PythonObservation,
}
STATE_TYPES: dict[str, type] = {"openspiel": OpenSpielState, "echo": EchoState, "python_sandbox": PythonState}


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


MuxRequest = Open | Reset | Step | GetState | Close | Ping | StepMany | ResetMany
OPS = ("open", "reset", "step", "state", "close", "ping", "steps", "resets")

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


class HealthStatus(msgspec.Struct):
    status: str = "healthy"


class JsonRpcRequest(msgspec.Struct):
    jsonrpc: str
    method: str
    id: int | str | None = None
    params: dict[str, Any] = {}


# --------------------------------------------------------------------------- codecs


def _enc_msgpack(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.to_ext()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _enc_json(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _ext_msgpack(code: int, data: memoryview) -> Any:
    if code == TENSOR_EXT:
        return Tensor.from_ext(data)
    return msgspec.msgpack.Ext(code, bytes(data))


def _dec_hook(type_: type, obj: Any) -> Any:
    if type(obj) is Tensor:
        return obj
    if type_ is Tensor:
        if isinstance(obj, list):  # JSON: a flat list of numbers
            return Tensor((len(obj),), values=[float(v) for v in obj])
    raise NotImplementedError(f"cannot decode {type_!r}")


def schema_hook(type_: type) -> dict[str, Any]:
    if type_ is Tensor:
        return {"type": "array", "items": {"type": "number"}, "description": "flat tensor"}
    raise NotImplementedError


msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_msgpack)
json_encoder = msgspec.json.Encoder(enc_hook=_enc_json)
mux_request_decoder = msgspec.msgpack.Decoder(list[MuxRequest])
mux_reply_decoder = msgspec.msgpack.Decoder(list[RawReply])
ws_message_decoder = msgspec.json.Decoder(WsMessage)


def msgpack_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    """A msgpack decoder for ``type_`` that understands tensors."""
    return msgspec.msgpack.Decoder(type_, ext_hook=_ext_msgpack, dec_hook=_dec_hook)


def json_decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_, dec_hook=_dec_hook)


def json_schema(type_: Any) -> dict[str, Any]:
    return msgspec.json.schema(type_, schema_hook=schema_hook)


def convert(obj: Any, type_: Any) -> Any:
    """Validate builtins into ``type_`` (strict: no silent str -> int)."""
    return msgspec.convert(obj, type_, dec_hook=_dec_hook)
