"""Environments written against OpenEnv's API, as OpenEnv authors write them, for the adapter tests.

``NotesEnvironment`` offers MCP tools (a FastMCP server, as OpenEnv's MCP environments do);
``SingleSessionEnvironment`` keeps OpenEnv's default ``SUPPORTS_CONCURRENT_SESSIONS = False``.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastmcp import FastMCP
from openenv.core.env_server import Action, Environment, MCPEnvironment, Observation, State


class NotesObservation(Observation):
    """The notes written so far."""

    notes: list[str] = []


class NotesEnvironment(MCPEnvironment):
    """A notebook the agent writes to with MCP tools; step with a tool call."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        mcp = FastMCP("notes")
        self._notes: list[str] = []

        @mcp.tool
        def add_note(text: str) -> dict[str, int]:
            """Append a note; returns how many notes there are."""
            if text == "boom":
                raise ValueError("notes cannot say boom")
            self._notes.append(text)
            return {"count": len(self._notes)}

        @mcp.tool
        def read_notes() -> dict[str, list[str]]:
            """Every note written in this episode."""
            return {"notes": list(self._notes)}

        super().__init__(mcp)
        self._state = State(episode_id=None, step_count=0)

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> NotesObservation:
        self._notes.clear()
        self._state = State(episode_id=episode_id or str(uuid.uuid4()), step_count=0)
        return NotesObservation(notes=[])

    def _step_impl(self, action: Action, timeout_s: float | None = None, **kwargs: Any) -> Observation:
        self._state.step_count += 1
        return NotesObservation(notes=list(self._notes), done=len(self._notes) >= 3, reward=float(len(self._notes)))

    @property
    def state(self) -> State:
        return self._state


class CounterAction(Action):
    amount: int = 1


class CounterObservation(Observation):
    total: int = 0


class SingleSessionEnvironment(Environment[CounterAction, CounterObservation, State]):
    """A counter that, like most OpenEnv environments by default, allows one session per server."""

    def __init__(self) -> None:
        super().__init__()
        self._state = State(episode_id=None, step_count=0)
        self._total = 0

    def reset(self) -> CounterObservation:  # takes no seed: envserver must not pass one
        self._total = 0
        self._state = State(episode_id=str(uuid.uuid4()), step_count=0)
        return CounterObservation(total=0)

    def step(self, action: CounterAction, timeout_s: float | None = None, **kwargs: Any) -> CounterObservation:
        self._total += action.amount
        self._state.step_count += 1
        return CounterObservation(total=self._total, reward=float(action.amount), done=self._total >= 5)

    @property
    def state(self) -> State:
        return self._state


class BrokenToolsEnvironment(MCPEnvironment):
    """An MCP environment whose constructor fails: the server must say so at start, in one line."""

    def __init__(self) -> None:
        raise OSError("the tool backend is unreachable")

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> Observation:
        raise NotImplementedError

    def _step_impl(self, action: Action, timeout_s: float | None = None, **kwargs: Any) -> Observation:
        raise NotImplementedError

    @property
    def state(self) -> State:
        raise NotImplementedError
