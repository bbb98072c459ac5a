"""Chaos in CI: servers SIGKILLed during ``EnvPool.run`` lose, duplicate and change nothing.

The full run (10,000 episodes, 8 servers, a kill every 2 s) is ``loadtests/chaos.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from loadtests.chaos import FAIL_FAST_LIMIT, envserver_pids, make_policy, run_chaos
from rollout import EnvPool


@pytest.mark.slow
async def test_repeated_kills_lose_and_duplicate_nothing() -> None:
    before = set(envserver_pids())
    report = await run_chaos(
        episodes=6000, n=128, servers=4, kill_every=0.4, first_kill=0.2, seed=5, max_episode_retries=20
    )
    assert report.failures == []
    assert report.reported == 6000 and report.duplicated == 0 and report.missing == 0
    assert report.mismatched == 0  # seeded returns equal the undisturbed run's
    assert report.servers_killed >= 2
    assert report.replacements >= report.servers_killed
    assert report.crashes_in_flight > 0 and report.crashes_unnamed == 0
    assert report.fail_fast_max_s is not None and report.fail_fast_max_s < FAIL_FAST_LIMIT
    assert report.leftovers == []
    started_by_us = {pid for pid, ppid in envserver_pids().items() if ppid == os.getpid()}
    assert started_by_us <= before, f"envserver processes left running: {started_by_us - before}"


async def test_async_policy_thinking_during_a_kill_loses_nothing() -> None:
    async with EnvPool(n=2, game="catch", servers=2) as pool:
        victim = pool.backend.pid(pool.servers[0])  # type: ignore[union-attr]
        choose = make_policy(0.0)
        killed = []

        async def thinking_policy(observation: object) -> int:
            if not killed:
                killed.append(victim)
                os.kill(victim, signal.SIGKILL)  # dies while both envs think: nothing is in flight
            await asyncio.sleep(0.3)
            return choose(observation)

        episodes = [record.episode async for record in pool.run(thinking_policy, episodes=4, seed=1)]
        assert sorted(episodes) == [0, 1, 2, 3]
