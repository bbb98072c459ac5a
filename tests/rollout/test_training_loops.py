"""What training loops do to the client and pool: pause, send odd actions, lose servers.

Each test drives one bad case against real servers (or, for protocol violations, a real
misbehaving WebSocket server on 127.0.0.1) and asserts a clear error within a bounded
time, with the connection and every other env still usable. Hang checks use
``asyncio.timeout``: a regression fails the test instead of blocking it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import web

from envserver.protocol import Batch, OpenResult, Reply, StepResult, msgpack_encoder, mux_request_decoder
from rollout import (
    EnvClient,
    EnvPool,
    FleetError,
    InvalidAction,
    PoolConfig,
    ProtocolError,
    RequestTimeout,
    RequestTooLarge,
    UnencodableAction,
    UnknownSession,
)
from rollout.client import ClientState
from rollout.fleet.local import LocalFleet


def first_legal(observation: Any) -> int:
    return int(observation.legal_actions[0])


# --------------------------------------------------------------------------- numpy and unencodable actions


async def test_numpy_actions_are_plain_values_and_an_unencodable_one_fails_alone(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sids = [client.new_sid() for _ in range(4)]
        await asyncio.gather(*(client.open(s) for s in sids))
        await asyncio.gather(*(client.reset(s, seed=s) for s in sids))
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                client.step(sids[0], np.int64(1)),
                client.step(sids[1], np.int32(2)),
                client.step(sids[2], np.array(0)),  # a 0-d array
                client.step(sids[3], object()),  # msgpack cannot carry it
                return_exceptions=True,
            )
        assert all(isinstance(r, StepResult) for r in results[:3]), results
        error = results[3]
        assert isinstance(error, UnencodableAction) and isinstance(error, TypeError)
        assert error.env == sids[3] and "cannot encode" in str(error) and "object" in str(error)
        assert client.state is ClientState.OPEN
        async with asyncio.timeout(10):  # the connection and the env that got the bad action keep working
            assert (await client.step(sids[3], 1)).observation.game_phase == "playing"
            batch = await client.batch("step", sids, np.array([1, 1, 1, 1]))
            assert all(isinstance(r, StepResult) for r in batch)
            batch = await client.batch("step", sids, [1, np.array([object()]), np.int64(1), 1])  # holds an unencodable object
            assert isinstance(batch[1], UnencodableAction) and batch[1].env == sids[1]
            assert all(isinstance(r, StepResult) for r in (batch[0], batch[2], batch[3]))


async def test_pool_steps_with_a_numpy_action_array() -> None:
    async with EnvPool(n=4, game="catch", servers=1) as pool:
        await pool.reset(seeds=range(4))
        async with asyncio.timeout(10):
            results = await pool.step(np.array([0, 1, 2, 1], dtype=np.int64))
            assert all(r.observation.game_phase == "playing" for r in results)
            assert (await pool.envs[0].step(np.int32(1))).observation.game_phase == "playing"


# --------------------------------------------------------------------------- the writer never dies silently


async def test_a_writer_that_cannot_send_breaks_the_client(local_fleet: LocalFleet) -> None:
    async with EnvClient(local_fleet.urls[0], token=local_fleet.token) as client:
        sid = client.new_sid()
        await client.open(sid)
        await client.reset(sid, seed=1)

        async def broken_send(data: bytes) -> None:
            raise OSError(9, "Bad file descriptor")

        client._ws.send_bytes = broken_send  # type: ignore[union-attr, method-assign]  # what a dead socket does
        async with asyncio.timeout(5):
            with pytest.raises(Exception) as info:
                await client.step(sid, 1)
            await client.wait_broken()
        assert "Bad file descriptor" in str(info.value)
        assert client.state is ClientState.BROKEN and "send failed" in client.broken_reason


# --------------------------------------------------------------------------- oversized requests


async def test_oversized_requests_fail_alone_before_sending_and_on_the_server() -> None:
    async with EnvPool(n=4, env="echo", servers=1, max_frame_bytes=64 * 1024) as pool:
        await pool.reset()
        frames = pool.clients[0].frames_sent
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                pool.envs[0].step({"message": "x" * 100_000}), pool.envs[1].step({"message": "fits"}), return_exceptions=True
            )
        assert isinstance(results[0], RequestTooLarge) and isinstance(results[0], ValueError)
        assert "65,536" in str(results[0]) and "not sent" in str(results[0]) and results[0].env == 0
        assert isinstance(results[1], StepResult)
        assert pool.clients[0].frames_sent == frames + 1  # only the step that fits went out
        assert not pool.replacements_log and pool.clients[0].state is ClientState.OPEN
        # A client that does not know the limit sends it; the server refuses that request alone.
        async with EnvClient(pool.servers[0], env="echo", token=pool.backend.token) as client:
            sid = client.new_sid()
            await client.open(sid)
            async with asyncio.timeout(10):
                with pytest.raises(RequestTooLarge) as info:
                    await client.step(sid, {"message": "y" * 100_000})
                assert info.value.code == "FRAME_TOO_LARGE" and info.value.request is not None
                assert client.state is ClientState.OPEN
                assert (await client.step(sid, {"message": "ok"})).observation.echoed_message == "ok"


# --------------------------------------------------------------------------- pauses


async def test_a_pool_that_pauses_longer_than_the_session_ttl_goes_on() -> None:
    async with EnvPool(n=8, game="catch", servers=1, idle_ttl=2.0, config=PoolConfig(n=8, heartbeat=0.5)) as pool:
        await pool.reset(seeds=range(8))
        await pool.step([1] * 8)
        await asyncio.sleep(5.0)  # a policy update, a checkpoint: longer than the TTL
        async with asyncio.timeout(10):
            results = await pool.step([1] * 8)
        assert all(r.observation.game_phase == "playing" for r in results)


async def test_an_expired_session_says_reset_and_reset_reopens_it() -> None:
    # No keepalive (heartbeat 0): the server expires the sessions while the caller sleeps.
    async with EnvPool(n=4, game="catch", servers=1, idle_ttl=1.0, config=PoolConfig(n=4, heartbeat=0)) as pool:
        await pool.reset(seeds=range(4))
        await asyncio.sleep(2.5)
        async with asyncio.timeout(10):
            with pytest.raises(UnknownSession) as info:
                await pool.envs[0].step(1)
            assert "expired" in str(info.value) and "reset" in str(info.value)
            await pool.envs[0].reset(seed=3)  # opens the session again
            assert (await pool.envs[0].step(1)).observation.game_phase == "playing"
            results = await pool.reset(seeds=range(4))  # a batched reset re-opens the others
            assert all(r.observation.game_phase == "initial" for r in results)


async def test_run_replays_episodes_whose_session_expired_during_a_pause() -> None:
    paused = False

    async def policy(observation: Any) -> int:
        nonlocal paused
        if not paused:
            paused = True
            await asyncio.sleep(2.5)  # one long pause inside the loop, past the TTL, without keepalive
        return first_legal(observation)

    async with EnvPool(n=2, game="catch", servers=1, idle_ttl=1.0, config=PoolConfig(n=2, heartbeat=0)) as pool:
        async with asyncio.timeout(30):
            records = [r async for r in pool.run(policy, episodes=6, seed=1)]
    assert sorted(r.episode for r in records) == list(range(6))
    assert sum(r.info.get("retries", 0) for r in records) >= 1


# --------------------------------------------------------------------------- retry policy of pool.run


async def test_run_replays_an_episode_that_timed_out_within_max_retries() -> None:
    config = PoolConfig(n=2, request_timeout=0.5, max_episode_retries=2)
    async with EnvPool(n=2, game="catch", servers=1, config=config) as pool:
        pid = pool.backend.pid(pool.servers[0])  # type: ignore[union-attr]
        stopped = False

        def policy(observation: Any) -> int:
            nonlocal stopped
            if not stopped:  # freeze the server past the request deadline, once
                stopped = True
                os.kill(pid, signal.SIGSTOP)
                asyncio.get_running_loop().call_later(1.0, os.kill, pid, signal.SIGCONT)
            return first_legal(observation)

        async with asyncio.timeout(30):
            records = [r async for r in pool.run(policy, episodes=4, seed=2)]
        assert sorted(r.episode for r in records) == list(range(4))
        assert sum(r.info.get("retries", 0) for r in records) >= 1
        assert pool.clients[0].timeouts >= 1


async def test_run_gives_up_after_max_episode_retries() -> None:
    config = PoolConfig(n=1, request_timeout=0.3, max_episode_retries=0)
    async with EnvPool(n=1, game="catch", servers=1, config=config) as pool:
        pid = pool.backend.pid(pool.servers[0])  # type: ignore[union-attr]
        os.kill(pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(10):
                with pytest.raises(RequestTimeout) as info:
                    async for _ in pool.run(first_legal, episodes=2):
                        pass
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "max_episode_retries" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize(
    ("action", "error"),
    [(ValueError("the policy broke"), ValueError), (99, InvalidAction), (object(), UnencodableAction)],
    ids=["policy-raises", "invalid-action", "unencodable-action"],
)
async def test_run_aborts_without_replaying_on_policy_and_action_errors(action: Any, error: type[Exception]) -> None:
    calls = 0

    def policy(observation: Any) -> Any:
        nonlocal calls
        calls += 1
        if isinstance(action, Exception):
            raise action
        return action

    async with EnvPool(n=1, game="catch", servers=1) as pool:
        async with asyncio.timeout(10):
            with pytest.raises(error) as info:
                async for _ in pool.run(policy, episodes=3):
                    pass
        assert calls == 1  # not replayed
        assert getattr(info.value, "episode", None) == 0
        assert (await pool.envs[0].reset(seed=1)).observation.game_phase == "initial"  # the pool is fine


# --------------------------------------------------------------------------- failed replacements


async def test_a_replacement_that_fails_reaches_run_as_fleet_error(alive: Callable[[int], bool]) -> None:
    async with EnvPool(n=2, game="catch", servers=1, start_timeout=8.0) as pool:
        backend = pool.backend
        assert isinstance(backend, LocalFleet)
        pid = backend.pid(pool.servers[0])
        backend.config = msgspec.structs.replace(backend.config, env="no_such_env")  # every new server fails to start

        def policy(observation: Any) -> int:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
            return first_legal(observation)

        started = time.monotonic()
        async with asyncio.timeout(30):
            with pytest.raises(FleetError) as info:
                async for _ in pool.run(policy, episodes=4):
                    pass
        assert time.monotonic() - started < 8.0 + 3.0  # within the start timeout (and one attempt's slack)
        assert "cannot replace" in str(info.value) and "no_such_env" in str(info.value)
        with pytest.raises(FleetError):  # later calls say the same, at once
            async with asyncio.timeout(2):
                await pool.envs[0].reset()
        assert not any(task.done() for task in pool._watchers)  # the watcher keeps trying


# --------------------------------------------------------------------------- a misbehaving server


class FakeMux:
    """A real WebSocket server on 127.0.0.1 that answers opens and resets, and misbehaves on steps."""

    def __init__(self, misbehave: str) -> None:
        self.misbehave = misbehave
        self.url = ""

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            replies = []
            for req in mux_request_decoder.decode(message.data):
                op = type(req).__name__
                if op == "Open":
                    replies.append(Reply(req.id, True, OpenResult(req.sid, "echo")))
                elif op == "Ping":
                    replies.append(Reply(req.id, True, None))
                elif self.misbehave == "short":  # one result fewer than sessions
                    results = [StepResult({"echoed_message": "", "message_length": 0})] * (len(req.sids) - 1)
                    replies.append(Reply(req.id, True, Batch(results)))
                elif self.misbehave == "unknown-id":
                    replies.append(Reply(req.id + 1000, True, Batch([None] * len(req.sids))))
                # "silent": no answer at all
            if replies:
                await ws.send_bytes(msgpack_encoder.encode(replies))
        return ws


@pytest.fixture
async def fake_mux(request: pytest.FixtureRequest) -> AsyncIterator[FakeMux]:
    fake = FakeMux(request.param)
    app = web.Application()
    app.router.add_get("/v1/mux", fake.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fake_mux", ["short", "unknown-id"], indirect=True)
async def test_replies_that_break_the_protocol_fail_their_calls(fake_mux: FakeMux) -> None:
    async with EnvClient(fake_mux.url, env="echo") as client:
        sids = [client.new_sid() for _ in range(3)]
        await asyncio.gather(*(client.open(s) for s in sids))
        async with asyncio.timeout(5):
            joined = await asyncio.gather(*(client.step(s, {"message": "a"}) for s in sids), return_exceptions=True)
        assert all(isinstance(r, ProtocolError) for r in joined), joined
        assert "protocol error" in str(joined[0])
        assert client.state is ClientState.BROKEN  # the pool would replace this server


@pytest.mark.parametrize("fake_mux", ["short"], indirect=True)
async def test_a_short_reply_to_a_batch_fails_the_batch(fake_mux: FakeMux) -> None:
    async with EnvClient(fake_mux.url, env="echo") as client:
        sids = [client.new_sid() for _ in range(3)]
        await asyncio.gather(*(client.open(s) for s in sids))
        async with asyncio.timeout(5):
            results = await client.batch("step", sids, [{"message": "a"}] * 3)
        assert all(isinstance(r, ProtocolError) for r in results)


@pytest.mark.parametrize("fake_mux", ["silent"], indirect=True)
async def test_the_deadline_holds_after_a_batch_is_split_and_timeouts_are_counted(fake_mux: FakeMux) -> None:
    async with EnvClient(fake_mux.url, env="echo", request_timeout=1.0, max_frame_bytes=400) as client:
        sids = [client.new_sid() for _ in range(8)]
        await asyncio.gather(*(client.open(s) for s in sids))
        frames = client.frames_sent
        async with asyncio.timeout(4):
            results = await client.batch("step", sids, [{"message": "m" * 60}] * 8)
        assert client.frames_sent - frames > 1  # it was split to fit 400 bytes
        assert all(isinstance(r, RequestTimeout) for r in results)
        assert client.timeouts == 8
