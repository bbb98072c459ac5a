"""Gymnasium over envfleet: a ``gymnasium.vector.VectorEnv`` of a pool, and a ``gymnasium.Env`` of one session.

    envs = rollout.gym.make_vec("openspiel", game="catch", num_envs=256)
    obs, info = envs.reset(seed=0)
    obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
    envs.close()

Both are synchronous, as Gymnasium's API is: each owns a background thread running an
asyncio loop with the pool (started in the constructor, stopped by ``close()``). Spaces
come from the environment's first reply: ``Box`` for the observation tensor, ``Discrete``
for the actions. Infos hold numpy arrays with ``_key`` masks, the legal actions as
``info["action_mask"]``. Needs the ``gym`` extra (``pip install envfleet[gym]``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode

from .pool import EnvPool
from .vector import VectorPool

T = TypeVar("T")

_MODES = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP, "disabled": AutoresetMode.DISABLED}


class LoopThread:
    """An asyncio loop in a daemon thread of its own; ``run`` waits for a coroutine on it, ``stop`` ends it."""

    def __init__(self, name: str = "envfleet-gym") -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result (its exception is raised here)."""
        if not self.thread.is_alive():
            coro.close()
            raise RuntimeError("the environment is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Cancel what is left on the loop, stop it, join the thread and close the loop."""
        if not self.thread.is_alive():
            return

        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _spaces(vector: VectorPool) -> tuple[gymnasium.spaces.Box, gymnasium.spaces.Discrete]:
    if vector.obs_shape is None or not vector.num_actions:
        raise ValueError("the environment has no observation tensor or no discrete actions: Gymnasium spaces need both")
    bound = np.finfo(np.float32).max  # the wire carries no bounds: the whole float32 range (Gymnasium's checker refuses infinities)
    observation = gymnasium.spaces.Box(-bound, bound, vector.obs_shape, np.float32)
    return observation, gymnasium.spaces.Discrete(vector.num_actions)


class _PoolOwner:
    """Starts a pool on a loop thread and stops both (shared by the vector and the single env)."""

    def _start_pool(self, n: int, env: str, autoreset: str, pool_kwargs: dict[str, Any]) -> None:
        self._thread = LoopThread()
        self._pool: EnvPool | None = None
        try:
            self._pool = EnvPool(n=n, env=env, **pool_kwargs)
            self._thread.run(self._pool.start())
            self._vector = self._pool.vector(autoreset)
            self._thread.run(self._vector.reset())  # learn the spaces from the first reply
        except BaseException:
            self._stop_pool()
            raise

    def _stop_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            self._thread.run(pool.close())
        self._thread.stop()


class VectorEnv(_PoolOwner, gymnasium.vector.VectorEnv):  # type: ignore[misc]
    """``num_envs`` envfleet sessions as a Gymnasium vector env (auto-reset in the servers)."""

    def __init__(self, env: str = "openspiel", num_envs: int = 16, *, autoreset: str = "next_step", **pool_kwargs: Any) -> None:
        if autoreset not in _MODES:
            raise ValueError(f"autoreset must be one of {', '.join(_MODES)}, not {autoreset!r}")
        self.num_envs = num_envs
        self._start_pool(num_envs, env, autoreset, pool_kwargs)
        self.metadata = {"autoreset_mode": _MODES[autoreset]}
        self.single_observation_space, self.single_action_space = _spaces(self._vector)
        self.observation_space = gymnasium.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(self.single_action_space, num_envs)

    @property
    def pool(self) -> EnvPool:
        assert self._pool is not None
        return self._pool

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env; ``seed`` seeds env i's episodes from (seed, i) alone."""
        super().reset(seed=seed if isinstance(seed, int) or seed is None else None)
        return self._thread.run(self._vector.reset(seed=seed))

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        return self._thread.run(self._vector.step(actions))

    def close_extras(self, **kwargs: Any) -> None:
        self._stop_pool()


class Env(_PoolOwner, gymnasium.Env):  # type: ignore[misc]
    """One envfleet session as a Gymnasium env (episodes end as usual: call ``reset``)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, env: str = "openspiel", **pool_kwargs: Any) -> None:
        self._start_pool(1, env, "disabled", {"servers": 1, **pool_kwargs})
        self.observation_space, self.action_space = _spaces(self._vector)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        obs, info = self._thread.run(self._vector.reset(seed=None if seed is None else [seed]))
        return obs[0], _single(info)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self._thread.run(self._vector.step(np.asarray([action])))
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), _single(info)

    def close(self) -> None:
        if hasattr(self, "_thread"):
            self._stop_pool()


def _single(info: dict[str, Any]) -> dict[str, Any]:
    """A vector info of one env as a plain Gymnasium info (no ``_key`` masks)."""
    return {key: value[0] for key, value in info.items() if not key.startswith("_") and value is not None and (f"_{key}" not in info or info[f"_{key}"][0])}


def make_vec(env: str = "openspiel", num_envs: int = 16, *, autoreset: str = "next_step", **kwargs: Any) -> VectorEnv:
    """A Gymnasium vector env of ``num_envs`` sessions; ``kwargs`` go to ``EnvPool`` (``game``, ``backend``, ``servers``, ...)."""
    return VectorEnv(env, num_envs, autoreset=autoreset, **kwargs)


def make(env: str = "openspiel", **kwargs: Any) -> Env:
    """A Gymnasium env of one session; ``kwargs`` go to ``EnvPool``."""
    return Env(env, **kwargs)


# ``gymnasium.make("envfleet/Session-v0", env="openspiel", game="catch")`` and
# ``gymnasium.make_vec("envfleet/Session-v0", num_envs=256, vectorization_mode="vector_entry_point", ...)``.
ENV_ID = "envfleet/Session-v0"
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="rollout.gym:Env", vector_entry_point="rollout.gym:VectorEnv")
