"""The environment API every envserver environment implements (Gymnasium-shaped)."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from .errors import ServerError
from .protocol import ErrorCode, StepResult, convert, flat_tensors

if TYPE_CHECKING:
    from .columns import ColumnBatch, ColumnSpec

A = TypeVar("A")
O = TypeVar("O")
S = TypeVar("S")


class Environment(abc.ABC, Generic[A, O, S]):
    """One episode-running instance, owned by one session.

    Subclasses declare their wire types (``Action``, ``Observation``, ``State``
    msgspec Structs), a ``name`` and a ``description``. ``blocking = True`` makes
    the server call them in a worker thread instead of on the event loop.
    ``session_options`` names the options a client may set per session (in ``open`` and
    ``reset``); the server refuses any other, which only its operator may set.
    Errors meant for the client are raised as ``ServerError`` with a code.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Action: ClassVar[type]
    Observation: ClassVar[type]
    State: ClassVar[type]
    blocking: ClassVar[bool] = False
    session_options: ClassVar[frozenset[str]] = frozenset()  # client-settable options; the rest is the operator's
    tools: ClassVar[dict[str, str]] = {}  # MCP tools this environment offers: name -> description

    @abc.abstractmethod
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[O]:
        """Start a new episode; the same seed gives the same episode."""

    @abc.abstractmethod
    def step(self, action: A) -> StepResult[O]:
        """Apply one action of the agent."""

    @abc.abstractmethod
    def state(self) -> S:
        """Describe the episode (ids, counters, configuration)."""

    def close(self) -> None:
        """Release what the environment holds; called once when its session ends."""

    @classmethod
    def parse_action(cls, raw: Any) -> A:
        """Validate a decoded action payload into ``Action``."""
        try:
            action: A = convert(raw, cls.Action)
        except Exception as exc:  # msgspec.ValidationError and friends
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad action for {cls.name}: {exc}") from exc
        return action

    def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run one of ``tools`` (only called for names listed there)."""
        raise ServerError(ErrorCode.NOT_FOUND, f"{self.name} has no tool {name!r}")

    def openenv_observation(self, observation: O) -> Any:
        """The observation as OpenEnv clients expect it (by default: tensors as flat lists)."""
        return flat_tensors(observation)

    # -- columnar batches (``vstep``/``vreset`` on the mux); see envserver/columns.py

    def column_spec(self) -> ColumnSpec | None:
        """The observation shape and discrete action count of this env's batch rows (None: learn the shape, no mask)."""
        return None

    @classmethod
    def write_batch(cls, envs: Sequence[Any], actions: Sequence[int], batch: ColumnBatch, resets: Mapping[int, int | None]) -> None:
        """Reset ``envs[i]`` with seed ``resets[i]`` where given, else step it with ``actions[i]``; write row i of ``batch``.

        This generic version steps through the typed API; environments override it to write rows in place.
        A row that raises is recorded with ``batch.fail`` and the others go on.
        """
        for row, env in enumerate(envs):
            try:
                if row in resets:
                    batch.put(row, env.reset(seed=resets[row]))
                else:
                    batch.put(row, env.step(env.parse_action(actions[row])))
            except Exception as exc:
                batch.fail(row, exc)
