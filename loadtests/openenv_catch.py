"""OpenSpiel catch as an OpenEnv environment, served by OpenEnv's own app factory under uvicorn.

The baseline of ``openenv_compare.py``: OpenEnv's OpenSpiel environment is not on PyPI,
so this is a small one written against ``openenv.core.env_server.Environment`` with
OpenEnv-shaped pydantic models (``action_id``; ``info_state``, ``legal_actions``,
``game_phase``, ``current_player_id``, ``opponent_last_action``).

usage: python loadtests/openenv_catch.py [--host 127.0.0.1] [--port 0]

Prints ``openenv-catch listening on http://HOST:PORT`` once the socket is bound, and
exits when its standard input closes (so it never outlives the driver).
``MAX_CONCURRENT_ENVS`` (default 8, as in OpenEnv's own server apps) caps the sessions.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import uuid
from typing import Any

import pyspiel
from openenv.core.env_server import Action, Environment, Observation, State, create_app
from pydantic import Field


class CatchAction(Action):
    """One move of the agent: 0, 1, 2 = left, stay, right."""

    action_id: int = Field(description="OpenSpiel action id")
    game_name: str = Field(default="catch", description="Game the action is meant for")
    game_params: dict[str, Any] = Field(default_factory=dict)


class CatchObservation(Observation):
    """What the agent sees after reset or step."""

    info_state: list[float] = Field(default_factory=list, description="Observation tensor of the agent")
    legal_actions: list[int] = Field(default_factory=list)
    game_phase: str = Field(default="initial", description="initial, playing or terminal")
    current_player_id: int = 0
    opponent_last_action: int | None = None


class CatchState(State):
    game_name: str = "catch"
    agent_player: int = 0
    opponent_policy: str = "random"
    game_params: dict[str, Any] = Field(default_factory=dict)
    num_players: int = 1


class CatchEnvironment(Environment[CatchAction, CatchObservation, CatchState]):
    """pyspiel catch, one game per instance; chance outcomes drawn from a per-instance RNG."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # no state shared between instances

    def __init__(self) -> None:
        super().__init__()
        self._game = pyspiel.load_game("catch")
        self._use_info_state = self._game.get_type().provides_information_state_tensor
        self._rng = random.Random()
        self._state = CatchState()
        self._spiel = self._game.new_initial_state()

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> CatchObservation:
        if seed is not None:
            self._rng.seed(seed)
        self._spiel = self._game.new_initial_state()
        self._advance_chance()
        self._state = CatchState(episode_id=episode_id or str(uuid.uuid4()), step_count=0)
        return self._observe("initial", reward=None)

    def step(self, action: CatchAction, timeout_s: float | None = None, **kwargs: Any) -> CatchObservation:
        if self._spiel.is_terminal():
            raise RuntimeError("episode is over; call reset()")
        self._spiel.apply_action(action.action_id)
        self._advance_chance()
        self._state.step_count += 1
        terminal = self._spiel.is_terminal()
        reward = float(self._spiel.returns()[0]) if terminal else 0.0
        return self._observe("terminal" if terminal else "playing", reward=reward)

    @property
    def state(self) -> CatchState:
        return self._state

    def _advance_chance(self) -> None:
        while self._spiel.is_chance_node():
            outcomes = self._spiel.chance_outcomes()
            actions = [a for a, _ in outcomes]
            weights = [p for _, p in outcomes]
            self._spiel.apply_action(self._rng.choices(actions, weights)[0])

    def _observe(self, phase: str, reward: float | None) -> CatchObservation:
        spiel = self._spiel
        terminal = spiel.is_terminal()
        tensor = spiel.information_state_tensor(0) if self._use_info_state else spiel.observation_tensor(0)
        return CatchObservation(
            info_state=list(tensor),
            legal_actions=[] if terminal else list(spiel.legal_actions()),
            game_phase=phase,
            current_player_id=int(spiel.current_player()),
            done=terminal,
            reward=reward,
        )


def build_app() -> Any:
    """OpenEnv's FastAPI app serving catch, capped at ``MAX_CONCURRENT_ENVS`` sessions."""
    return create_app(
        CatchEnvironment,
        CatchAction,
        CatchObservation,
        env_name="openspiel_catch",
        max_concurrent_envs=int(os.getenv("MAX_CONCURRENT_ENVS", "8")),
    )


def _exit_with_stdin() -> None:
    """Exit the process when the parent closes our standard input (or dies)."""
    sys.stdin.buffer.read()
    os._exit(0)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    threading.Thread(target=_exit_with_stdin, daemon=True).start()
    # uvicorn's defaults, as OpenEnv's images run it: uvloop and the websockets library when installed
    server = uvicorn.Server(uvicorn.Config(build_app(), log_level="warning"))
    print(f"openenv-catch listening on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
