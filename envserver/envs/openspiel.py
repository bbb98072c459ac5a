"""OpenSpiel games as environments: any game pyspiel can load, by name and parameters.

The client plays ``agent_player``; chance events and the other seats (played by a
built-in opponent policy) draw from one per-session RNG seeded by ``reset(seed=...)``,
so the same seed and the same actions replay the same trajectory.
"""

from __future__ import annotations

import functools
import itertools
import os
from array import array
from collections.abc import Mapping, Sequence
from typing import Any
from collections.abc import Callable

import msgspec
import pyspiel

from ..env import Environment
from ..errors import ServerError
from ..protocol import ErrorCode, StepResult, Tensor
from ..rng import SeededRandom
from ..surfaces.columns import ColumnBatch, ColumnSpec
from .openspiel_types import OpenSpielAction, OpenSpielObservation, OpenSpielState

Policy = Callable[[SeededRandom, list[int]], int]

OPPONENTS: dict[str, Policy] = {
    "random": lambda rng, legal: rng.pick(legal),
    "first_legal": lambda rng, legal: legal[0],
    "last_legal": lambda rng, legal: legal[-1],
}

_SIMULTANEOUS = int(pyspiel.PlayerId.SIMULTANEOUS)
_TERMINAL = int(pyspiel.PlayerId.TERMINAL)
_CHANCE = int(pyspiel.PlayerId.CHANCE)

# Episode ids: a random 64-bit start, counted up per reset (unique in the process, cheaper than urandom).
_EPISODES = itertools.count(int.from_bytes(os.urandom(8), "little"))


class GameConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a session plays; the server's ``--env-options`` give the defaults, reset options override."""

    game: str = "catch"
    params: dict[str, bool | int | float | str] = {}
    agent_player: int = 0
    opponent: str = "random"
    action_names: bool = False  # also send the legal actions' names (for people)
    text: bool = True  # send the text rendering (tensor-only training can skip it: about 1 of the 6 µs a catch step costs the server)
    tensor: bool = True  # send the tensor (text-only agents can skip it)


class _Game:
    """A loaded game plus what every observation needs to know about it."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.game = pyspiel.load_game(name, params)
        game_type = self.game.get_type()
        initial = self.game.new_initial_state()  # the same every episode, so its chance outcomes are too
        self.initial_chance: tuple[tuple[int, float], ...] | None = None
        if initial.current_player() == _CHANCE:
            self.initial_chance = tuple(initial.chance_outcomes())
        self.num_players = self.game.num_players()
        self.terminal_rewards = game_type.reward_model == pyspiel.GameType.RewardModel.TERMINAL  # returns are 0 until the end
        self.tensor_shape: tuple[int, ...] = ()
        self.tensor: _TensorWriter | None = None  # the agent's tensor as float32 bytes
        if game_type.provides_information_state_tensor:
            self.tensor_shape = tuple(self.game.information_state_tensor_shape())
            self.tensor = _TensorWriter(self.game, pyspiel.IIGObservationType(perfect_recall=True), "information_state_tensor")
        elif game_type.provides_observation_tensor:
            self.tensor_shape = tuple(self.game.observation_tensor_shape())
            self.tensor = _TensorWriter(self.game, None, "observation_tensor")
        self.column_spec = ColumnSpec(self.tensor_shape, self.game.num_distinct_actions()) if self.tensor else None
        self.mask_rows: dict[tuple[int, ...], bytes] = {}  # legal actions -> mask row, built once per distinct set
        self.render: Callable[[Any, int], str]  # the agent's view as text
        if game_type.provides_observation_string:
            self.render = pyspiel.State.observation_string
        elif game_type.provides_information_state_string:
            self.render = pyspiel.State.information_state_string
        else:
            self.render = lambda state, player: str(state)


class _TensorWriter:
    """Writes a state's tensor for a player as float32 bytes into one reusable buffer.

    pyspiel's Observation object fills the buffer in place (no list of floats per step);
    games without an observer fall back to the state's own method.
    """

    def __init__(self, game: Any, observation_type: Any, method: str) -> None:
        try:
            observer = game.make_observer(observation_type, {}) if observation_type else game.make_observer({})
            buffer = pyspiel._Observation(game, observer)
        except (pyspiel.SpielError, RuntimeError, TypeError):
            buffer = None
        self._buffer = buffer if buffer is not None and buffer.has_tensor() else None
        self._view = memoryview(self._buffer).cast("B") if self._buffer is not None else None  # set_from rewrites this memory
        self._read = getattr(pyspiel.State, method)
        self.write: Callable[[Any, int], memoryview] = self._write_in_place if self._buffer is not None else self._write_copy

    def _write_in_place(self, state: Any, player: int) -> memoryview:
        """The tensor's bytes, valid until the next call."""
        self._buffer.set_from(state, player)  # type: ignore[union-attr]
        return self._view  # type: ignore[return-value]

    def in_place(self) -> tuple[Callable[[Any, int], None] | None, memoryview | None]:
        """The buffer's ``set_from`` and the view it fills, for loops that call them directly (None, None without an observer)."""
        return (self._buffer.set_from, self._view) if self._buffer is not None else (None, None)

    def _write_copy(self, state: Any, player: int) -> memoryview:
        return memoryview(array("f", self._read(state, player))).cast("B")

    def __call__(self, state: Any, player: int) -> bytes:
        return self.write(state, player).tobytes()


