"""The OpenSpiel environment's wire types, apart from the environment so clients can import them without pyspiel."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ..protocol import Tensor


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
    info_state: Tensor | None  # information-state tensor, or observation tensor where that is all; None if not asked for
    text: str | None  # the game's observation string (or state string) for the agent; None if not asked for
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
