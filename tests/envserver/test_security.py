"""Security settings of a real envserver not covered by test_auth.py: loopback by default, the
per-connection session limit, and no token in any log or command line.

The Docker side (hardened containers, the pool's random token) is in
tests/rollout/test_docker_reliability.py.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from envserver.__main__ import parse_args
from envserver.protocol import ErrorCode
from rollout import EnvPool
from rollout.errors import CapacityReached
from tests.conftest import ServerProcess

TOKEN = "tok-" + "9f3c1e7a5b2d" * 3  # long and unusual: any appearance in a log is this token

# An envserver whose connections may hold two mux sessions each (no CLI flag sets this).
TWO_PER_CONNECTION = """
import sys, uvloop
from envserver.__main__ import serve
from envserver.config import ServerConfig
uvloop.run(serve(ServerConfig(envs=("openspiel",), env_options={"game": "catch"}, port=0, max_sessions_per_connection=2)))
"""


def test_servers_bind_loopback_unless_told_otherwise(catch_server) -> None:
    assert parse_args([]).host == "127.0.0.1"
    assert catch_server.url.startswith("http://127.0.0.1:")


async def test_per_connection_session_limit(spawn_server, mux_connect) -> None:
    server = spawn_server(script=TWO_PER_CONNECTION)
    mux = await mux_connect(server)
    await mux.one("open", 1)
    await mux.one("open", 2)
    (reply,) = await mux.call(mux.req("open", 3))
    assert not reply.ok and reply.body["code"] == ErrorCode.CAPACITY_REACHED
    assert "per connection" in reply.body["message"]
    other = await mux_connect(server)  # the limit is per connection, not per server
    await other.one("open", 1)
    await mux.one("close", 1)
    await mux.one("open", 3)  # a closed session frees its place


async def test_token_appears_in_no_log(http, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = ServerProcess(("--game", "catch", "--log-level", "debug", "--token-file", str(token_file)))
    try:
        server.wait_ready(token=TOKEN)
        await _use_with_and_without_token(server, http)
        assert TOKEN not in Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        server.terminate()
        logs = server.stderr() + server.stdout_path.read_text(errors="replace")
    finally:
        server.stop()
    assert "listening on" in logs and TOKEN not in logs


async def _use_with_and_without_token(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    good = {"Authorization": f"Bearer {TOKEN}"}
    for headers in (good, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}, {}):
        async with http.get(server.url + "/health", headers=headers) as r:
            assert r.status == (200 if headers is good else 401)
    with pytest.raises(aiohttp.WSServerHandshakeError):  # a wrong token in the query string is refused too
        await http.ws_connect(server.ws_url + f"/web/ws?token={TOKEN}x")
    ws = await http.ws_connect(server.ws_url + "/ws", headers=good)
    await ws.send_json({"type": "reset"})
    await ws.receive(timeout=10)
    await ws.close()


async def test_local_pool_token_stays_out_of_logs_and_command_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with EnvPool(n=2, game="catch", servers=1, token=TOKEN) as pool:
        backend = pool.backend
        assert backend is not None
        pid = backend.pid(pool.servers[0])  # type: ignore[attr-defined]
        assert TOKEN not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        await pool.reset(seeds=[1, 2])
        async with aiohttp.ClientSession() as http, http.get(pool.servers[0] + "/health") as r:
            assert r.status == 401
        os.kill(pid, signal.SIGKILL)  # death and replacement are logged: without the token
        records = [r async for r in pool.run(lambda obs: obs.legal_actions[0], episodes=8, seed=3)]
        assert len(records) == 8
        logdir = backend._logdir  # type: ignore[attr-defined]
        server_logs = "".join(p.read_text(errors="replace") for p in Path(logdir).glob("*.log"))
    assert TOKEN not in caplog.text and TOKEN not in server_logs
    assert "replacing it" in caplog.text


async def test_refused_session_on_a_full_server_is_typed(spawn_server) -> None:
    from rollout.client import EnvClient

    server = spawn_server("--game", "catch", "--max-sessions", "1")
    async with EnvClient(server.url) as client:
        await client.open(client.new_sid())
        with pytest.raises(CapacityReached) as info:
            await client.open(client.new_sid())
        assert info.value.server == server.url and info.value.request is not None
