"""Whole episodes with a batched policy over a ``VectorPool``: what ``rollout eval`` runs for a vectorized policy."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterable

import numpy as np

from envserver.protocol import episode_seed

from .errors import EnvCrashed
from .pool import EpisodeRecord
from .vector import VectorPolicy, VectorPool


async def play_episodes(vector: VectorPool, policy: VectorPolicy, episodes: int, seed: int, *, skip: Iterable[int] = ()) -> AsyncIterator[EpisodeRecord]:
    """Play episodes with a batched policy; yield each record as it finishes.

    Episode i is seeded ``episode_seed(seed, i)``, as in ``EnvPool.run``, so both give the same
    episodes. ``vector`` must not auto-reset (``autoreset="disabled"``): each finished env is
    given the next episode to play. An episode lost with its server is played again (up to the
    pool's ``max_episode_retries``). An exception of the policy carries the episode as ``exc.episode``.
    """
    if vector.autoreset != "disabled":
        raise ValueError("play_episodes needs a VectorPool with autoreset='disabled'")
    done = set(skip)
    todo = deque(i for i in range(episodes) if i not in done)
    current = np.full(vector.num_envs, -1, np.int64)
    started = np.zeros(vector.num_envs)
    retries: dict[int, int] = {}

    async def start(free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Give the free envs the next episodes; reset again the ones whose server failed."""
        ids = free[: len(todo)]
        current[ids] = [todo.popleft() for _ in range(len(ids))]
        started[ids] = time.perf_counter()
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for _ in range(vector.pool.config.max_episode_retries + 1):
            obs, info = await vector.reset(seed=[seed] * len(ids), env_ids=ids, episodes=current[ids].tolist())
            failed = info.get("_error", np.zeros(len(ids), bool))
            mask = info.get("action_mask", np.ones((len(ids), 0), bool))
            parts.append((ids[~failed], obs[~failed], mask[~failed]))
            if not failed.any():
                return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]
            error, ids = info["error"][np.flatnonzero(failed)[0]], ids[failed]
        raise EnvCrashed(f"cannot start episode {int(current[ids[0]])}: {error}", env=int(ids[0]))

    active, obs, mask = await start(np.arange(vector.num_envs))
    while len(active):
        try:
            actions = policy(obs, mask)
            vector.send(actions, active)
        except Exception as exc:
            env = getattr(exc, "env", None)
            exc.episode = int(current[env] if isinstance(env, int) else current[active[0]])  # type: ignore[attr-defined]
            raise
        obs, _, terminated, truncated, info = await vector.recv()
        ids, finished = info["env_id"], terminated | truncated
        errors = info.get("error")
        for row in np.flatnonzero(finished):
            env, episode = int(ids[row]), int(current[ids[row]])
            if errors is not None and errors[row] is not None:
                retries[episode] = retries.get(episode, 0) + 1
                if retries[episode] > vector.pool.config.max_episode_retries:
                    raise EnvCrashed(f"episode {episode} failed {retries[episode]} times: {errors[row]}", env=env)
                todo.appendleft(episode)
                continue
            wall = time.perf_counter() - float(started[env])
            info_out = {"server": vector.pool.envs[env].server, "env": env, "wall_time": wall}
            if retries.get(episode):
                info_out["retries"] = retries[episode]
            yield EpisodeRecord(episode, episode_seed(seed, episode), float(info["episode_return"][row]), int(info["episode_length"][row]), info_out)
        keep = ~finished
        active, obs, mask = ids[keep], obs[keep], info["action_mask"][keep] if "action_mask" in info else mask[keep]
        if finished.any() and todo:
            new_ids, new_obs, new_mask = await start(ids[finished])
            active, obs, mask = np.concatenate([active, new_ids]), np.concatenate([obs, new_obs]), np.concatenate([mask, new_mask])
