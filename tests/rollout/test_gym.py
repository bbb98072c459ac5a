"""rollout.gym: Gymnasium's own checkers, the owned loop thread, and Gymnasium envs served by envserver."""

from __future__ import annotations

import threading

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers.vector import RecordEpisodeStatistics

import rollout.gym
from rollout import EnvPool, InvalidAction, episode_seed


def _children() -> set[int]:
    """Pids of this process's live children (the local backend's envservers)."""
    import os

    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return pids


def test_single_env_passes_gymnasiums_env_checker() -> None:
    env = gymnasium.make(rollout.gym.ENV_ID, env="openspiel", game="catch")
    try:
        check_env(env.unwrapped)
        obs, info = env.reset(seed=5)
        assert obs.shape == (10, 5) and env.observation_space.contains(obs)
        assert info["action_mask"].tolist() == [True, True, True]
    finally:
        env.close()


def test_vector_env_runs_under_record_episode_statistics_with_numpy_infos() -> None:
    envs = RecordEpisodeStatistics(rollout.gym.make_vec("openspiel", game="catch", num_envs=16))
    try:
        assert envs.metadata["autoreset_mode"] is gymnasium.vector.AutoresetMode.NEXT_STEP
        assert envs.single_observation_space.shape == (10, 5) and envs.single_action_space == gymnasium.spaces.Discrete(3)
        obs, info = envs.reset(seed=0)
        assert envs.observation_space.contains(obs)
        episodes = []
        for _ in range(30):
            obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
            if "episode" in info:
                episodes += info["episode"]["r"][info["_episode"]].tolist()
                assert (info["episode"]["l"][info["_episode"]] == 9).all()
                assert info["episode_return"][info["_episode_return"]].tolist() == info["episode"]["r"][info["_episode"]].tolist()
        assert len(episodes) == 16 * 3 and set(episodes) <= {-1.0, 1.0}
        assert len(envs.return_queue) == 16 * 3
    finally:
        envs.close()


def test_same_seed_same_run_through_gymnasium() -> None:
    runs = []
    for _ in range(2):
        envs = rollout.gym.make_vec("openspiel", game="catch", num_envs=4, autoreset="same_step", servers=1)
        try:
            assert envs.metadata["autoreset_mode"] is gymnasium.vector.AutoresetMode.SAME_STEP
            obs, _ = envs.reset(seed=11)
            trace = [obs]
            for step in range(20):
                obs, *_ = envs.step(np.full(4, step % 3))
                trace.append(obs)
            runs.append(np.stack(trace))
        finally:
            envs.close()
    assert np.array_equal(runs[0], runs[1])


def test_close_stops_the_loop_thread_and_the_servers() -> None:
    threads_before, children_before = set(threading.enumerate()), _children()
    envs = rollout.gym.make_vec("openspiel", game="catch", num_envs=4, servers=2)
    started = set(threading.enumerate()) - threads_before
    assert len(_children() - children_before) == 2 and started
    envs.reset(seed=0)
    envs.close()
    assert not any(t.is_alive() for t in started)
    assert _children() - children_before == set()
    envs.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        envs.step(np.zeros(4, np.int64))


def test_illegal_actions_raise_and_the_env_goes_on() -> None:
    env = rollout.gym.make("openspiel", game="tic_tac_toe")
    try:
        env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(np.int64(4))
        assert not info["action_mask"][4]
        with pytest.raises(InvalidAction):
            env.step(4)
        env.step(int(np.flatnonzero(info["action_mask"])[0]))
    finally:
        env.close()


# ---------------------------------------------------------------------------- Gymnasium envs served by envserver


async def test_gymnasium_adapter_serves_cartpole_with_seeds_passed_through() -> None:
    async with EnvPool(n=4, env="gymnasium", servers=1, options={"id": "CartPole-v1"}) as pool:
        vector = pool.vector()
        obs, info = await vector.reset(seed=[1, 2, 3, 1])
        reference = gymnasium.make("CartPole-v1")
        expected, _ = reference.reset(seed=episode_seed(1, 0))
        assert obs.shape == (4, 4) and np.array_equal(obs[0], expected) and np.array_equal(obs[0], obs[3])
        assert vector.num_actions == 2 and info["action_mask"].all()
        lengths = []
        for _ in range(600):  # pole falls or time limit: every episode ends well within this
            obs, reward, terminated, truncated, info = await vector.step(np.zeros(4, np.int64))
            if "_episode_length" in info:
                lengths += info["episode_length"][info["_episode_length"]].tolist()
        assert lengths and all(length < 50 for length in lengths)  # always pushing left fails fast
        with pytest.raises(InvalidAction):
            await vector.step(np.full(4, 2))
        reference.close()


async def test_clients_cannot_choose_the_gymnasium_id(spawn_server, mux_connect) -> None:
    server = spawn_server("--env", "gymnasium", "--env-options", '{"id": "CartPole-v1"}')
    mux = await mux_connect(server)
    (bad,) = await mux.call(mux.req("open", 1, None, {"id": "MountainCar-v0"}))
    assert not bad.ok and bad.body["code"] == "VALIDATION_ERROR" and "operator" in bad.body["message"]
    (kwargs,) = await mux.call(mux.req("open", 2, None, {"kwargs": {"render_mode": "human"}}))
    assert not kwargs.ok and "operator" in kwargs.body["message"]
    (same,) = await mux.call(mux.req("open", 3, None, {"id": "CartPole-v1"}))  # not even the operator's own value
    assert not same.ok and same.body["code"] == "VALIDATION_ERROR"
    (other,) = await mux.call(mux.req("open", 4, "gymnasium", {"id": "MountainCar-v0"}))
    assert not other.ok


async def test_gymnasium_adapter_serves_cartpole_when_the_operator_names_no_id(spawn_server, mux_connect) -> None:
    server = spawn_server("--env", "gymnasium")
    mux = await mux_connect(server)
    await mux.one("open", 1)
    assert await mux.one("state", 1) == {"id": "CartPole-v1", "step_count": 0, "seed": None}
    (bad,) = await mux.call(mux.req("step", 1, {"action": [0.5, 0.5]}))
    assert not bad.ok and bad.body["code"] in ("EPISODE_OVER", "INVALID_ACTION")
    await mux.one("reset", 1, 3)
    (bad,) = await mux.call(mux.req("step", 1, {"action": [0.5, 0.5]}))
    assert not bad.ok and bad.body["code"] == "INVALID_ACTION"
    body = await mux.one("step", 1, {"action": 1})
    assert body["reward"] == 1.0
