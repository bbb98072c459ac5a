"""Every registered environment passes ``envserver.testing.check_environment``; the checker catches what breaks the contract."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from envserver import envs
from envserver.env import Environment
from envserver.errors import ServerError
from envserver.protocol import ErrorCode, StepResult, Tensor
from envserver.testing import ConformanceError, check_environment

# How each built-in environment is checked: options, a valid action, and illegal ones.
CHECKS: dict[str, dict[str, Any]] = {
    "openspiel": {
        "game": "catch",
        "sample_action": lambda obs: {"action_id": obs.legal_actions[0]},
        "bad_actions": [{"action_id": 999}, {"action_id": -1}],
    },
    "echo": {"sample_action": lambda obs: {"message": "conformance"}, "step_limit": 20},
    "python_sandbox": {"max_steps": 2, "task": "fizzbuzz", "sample_action": lambda obs: {"code": "x = 1"}, "volatile": ["wall_time"]},
}


def loadable() -> list[str]:
    return [row.name for row in envs.describe() if row.error is None]


@pytest.mark.parametrize("name", loadable())
def test_registered_env_conforms(name: str) -> None:
    check_environment(envs.load(name), **CHECKS.get(name, {}))


def test_openspiel_games_with_more_seats_conform() -> None:
    for game in ("tic_tac_toe", "kuhn_poker"):
        report = check_environment(envs.load("openspiel"), **{**CHECKS["openspiel"], "game": game})
        assert report.episode_ended and not report.skipped


def test_step_after_the_end_is_checked_when_an_episode_ends() -> None:
    report = check_environment(envs.load("openspiel"), **CHECKS["openspiel"])
    assert report.episode_ended and report.steps >= 1 and report.skipped == []
    echo = check_environment(envs.load("echo"), **CHECKS["echo"])
    assert not echo.episode_ended and "step after the end" in echo.skipped[0]


# ---- an environment that breaks every rule once; the checker must name each


class BrokenAction(msgspec.Struct):
    move: int = 0


class BrokenObservation(msgspec.Struct):
    board: Tensor
    count: int
    score: float


class BrokenState(msgspec.Struct):
    count: int


_held: list[Any] = []


class BrokenEnv(Environment[BrokenAction, BrokenObservation, BrokenState]):
    name = "broken"
    description = "Breaks the contract on purpose."
    Action = BrokenAction
    Observation = BrokenObservation
    State = BrokenState

    def __init__(self, **options: Any) -> None:
        self.count = 0
        import random

        self.rng = random.Random()  # ignores the seed: trajectories differ

    def _obs(self) -> BrokenObservation:
        board = Tensor((2,), bytes(8), "float32")
        return BrokenObservation(board, self.count, float("nan") if self.count == 2 else self.rng.random())

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[BrokenObservation]:
        self.count = 0
        return StepResult(self._obs())

    def step(self, action: BrokenAction) -> StepResult[BrokenObservation]:
        self.count += 1  # never refuses anything, even after the end
        if action.move == 7:
            raise KeyError("seven")
        return StepResult(self._obs(), reward=1, terminated=self.count >= 3)  # an int reward

    def state(self) -> BrokenState:
        return BrokenState(self.count)

    def close(self) -> None:
        import os

        _held.append(os.open("/dev/null", os.O_RDONLY))  # close opens a file it never closes


def test_the_checker_reports_every_broken_rule_at_once() -> None:
    import os

    try:
        with pytest.raises(ConformanceError) as info:
            check_environment(BrokenEnv, bad_actions=[{"move": 7}])
    finally:
        while _held:
            os.close(_held.pop())
    failures = "\n".join(info.value.failures)
    assert "reward must be a float" in failures
    assert "different the reset" in failures or "different step" in failures
    assert "does not round-trip" in failures or "comes back different" in failures
    assert "raised KeyError" in failures  # the bad action crashed instead of being refused
    assert "was accepted" in failures  # {"no_such_field...": 1}: BrokenAction does not forbid unknown fields
    assert "a step after the end was accepted" in failures
    assert "close() does not release" in failures and "file descriptors" in failures
    assert len(info.value.failures) >= 6
    assert str(info.value).startswith("broken fails ")


def test_declarations_are_checked_before_anything_runs() -> None:
    class NoTypes(BrokenEnv):
        name = ""
        Observation = dict  # type: ignore[assignment]

    with pytest.raises(ConformanceError) as info:
        check_environment(NoTypes)
    assert any("name must be a non-empty string" in f for f in info.value.failures)
    assert any("Observation must be a msgspec.Struct subclass" in f for f in info.value.failures)


def test_unknown_env_is_not_found() -> None:
    with pytest.raises(ServerError) as info:
        envs.load("no_such_env")
    assert info.value.code == ErrorCode.NOT_FOUND


async def test_every_registered_env_over_the_mux(shared_server, mux_connect) -> None:
    serve_all = [arg for name in loadable() for arg in ("--env", name)]
    mux = await mux_connect(shared_server(*serve_all))
    for sid, name in enumerate(loadable()):
        assert await mux.one("open", sid, name) == {"sid": sid, "env": name}
        body = await mux.one("reset", sid, 1)
        assert set(body) == {"observation", "reward", "terminated", "truncated", "info"}
        if name in CHECKS:
            action = msgspec.to_builtins(CHECKS[name]["sample_action"](msgspec.convert(body["observation"], envs.load(name).Observation)))
            body = await mux.one("step", sid, action)
            assert isinstance(body["reward"], float)
            state = await mux.one("state", sid)
            assert state.get("step_count", 1) == 1
        await mux.one("close", sid)


class SchemaLiarEnv(envs.load("echo")):  # type: ignore[misc]
    """An echo whose OpenEnv JSON observation is not what its schema says."""

    name = "schema_liar"

    def openenv_observation(self, observation: Any) -> Any:
        return {"echoed_message": 42}


def test_an_observation_that_breaks_its_own_schema_is_reported() -> None:
    with pytest.raises(ConformanceError) as info:
        check_environment(SchemaLiarEnv, **CHECKS["echo"])
    assert [f for f in info.value.failures if "does not match its own JSON Schema" in f], info.value.failures
