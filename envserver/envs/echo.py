"""The echo environment: returns each message it is sent; for tests and benchmarks."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from ..env import Environment
from ..errors import ServerError
from ..protocol import ErrorCode, StepResult


class EchoAction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    message: str = ""


class EchoObservation(msgspec.Struct, gc=False):
    echoed_message: str
    message_length: int


class EchoState(msgspec.Struct, gc=False):
    episode_id: str | None
    step_count: int


class EchoEnv(Environment[EchoAction, EchoObservation, EchoState]):
    name = "echo"
    description = "Echoes each message back; reward is 0.1 per character."
    Action = EchoAction
    Observation = EchoObservation
    State = EchoState
    tools = {"echo_message": "Echo a message back."}
    session_options = frozenset[str]()  # nothing to choose

    def __init__(self, **options: Any) -> None:
        self._episode_id: str | None = None
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[EchoObservation]:
        self._episode_id = str(uuid.uuid4())
        self._steps = 0
        return StepResult(EchoObservation("", 0))

    def step(self, action: EchoAction) -> StepResult[EchoObservation]:
        self._steps += 1
        text = action.message
        return StepResult(EchoObservation(text, len(text)), reward=0.1 * len(text))

    def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        message = arguments.get("message", "")
        if not isinstance(message, str):
            raise ServerError(ErrorCode.VALIDATION_ERROR, "message must be a string")
        return {"echoed_message": message}

    def state(self) -> EchoState:
        return EchoState(self._episode_id, self._steps)
