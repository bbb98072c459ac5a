"""A conformance checker run over every registered environment, in process and over the mux."""

from __future__ import annotations

from typing import Any, Callable

import msgspec
import pytest

from envserver import envs
from envserver.env import Environment
from envserver.errors import ServerError
from envserver.protocol import (
    OBSERVATION_TYPES,
    STATE_TYPES,
    ErrorCode,
    StepResult,
    json_decoder,
    json_encoder,
    json_schema,
    msgpack_decoder,
    msgpack_encoder,
)

# How to pick a valid action from an observation, per environment (raw wire form).
SAMPLE_ACTIONS: dict[str, Callable[[Any], Any]] = {
    "openspiel": lambda obs: {"action_id": obs["legal_actions"][0] if isinstance(obs, dict) else obs.legal_actions[0]},
    "echo": lambda obs: {"message": "conformance"},
}


def sample_action(name: str, observation: Any) -> Any:
    """A valid raw action for ``name``; environments not listed must accept their Action's defaults."""
    if name in SAMPLE_ACTIONS:
        return SAMPLE_ACTIONS[name](observation)
    return {}


def roundtrip(result: StepResult, observation_type: type) -> None:
    """Both codecs carry a step result and give the same values back."""
    as_type = StepResult[observation_type]  # type: ignore[valid-type]
    assert msgpack_decoder(as_type).decode(msgpack_encoder.encode(result)) == result
    as_json = json_encoder.encode(result)  # JSON tensors are flat lists: compare the values
    assert json_encoder.encode(json_decoder(as_type).decode(as_json)) == as_json


def check_env(env_class: type[Environment]) -> None:  # type: ignore[type-arg]
    """Gymnasium-style checks of one environment class."""
    name = env_class.name
    assert isinstance(name, str) and name and isinstance(env_class.description, str) and env_class.description
    for kind in (env_class.Action, env_class.Observation, env_class.State):
        assert issubclass(kind, msgspec.Struct), kind
        assert json_schema(kind)
    if name in OBSERVATION_TYPES:
        assert OBSERVATION_TYPES[name] is env_class.Observation and STATE_TYPES[name] is env_class.State

    env = env_class()
    try:
        first = env.reset(seed=123)
        assert isinstance(first, StepResult) and isinstance(first.observation, env_class.Observation)
        assert type(first.reward) is float and first.terminated is False and first.truncated is False
        assert isinstance(first.info, dict)
        roundtrip(first, env_class.Observation)
        assert isinstance(env.state(), env_class.State)
        msgspec.json.decode(json_encoder.encode(env.state()))

        # The same seed gives the same first observation.
        assert msgpack_encoder.encode(env.reset(seed=123).observation) == msgpack_encoder.encode(first.observation)

        # Bad actions are VALIDATION_ERRORs, not crashes.
        for bad in ("not an action", [1, 2], {"no_such_field": 1}):
            with pytest.raises(ServerError) as info:
                env.parse_action(bad)
            assert info.value.code == ErrorCode.VALIDATION_ERROR

        result, steps = first, 0
        while not (result.terminated or result.truncated) and steps < 5:
            action = env.parse_action(sample_action(name, result.observation))
            assert isinstance(action, env_class.Action)
            result = env.step(action)
            steps += 1
            assert isinstance(result, StepResult) and isinstance(result.observation, env_class.Observation)
            assert type(result.reward) is float and type(result.terminated) is bool and type(result.truncated) is bool
            roundtrip(result, env_class.Observation)
        state = env.state()
        assert isinstance(state, env_class.State)
        if hasattr(state, "step_count"):
            assert state.step_count == steps
        openenv = env.openenv_observation(result.observation)
        msgspec.json.decode(json_encoder.encode(openenv))
    finally:
        env.close()


@pytest.mark.parametrize("name", envs.names())
def test_registered_env_conforms(name: str) -> None:
    check_env(envs.load(name))


def test_unknown_env_is_not_found() -> None:
    with pytest.raises(ServerError) as info:
        envs.load("no_such_env")
    assert info.value.code == ErrorCode.NOT_FOUND


async def test_every_registered_env_over_the_mux(shared_server, mux_connect) -> None:
    serve_all = [arg for name in envs.names() for arg in ("--env", name)]
    mux = await mux_connect(shared_server(*serve_all))
    for sid, name in enumerate(envs.names()):
        assert await mux.one("open", sid, name) == {"sid": sid, "env": name}
        body = await mux.one("reset", sid, 1)
        assert set(body) == {"observation", "reward", "terminated", "truncated", "info"}
        body = await mux.one("step", sid, sample_action(name, body["observation"]))
        assert isinstance(body["reward"], float)
        state = await mux.one("state", sid)
        assert state.get("step_count", 1) == 1
        await mux.one("close", sid)
