"""Any registered Gymnasium environment, served as an envserver environment.

The operator names the Gymnasium id (``envserver --env gymnasium --env-options
'{"id": "CartPole-v1"}'``, the default); clients cannot, since ``gymnasium.make`` may
import any module. Observations of Box and Discrete spaces travel as float32 tensors (a Discrete
observation as a tensor of shape ``(1,)``); actions are ints for Discrete action spaces
(``{"action": 1}``, or a bare int on the mux) and lists of floats for Box ones
(``{"action": [0.5]}``). ``reset(seed=...)`` passes the seed through to Gymnasium.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import msgspec
import numpy as np

from ..env import Environment
from ..errors import ServerError
from ..protocol import ErrorCode, StepResult, Tensor
from ..surfaces.columns import ColumnBatch, ColumnSpec


class GymnasiumConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The operator's choice: which Gymnasium id, and keyword arguments for ``gymnasium.make``."""

    id: str = "CartPole-v1"
    kwargs: dict[str, Any] = {}


class GymnasiumAction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An action of the Gymnasium action space: an int (Discrete) or a list of floats (Box)."""

    action: int | list[float] = 0


class GymnasiumObservation(msgspec.Struct, gc=False):
    observation: Tensor
    info: dict[str, bool | int | float | str] = {}  # the scalar entries of Gymnasium's info


class GymnasiumState(msgspec.Struct, gc=False):
    id: str
    step_count: int
    seed: int | None = None


class GymnasiumEnv(Environment[GymnasiumAction, GymnasiumObservation, GymnasiumState]):
    name = "gymnasium"
    description = "A registered Gymnasium environment chosen by the server's operator (e.g. CartPole-v1)."
    Action = GymnasiumAction
    Observation = GymnasiumObservation
    State = GymnasiumState

    def __init__(self, **options: Any) -> None:
        try:
            config = msgspec.convert(options, GymnasiumConfig)
        except msgspec.ValidationError as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad gymnasium options: {exc}") from None
        try:
            self._env = gymnasium.make(config.id, **{"disable_env_checker": True, **config.kwargs})
        except gymnasium.error.Error as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"cannot make {config.id!r}: {exc}") from None
        self._id = config.id
        observation_space, action_space = self._env.observation_space, self._env.action_space
        if isinstance(observation_space, gymnasium.spaces.Box):
            self._shape: tuple[int, ...] = tuple(int(d) for d in observation_space.shape)
        elif isinstance(observation_space, gymnasium.spaces.Discrete):
            self._shape = (1,)
        else:
            self._env.close()
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"{config.id}: observation space {observation_space} is neither Box nor Discrete")
        if isinstance(action_space, gymnasium.spaces.Discrete):
            self._actions = int(action_space.n)
            self._start = int(action_space.start)
        elif isinstance(action_space, gymnasium.spaces.Box):
            self._actions = 0
            self._start = 0
        else:
            self._env.close()
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"{config.id}: action space {action_space} is neither Discrete nor Box")
        self._spec = ColumnSpec(self._shape, self._actions)
        self._steps = 0
        self._seed: int | None = None
        self._running = False

    @classmethod
    def parse_action(cls, raw: Any) -> GymnasiumAction:
        if type(raw) is int:  # the mux's compact form
            return GymnasiumAction(raw)
        return super().parse_action(raw)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[GymnasiumObservation]:
        observation, info = self._begin(seed, options)
        return StepResult(GymnasiumObservation(self._tensor(observation), _scalars(info)))

    def step(self, action: GymnasiumAction) -> StepResult[GymnasiumObservation]:
        observation, reward, terminated, truncated, info = self._apply(action.action)
        return StepResult(GymnasiumObservation(self._tensor(observation), _scalars(info)), reward, terminated, truncated)

    def state(self) -> GymnasiumState:
        return GymnasiumState(self._id, self._steps, self._seed)

    def close(self) -> None:
        self._env.close()

    def column_spec(self) -> ColumnSpec:
        return self._spec

    @classmethod
    def write_batch(cls, envs: Sequence[Any], actions: Sequence[int], batch: ColumnBatch, resets: Mapping[int, int | None]) -> None:
        """Step each env and copy its observation's float32 bytes into its row (no observation object)."""
        size, obs = batch.row_bytes, batch.obs_view
        rewards, terminated, truncated, masks = batch.reward, batch.terminated, batch.truncated, batch.mask
        for row, env in enumerate(envs):
            try:
                if env._spec != batch.spec:
                    raise ServerError(ErrorCode.VALIDATION_ERROR, f"session runs {env._id}, not the batch's environment")
                if row in resets:
                    observation, _ = env._begin(resets[row], None)
                else:
                    observation, reward, done, cut, _ = env._apply(actions[row] + env._start)  # columns number actions from 0
                    rewards[row], terminated[row], truncated[row] = reward, done, cut
                start = row * size
                obs[start : start + size] = np.asarray(observation, np.float32).tobytes()
                if env._actions:
                    masks[row] = batch._all_legal
            except Exception as exc:
                batch.fail(row, exc)

    # -- internals

    def _begin(self, seed: int | None, options: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        self._seed, self._steps, self._running = seed, 0, True
        observation, info = self._env.reset(seed=seed, options=options)
        return observation, info

    def _apply(self, action: int | list[float]) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if not self._running:
            raise ServerError(ErrorCode.EPISODE_OVER, "no episode is running: call reset first")
        if self._actions:
            if type(action) is not int or not self._start <= action < self._start + self._actions:
                raise ServerError(ErrorCode.INVALID_ACTION, f"action {action!r} is not in Discrete({self._actions}, start={self._start})")
            value: Any = action
        else:
            value = np.asarray(action, np.float32)
            if value.shape != self._env.action_space.shape or not self._env.action_space.contains(value):
                raise ServerError(ErrorCode.INVALID_ACTION, f"action {action!r} is not in {self._env.action_space}")
        observation, reward, terminated, truncated, info = self._env.step(value)
        self._steps += 1
        self._running = not (terminated or truncated)
        return observation, float(reward), bool(terminated), bool(truncated), info

    def _tensor(self, observation: Any) -> Tensor:
        return Tensor(self._shape, np.asarray(observation, np.float32).tobytes())


def _scalars(info: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The entries of a Gymnasium info dict that are plain scalars (numpy ones as Python values)."""
    kept: dict[str, bool | int | float | str] = {}
    for key, value in info.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (bool, int, float, str)) and isinstance(key, str):
            kept[key] = value
    return kept
