"""EnvPool and ``rollout eval`` driving an unmodified OpenEnv server (openenv-core under uvicorn).

The server is ``loadtests/openenv_catch.py``: catch written against OpenEnv's ``Environment``,
served by OpenEnv's own ``create_app``; the pool reaches it as ``openenv+ws://host:port``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout import CapacityReached, EnvCrashed, EnvError, EnvPool
from rollout.openenv_client import OpenEnvClient, http_url, is_openenv_url

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "loadtests" / "openenv_catch.py"


class OpenEnvServer:
    """``openenv_catch.py`` on a fixed port; ``restart()`` brings it back on the same one."""

    def __init__(self, max_sessions: int = 8) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.max_sessions = max_sessions
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"openenv+ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MAX_CONCURRENT_ENVS": str(self.max_sessions), "ENABLE_WEB_INTERFACE": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--port", str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # bounded: the server prints or exits
        assert line.startswith("openenv-catch listening on "), f"OpenEnv server did not start: {line!r}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()

    def restart(self) -> None:
        self.kill()
        deadline = time.monotonic() + 10
        while True:  # the port is free again once the killed process is reaped
            try:
                self.start()
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture(scope="module")
def openenv_server() -> Iterator[OpenEnvServer]:
    """One OpenEnv server for the tests that leave it as they found it (they close their sessions)."""
    server = OpenEnvServer()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_openenv_server() -> Iterator[OpenEnvServer]:
    server = OpenEnvServer()
    try:
        yield server
    finally:
        server.kill()


def test_urls() -> None:
    assert is_openenv_url("openenv+ws://h:1") and not is_openenv_url("http://h:1")
    assert http_url("openenv+ws://h:1/") == "http://h:1" and http_url("openenv+wss://h") == "https://h"
    assert http_url("http://h:2") == "http://h:2"


async def test_pool_runs_episodes_on_an_openenv_server(openenv_server: OpenEnvServer) -> None:
    async with EnvPool(n=4, env="openenv", backend="endpoints", endpoints=(openenv_server.url,)) as pool:
        assert isinstance(pool.clients[0], OpenEnvClient)
        first = await pool.reset(seeds=[3, 3, 4, 5])
        assert first[0].observation == first[1].observation  # OpenEnv's catch honours the seed
        assert first[0].observation["legal_actions"] == [0, 1, 2] and first[0].reward == 0.0
        results = await pool.step([1, {"action_id": 1}, 0, 2])  # a bare id is sent as action_id
        assert all(not r.terminated for r in results)
        state = await pool.envs[0].state()
        assert state["step_count"] == 1
        records = [r async for r in pool.run(lambda obs: obs["legal_actions"][0], episodes=10, seed=1)]
        assert sorted(r.episode for r in records) == list(range(10))
        assert all(r.length == 9 and r.reward in (1.0, -1.0) for r in records)
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("openenv-read")] == []  # every reader stopped


async def test_vector_refuses_an_openenv_server(openenv_server: OpenEnvServer) -> None:
    async with EnvPool(n=2, env="openenv", backend="endpoints", endpoints=(openenv_server.url,)) as pool:
        with pytest.raises(ValueError, match="columnar calls, which the OpenEnv server openenv\\+ws://.* lacks"):
            pool.vector()


async def test_bad_action_and_capacity_are_coded_per_session(openenv_server: OpenEnvServer) -> None:
    async with EnvPool(n=10, env="openenv", backend="endpoints", endpoints=(openenv_server.url,)) as pool:
        results = await pool.reset(return_exceptions=True)  # the server allows 8 sessions
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(refused) == 2 and all(isinstance(r, CapacityReached) for r in refused), results
        ok = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
        from rollout import InvalidAction

        with pytest.raises(InvalidAction, match="VALIDATION_ERROR"):
            await pool.envs[ok[0]].step({"action_id": "left"})
        assert not (await pool.envs[ok[0]].step({"action_id": 1})).terminated  # the session goes on
        with pytest.raises(CapacityReached):
            await pool.envs[results.index(refused[0])].step({"action_id": 1})  # a refused session stays refused


@pytest.mark.slow
async def test_a_killed_openenv_server_is_replaced_and_its_episodes_replayed(own_openenv_server: OpenEnvServer) -> None:
    openenv_server = own_openenv_server
    async with EnvPool(n=4, env="openenv", backend="endpoints", endpoints=(openenv_server.url,), start_timeout=30) as pool:
        env = pool.envs[0]
        await env.reset(seed=1)
        openenv_server.kill()
        with pytest.raises(EnvCrashed):
            await env.step({"action_id": 1})
        openenv_server.restart()
        records = [r async for r in pool.run(lambda obs: 1, episodes=8, seed=2)]
        assert len(records) == 8 and len(pool.replacements_log) == 1


def test_rollout_eval_against_an_openenv_server(openenv_server: OpenEnvServer, tmp_path: Path) -> None:
    out = tmp_path / "eval.jsonl"
    command = [
        sys.executable, "-m", "rollout.cli", "eval", "--backend", "endpoints", "--endpoint", openenv_server.url,
        "--env", "openenv", "--n", "4", "--episodes", "12", "--seed", "5", "--out", str(out), "--summary-json", "-",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["episodes"] == 12, summary
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    episodes = [line for line in lines if "episode" in line]
    assert sorted(e["episode"] for e in episodes) == list(range(12))
    assert all(e["length"] == 9 and e["return"] in (1.0, -1.0) and e["server"].startswith("openenv+ws:") for e in episodes)


async def _hostile_server(behaviour: str):
    """A WebSocket server on 127.0.0.1:0 that misbehaves as told; returns (runner, openenv+ws URL)."""
    from aiohttp import web

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if behaviour == "garbage":
                await ws.send_str("{not json")
            elif behaviour == "wrong-shape":
                await ws.send_str('{"type": "observation", "data": {"reward": "lots"}}')
            # "silent": never answers
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"openenv+ws://127.0.0.1:{port}"


async def test_a_silent_server_times_out_and_the_session_is_abandoned() -> None:
    runner, url = await _hostile_server("silent")
    try:
        async with OpenEnvClient(url, request_timeout=0.5) as client:
            await client.open(1)
            from rollout import RequestTimeout, UnknownSession

            with pytest.raises(RequestTimeout, match="session abandoned"):
                await client.reset(1)
            with pytest.raises(UnknownSession):  # a late reply could never be matched again
                await client.step(1, 0)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("behaviour", "error", "message"),
    [("garbage", EnvCrashed, "unreadable frame"), ("wrong-shape", EnvError, "cannot decode reply")],
)
async def test_unreadable_replies_are_errors_not_hangs(behaviour: str, error: type[Exception], message: str) -> None:
    runner, url = await _hostile_server(behaviour)
    try:
        async with OpenEnvClient(url, request_timeout=5) as client:
            await client.open(1)
            with pytest.raises(error, match=message):
                await asyncio.wait_for(client.reset(1), 10)
    finally:
        await runner.cleanup()
