"""EnvClient against real servers: micro-batching, ordering, typed errors, fail-fast."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from envserver.envs.openspiel_types import OpenSpielObservation, OpenSpielState
from envserver.protocol import StepResult, Tensor
from rollout import EnvClient, EnvCrashed, EpisodeOver, InvalidAction, PoolClosed, UnknownSession
from rollout.client import ClientState
from rollout.config import FleetConfig
from rollout.fleet.local import LocalFleet


async def test_typed_episode(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sid = client.new_sid()
        opened = await client.open(sid)
        assert opened.env == "openspiel"
        result = await client.reset(sid, seed=7)
        assert isinstance(result, StepResult)
        assert isinstance(result.observation, OpenSpielObservation)
        assert isinstance(result.observation.info_state, Tensor)
        assert result.observation.info_state.numpy().shape == (10, 5)
        assert result.observation.legal_actions == [0, 1, 2]
        steps = 0
        while not result.terminated:
            result = await client.step(sid, 1)
            steps += 1
        assert steps == 9 and result.reward in (-1.0, 1.0)
        state = await client.get_state(sid)
        assert isinstance(state, OpenSpielState) and state.step_count == 9 and state.seed == 7


async def test_concurrent_calls_share_frames(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sids = [client.new_sid() for _ in range(200)]
        await asyncio.gather(*(client.open(s) for s in sids))
        await asyncio.gather(*(client.reset(s, seed=s) for s in sids))
        frames_before, requests_before = client.frames_sent, client.requests_sent
        results = await asyncio.gather(*(client.step(s, 1) for s in sids))
        frames = client.frames_sent - frames_before
        requests = client.requests_sent - requests_before
        assert frames <= 3 and requests <= 3, f"200 concurrent steps went out as {requests} requests in {frames} frames"
        assert all(r.observation.game_phase == "playing" and r.observation.legal_actions == [0, 1, 2] for r in results)


async def test_a_failed_call_in_a_joined_request_fails_alone(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sids = [client.new_sid() for _ in range(3)]
        await asyncio.gather(*(client.open(s) for s in sids))
        await asyncio.gather(*(client.reset(s, seed=s) for s in sids))
        results = await asyncio.gather(client.step(sids[0], 1), client.step(sids[1], 9), client.step(sids[2], 1), return_exceptions=True)
        assert isinstance(results[1], InvalidAction) and results[1].env == sids[1] and results[1].server == client.url
        assert all(isinstance(r, StepResult) for r in (results[0], results[2]))


@pytest.mark.parametrize("local_fleet", [FleetConfig(servers=1, env="echo")], indirect=True)
async def test_requests_over_the_frame_limit_are_split(local_fleet: LocalFleet) -> None:
    """Steps joined into one request bigger than a frame go out split, and each answer reaches its caller."""
    async with EnvClient(local_fleet.urls[0], env="echo", token=local_fleet.token, max_frame_bytes=64 * 1024) as client:
        sids = [client.new_sid() for _ in range(20)]
        await asyncio.gather(*(client.open(s, "echo") for s in sids))
        await asyncio.gather(*(client.reset(s) for s in sids))
        frames_before = client.frames_sent
        messages = [f"{s:04d}" * 2500 for s in sids]  # 10 kB each, 200 kB in all
        results = await asyncio.gather(*(client.step(s, {"message": m}) for s, m in zip(sids, messages)))
        assert [r.observation.echoed_message for r in results] == messages
        assert client.frames_sent - frames_before >= 4
        batched = await client.batch("step", sids, [{"message": m} for m in messages])
        assert [r.observation.echoed_message for r in batched] == messages


async def test_requests_of_one_session_run_in_order(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sid = client.new_sid()
        await client.open(sid)
        # reset, then 9 steps issued at once without awaiting in between: they must apply in order
        calls = [client.reset(sid, seed=3)] + [client.step(sid, a) for a in (0, 2, 0, 2, 1, 1, 0, 2, 1)]
        results = await asyncio.gather(*calls)
        assert results[-1].terminated and not any(r.terminated for r in results[:-1])
        state = await client.get_state(sid)
        assert state.history[1:] == [0, 2, 0, 2, 1, 1, 0, 2, 1]


async def test_errors_are_typed_and_name_the_request(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sid = client.new_sid()
        await client.open(sid)
        with pytest.raises(EpisodeOver):
            await client.step(sid, 1)
        await client.reset(sid, seed=1)
        with pytest.raises(InvalidAction) as info:
            await client.step(sid, 9)
        assert info.value.server == client.url and info.value.request is not None and info.value.env == sid
        with pytest.raises(InvalidAction):
            await client.step(sid, "left")  # wrong type
        with pytest.raises(UnknownSession):
            await client.step(999, 1)
        # the episode is unchanged by the bad calls
        result = await client.step(sid, 1)
        assert result.observation.game_phase == "playing"


async def test_killed_server_fails_in_flight_calls_at_once(local_fleet: LocalFleet) -> None:
    url = local_fleet.urls[0]
    async with EnvClient(url, token=local_fleet.token, request_timeout=30) as client:
        sids = [client.new_sid() for _ in range(64)]
        await asyncio.gather(*(client.open(s) for s in sids))
        await asyncio.gather(*(client.reset(s) for s in sids))

        async def hammer(sid: int) -> None:
            while True:
                result = await client.step(sid, 1)
                if result.terminated:
                    await client.reset(sid)

        tasks = [asyncio.create_task(hammer(s)) for s in sids]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        os.kill(local_fleet.pid(url), signal.SIGKILL)
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending, "calls hung after the server died"
        assert time.monotonic() - killed_at < 1.0
        for task in done:
            assert isinstance(task.exception(), EnvCrashed)
            assert task.exception().server == url
        assert client.state is ClientState.BROKEN
        with pytest.raises(EnvCrashed):
            await client.step(sids[0], 1)


async def test_closed_client_refuses_calls(local_fleet: LocalFleet) -> None:
    client = await EnvClient(local_fleet.urls[0], token=local_fleet.token).connect()
    await client.close()
    with pytest.raises(PoolClosed):
        await client.open(1)


async def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(EnvCrashed, match="cannot connect"):
        await EnvClient("http://127.0.0.1:1", connect_timeout=2).connect()
