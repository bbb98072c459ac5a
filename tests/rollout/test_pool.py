"""EnvPool over the local backend: placement, batched calls, whole episodes, bad input."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from rollout import CapacityReached, EnvCrashed, EnvPool, EpisodeRecord, FleetError, InvalidAction, PoolClosed, episode_seed
from rollout.commands.bench import batches
from rollout.pool import PoolState


def first_legal(observation):  # type: ignore[no-untyped-def]
    return observation.legal_actions[0]


async def test_envs_spread_evenly_and_batched_calls_return_in_order() -> None:
    async with EnvPool(n=10, game="catch", servers=2) as pool:
        assert len(pool.envs) == 10 and len(pool.servers) == 2
        assert sorted(sum(1 for e in pool.envs if e.server == s) for s in pool.servers) == [5, 5]
        results = await pool.reset(seeds=range(10))
        single = await pool.envs[3].reset(seed=3)
        assert results[3].observation.info_state == single.observation.info_state
        frames = sum(c.frames_sent for c in pool.clients)
        results = await pool.step([0] * 10)
        assert sum(c.frames_sent for c in pool.clients) - frames == 2  # one frame per server
        assert all(r.observation.game_phase == "playing" for r in results)
        states = await pool.states()
        assert [s.step_count for s in states] == [1] * 10


async def test_run_reports_each_episode_once_and_is_seeded_by_index() -> None:
    async with EnvPool(n=8, game="tic_tac_toe", servers=2) as pool:
        records = [r async for r in pool.run(first_legal, episodes=30, seed=5)]
    assert sorted(r.episode for r in records) == list(range(30))
    assert all(isinstance(r, EpisodeRecord) and r.seed == episode_seed(5, r.episode) for r in records)
    # the same episodes on a differently shaped pool give the same results
    async with EnvPool(n=3, game="tic_tac_toe", servers=1) as pool:
        again = {r.episode: r async for r in pool.run(first_legal, episodes=30, seed=5)}
    for record in records:
        assert (again[record.episode].reward, again[record.episode].length) == (record.reward, record.length)
        assert again[record.episode].info["returns"] == record.info["returns"]


async def test_run_accepts_async_policies_and_skips_done_episodes() -> None:
    rng = random.Random(0)

    async def policy(observation):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return rng.choice(observation.legal_actions)

    async with EnvPool(n=4, game="catch", servers=1) as pool:
        records = [r async for r in pool.run(policy, episodes=12, seed=1, skip=range(0, 12, 2))]
    assert sorted(r.episode for r in records) == list(range(1, 12, 2))
    assert all(r.length == 9 for r in records)


async def test_bad_action_names_env_and_server_and_pool_stays_usable() -> None:
    async with EnvPool(n=4, game="catch", servers=2) as pool:
        await pool.reset(seeds=range(4))
        with pytest.raises(InvalidAction) as info:
            await pool.envs[2].step(7)
        assert info.value.env == 2 and info.value.server == pool.envs[2].server
        results = await pool.step([7, 1, 1, 1], return_exceptions=True)
        assert isinstance(results[0], InvalidAction) and results[0].env == 0
        assert all(r.observation.game_phase == "playing" for r in results[1:])


async def test_killed_server_is_replaced_and_runs_lose_nothing(alive) -> None:
    async with EnvPool(n=16, game="catch", servers=2) as pool:
        victim = pool.servers[0]
        pid = pool.backend.pid(victim)  # type: ignore[union-attr]
        seen: list[int] = []
        async for record in pool.run(first_legal, episodes=400, seed=9):
            seen.append(record.episode)
            if len(seen) == 50:
                os.kill(pid, signal.SIGKILL)
        assert sorted(seen) == list(range(400))
        assert victim not in pool.servers and not alive(pid)
        assert len(pool.servers) == 2
        await pool.reset()  # every env works again


async def test_in_flight_calls_fail_fast_and_other_servers_keep_serving() -> None:
    async with EnvPool(n=4, game="catch", servers=2) as pool:
        await pool.reset()
        doomed, healthy = pool.envs[0], pool.envs[1]
        assert doomed.server != healthy.server

        async def keep_stepping() -> None:
            while True:
                if (await doomed.step(1)).terminated:
                    await doomed.reset()

        task = asyncio.create_task(keep_stepping())
        await asyncio.sleep(0.2)
        os.kill(pool.backend.pid(doomed.server), signal.SIGKILL)  # type: ignore[union-attr]
        with pytest.raises(EnvCrashed) as info:
            await asyncio.wait_for(task, 1.0)
        assert info.value.env == 0 and info.value.request is not None
        assert (await healthy.step(1)).observation.game_phase == "playing"


async def test_batched_calls_after_a_server_replacement() -> None:
    async with EnvPool(n=4, game="catch", servers=2) as pool:
        await pool.reset(seeds=range(4))
        victim = pool.envs[0].server
        os.kill(pool.backend.pid(victim), signal.SIGKILL)  # type: ignore[union-attr]
        async with asyncio.timeout(30):
            while not pool.replacements_log:
                await asyncio.sleep(0.05)
        assert pool.envs[0].server == pool.envs[2].server != victim  # envs 0 and 2 lived on the replaced server
        results = await pool.step([1] * 4, return_exceptions=True)
        assert [isinstance(r, EnvCrashed) and "replaced" in str(r) for r in results] == [True, False, True, False]
        await pool.reset(seeds=[7, 8], env_ids=[0, 2])  # a batched reset starts new episodes there
        assert all(r.observation.game_phase == "playing" for r in await pool.step([1] * 4))
        assert (await pool.envs[0].step(1)).observation.game_phase == "playing"


async def test_pool_stops_its_servers_on_error_and_refuses_after_close(alive) -> None:
    pool = EnvPool(n=2, game="catch", servers=2)
    with pytest.raises(RuntimeError):
        async with pool:
            pids = [pool.backend.pid(url) for url in pool.servers]  # type: ignore[union-attr]
            raise RuntimeError("boom")
    assert pool.state is PoolState.CLOSED
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(PoolClosed):
        await pool.step([0, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"env": "nosuchenv"}, "unknown environment"),
        ({"game": "nosuchgame"}, "nosuchgame"),
        ({"options": {"game": "catch", "params": {"rows": "x"}}}, "failed to start"),
    ],
)
async def test_bad_env_or_game_is_a_fleet_error(kwargs: dict, match: str) -> None:
    with pytest.raises(FleetError, match=match):
        async with EnvPool(n=1, servers=1, **kwargs):
            pass


async def test_capacity_refusal_is_typed() -> None:
    with pytest.raises(CapacityReached):
        async with EnvPool(n=5, game="catch", servers=1, max_sessions=4):
            pass


async def test_bench_batches_cover_every_env_and_stay_on_one_server() -> None:
    for servers, n in ((2, 10), (1, 5)):
        async with EnvPool(n=n, game="catch", servers=servers) as pool:
            groups = batches(pool)
            assert sorted(i for ids in groups for i in ids) == list(range(n))
            assert len(groups) == 2 and all(len({pool.envs[i].server for i in ids}) == 1 for ids in groups)


async def test_blocking_env_through_the_pool_runs_sessions_side_by_side() -> None:
    """python_sandbox cells run in worker threads: joined per-env steps and a batched step both map back by env."""
    async with EnvPool(n=4, env="python_sandbox", servers=1) as pool:
        await pool.reset(seeds=range(4))
        started = time.perf_counter()
        cells = [env.step({"code": f"import time; time.sleep(1.0); x = {env.index}; print(x)"}) for env in pool.envs]
        results = await asyncio.gather(*cells)
        assert [r.observation.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
        assert time.perf_counter() - started < 3.0  # four 1 s cells one after another would take 4 s
        batched = await pool.step([{"code": "print(x * 10)"}] * 4)
        assert [r.observation.stdout for r in batched] == ["0\n", "10\n", "20\n", "30\n"]