def _unbound(state: Any, player: int) -> memoryview:
    raise AssertionError("the batch loop binds a tensor writer before its first write")


@functools.lru_cache(maxsize=64)
def _load(name: str, params: tuple[tuple[str, Any], ...]) -> _Game:
    return _Game(name, dict(params))


def load_game(config: GameConfig) -> _Game:
    """Load (once per process) the game ``config`` names, or raise a VALIDATION_ERROR."""
    if config.game not in _registered():
        raise ServerError(ErrorCode.VALIDATION_ERROR, f"unknown game {config.game!r} (pyspiel has {len(_registered())} games)")
    try:
        return _load(config.game, tuple(sorted(config.params.items())))
    except (pyspiel.SpielError, ValueError) as exc:  # pyspiel raises ValueError on some bad params
        raise ServerError(ErrorCode.VALIDATION_ERROR, f"cannot load game {config.game!r}: {str(exc).strip()}") from None


@functools.cache
def _registered() -> frozenset[str]:
    return frozenset(pyspiel.registered_names())


class OpenSpielEnv(Environment[OpenSpielAction, OpenSpielObservation, OpenSpielState]):
    name = "openspiel"
    description = "OpenSpiel games (catch, tic_tac_toe, kuhn_poker, ...) against a built-in opponent."
    Action = OpenSpielAction
    Observation = OpenSpielObservation
    State = OpenSpielState
    session_options = frozenset({"game", "params", "agent_player", "opponent", "action_names", "text", "tensor"})

    def __init__(self, **options: Any) -> None:
        self._defaults = self._config(options, GameConfig())
        self._default_game = load_game(self._defaults)
        self._cfg = self._defaults
        self._game: _Game | None = None
        self._state: Any = None
        self._rng = SeededRandom()
        self._seed: int | None = None
        self._episode: int | None = None  # a number from _EPISODES, shown as the episode id
        self._steps = 0
        self._opponent_last: int | None = None
        self._legal: list[int] = []  # the agent's legal actions now
        self._return = 0.0  # the agent's return now
        self._player = _TERMINAL  # the player to move now
        self._over = True  # no episode running

    @staticmethod
    def _config(options: dict[str, Any], base: GameConfig) -> GameConfig:
        try:
            config = msgspec.convert({**msgspec.structs.asdict(base), **options}, GameConfig)
        except msgspec.ValidationError as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad openspiel options: {exc}") from None
        if config.opponent not in OPPONENTS:
            raise ServerError(
                ErrorCode.VALIDATION_ERROR,
                f"unknown opponent {config.opponent!r}; known: {', '.join(OPPONENTS)}",
            )
        return config

    @classmethod
    def parse_action(cls, raw: Any) -> OpenSpielAction:
        if type(raw) is int:  # the mux's compact form
            return OpenSpielAction(raw)
        return super().parse_action(raw)

    # -- episode

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> StepResult[OpenSpielObservation]:
        return StepResult(self._observation(self._begin(seed, options), "initial"))

    def step(self, action: OpenSpielAction) -> StepResult[OpenSpielObservation]:
        before = self._return
        player = self._apply(action.action_id)
        terminated = player == _TERMINAL
        observation = self._observation(player, "terminal" if terminated else "playing")
        return StepResult(observation, self._return - before, terminated)

    # -- columnar batches

    def column_spec(self) -> ColumnSpec | None:
        return (self._game or self._default_game).column_spec

    @classmethod
    def write_batch(cls, envs: Sequence[Any], actions: Sequence[int], batch: ColumnBatch, resets: Mapping[int, int | None]) -> None:
        """Play each row and write its tensor in place, its mask row from a per-game cache: no observation object."""
        spec, size, obs = batch.spec, batch.row_bytes, batch.obs_view
        rewards, terminated, masks, text = batch.reward, batch.terminated, batch.mask, batch.text
        game: _Game | None = None
        write: Callable[[Any, int], memoryview] = _unbound
        set_from: Callable[[Any, int], None] | None = None
        view: memoryview | None = None
        mask_rows: dict[tuple[int, ...], bytes] = {}
        for row, env in enumerate(envs):
            try:
                if row in resets:
                    player = env._begin(resets[row], None)
                    before = None
                else:
                    before = env._return
                    player = env._apply(actions[row])
                if env._game is not game:
                    game = env._game
                    assert game is not None
                    if game.column_spec != spec:
                        raise ServerError(ErrorCode.VALIDATION_ERROR, f"session plays {env._cfg.game}, not the batch's game: reset it")
                    if game.tensor is None:
                        raise ServerError(ErrorCode.VALIDATION_ERROR, f"{env._cfg.game} has no observation tensor for a columnar batch")
                    set_from, view = game.tensor.in_place()
                    write, mask_rows = game.tensor.write, game.mask_rows
                state, agent = env._state, env._cfg.agent_player
                legal = env._settle(player)
                start = row * size
                if set_from is not None:
                    set_from(state, agent)
                    obs[start : start + size] = view  # type: ignore[index,assignment]  # bound with set_from
                else:
                    obs[start : start + size] = write(state, agent)
                if before is not None:
                    rewards[row] = env._return - before
                    terminated[row] = env._over
                key = tuple(legal)
                mask = mask_rows.get(key)
                if mask is None:
                    mask = mask_rows[key] = batch.mask_row(legal)
                masks[row] = mask
                if text is not None:
                    text[row] = game.render(state, agent)  # type: ignore[union-attr]
            except Exception as exc:
                if env._game is not game:  # the check above failed: compare the next row afresh
                    game = None
                batch.fail(row, exc)

    # -- episode internals

    def _begin(self, seed: int | None, options: dict[str, Any] | None) -> int:
        """Start an episode; return the player to move."""
        if options:
            config = self._config(options, self._defaults)
            game = load_game(config)
        else:
            config, game = self._defaults, self._default_game
        if not 0 <= config.agent_player < game.num_players:
            raise ServerError(
                ErrorCode.VALIDATION_ERROR,
                f"agent_player {config.agent_player} out of range for {config.game} ({game.num_players} players)",
            )
        self._cfg, self._game = config, game
        self._seed = seed
        self._rng = SeededRandom(seed)
        self._episode = next(_EPISODES)
        self._steps = 0
        self._opponent_last = None
        self._state = game.game.new_initial_state()
        if game.initial_chance:  # what _advance would draw first, without asking pyspiel again
            self._state.apply_action(self._rng.weighted(game.initial_chance))
        return self._advance()

    def _apply(self, action_id: int) -> int:
        """Play the agent's action and what follows until its next turn; return the player to move."""
        if action_id not in self._legal:
            if self._state is None or self._over:
                raise ServerError(ErrorCode.EPISODE_OVER, "no episode is running: call reset first")
            raise ServerError(
                ErrorCode.INVALID_ACTION,
                f"action {action_id} is not legal; legal actions: {self._legal}",
            )
        state = self._state
        if self._player == _SIMULTANEOUS:
            state.apply_actions(self._joint_action(action_id))
        else:
            state.apply_action(action_id)
        self._steps += 1
        player = state.current_player()
        if player == self._cfg.agent_player or player == _TERMINAL:  # the common case, without a call to _advance
            return player
        return self._advance()

    def _settle(self, player: int) -> list[int]:
        """Record who moves now, the agent's legal actions and its return; return the legal actions."""
        state, agent = self._state, self._cfg.agent_player
        self._player = player
        self._over = over = player == _TERMINAL
        self._legal = legal = [] if over else state.legal_actions(agent)
        self._return = state.player_return(agent) if over or not self._game.terminal_rewards else 0.0  # type: ignore[union-attr]
        return legal

    def state(self) -> OpenSpielState:
        cfg = self._cfg
        return OpenSpielState(
            episode_id=None if self._episode is None else f"{self._episode & 0xFFFFFFFFFFFFFFFF:016x}",
            step_count=self._steps,
            game_name=cfg.game,
            game_params=dict(cfg.params),
            agent_player=cfg.agent_player,
            opponent_policy=cfg.opponent,
            num_players=self._game.num_players if self._game else 0,
            seed=self._seed,
            history=list(self._state.history()) if self._state is not None else [],
        )

    def close(self) -> None:
        self._state = None

    def _advance(self) -> int:
        """Play chance and opponent moves until it is the agent's turn or the game ends; return the player to move."""
        state, rng, agent = self._state, self._rng, self._cfg.agent_player
        while True:
            player = state.current_player()
            if player == agent or player == _SIMULTANEOUS or player == _TERMINAL:
                return player
            if player == _CHANCE:
                state.apply_action(rng.weighted(state.chance_outcomes()))
            else:
                choice = OPPONENTS[self._cfg.opponent](rng, state.legal_actions(player))
                self._opponent_last = choice
                state.apply_action(choice)

    def _joint_action(self, agent_action: int) -> list[int]:
        state, agent = self._state, self._cfg.agent_player
        opponent = OPPONENTS[self._cfg.opponent]
        return [
            agent_action if p == agent else opponent(self._rng, state.legal_actions(p))
            for p in range(self._game.num_players)  # type: ignore[union-attr]
        ]

    def _observation(self, player: int, phase: str) -> OpenSpielObservation:
        state, game, cfg = self._state, self._game, self._cfg
        assert game is not None
        agent = cfg.agent_player
        legal = self._settle(player)
        tensor = None
        if game.tensor is not None and cfg.tensor:
            tensor = Tensor(game.tensor_shape, data=game.tensor(state, agent))
        return OpenSpielObservation(
            legal_actions=legal,
            current_player_id=player,
            game_phase=phase,  # type: ignore[arg-type]
            info_state=tensor,
            text=game.render(state, agent) if cfg.text else None,
            rewards=state.rewards(),
            returns=state.returns(),
            opponent_last_action=self._opponent_last,
            legal_action_names=[state.action_to_string(agent, a) for a in legal] if cfg.action_names else None,
        )
