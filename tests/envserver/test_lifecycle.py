"""Process life cycle of a real envserver: clean SIGTERM, quiet client disconnects."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp

# A client that opens a /ws session and a /v1/mux session mid-episode, says so, and waits to be killed.
CLIENT = """
import asyncio, sys
import aiohttp
from envserver.protocol import Open, Reset, Step, msgpack_encoder

async def main(url):
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url + "/ws")
        await ws.send_json({"type": "reset"})
        await ws.receive()
        await ws.send_json({"type": "step", "data": {"action_id": 1}})
        await ws.receive()
        mux = await http.ws_connect(url + "/v1/mux")
        await mux.send_bytes(msgpack_encoder.encode([Open(1, 1), Reset(2, 1, 0), Step(3, 1, 1)]))
        await mux.receive()
        await mux.send_bytes(msgpack_encoder.encode([Step(4, 1, 1)] * 200))  # left unread
        print("ready", flush=True)
        await asyncio.sleep(60)

asyncio.run(main(sys.argv[1]))
"""


async def wait_for_free_slots(http: aiohttp.ClientSession, ws_url: str, count: int, timeout: float = 5.0) -> None:
    """Open ``count`` /ws sessions at once (proves the server freed everything else)."""
    deadline = time.monotonic() + timeout
    while True:
        sockets = [await http.ws_connect(ws_url + "/ws") for _ in range(count)]
        try:
            for ws in sockets:
                await ws.send_json({"type": "state"})
            kinds = [(await ws.receive_json(timeout=10))["type"] for ws in sockets]
        finally:
            for ws in sockets:
                await ws.close()
        if kinds == ["state"] * count:
            return
        assert time.monotonic() < deadline, kinds
        await asyncio.sleep(0.05)


async def test_killed_client_logs_no_traceback(spawn_server, http) -> None:
    server = spawn_server("--game", "catch", "--max-sessions", "2", "--log-level", "info")
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(client.stdout.readline), 30)  # type: ignore[union-attr]
        assert line == b"ready\n", client.stderr.read() if client.poll() is not None else line  # type: ignore[union-attr]
        client.send_signal(signal.SIGKILL)
    finally:
        client.kill()
        client.wait()
        client.stdout.close()  # type: ignore[union-attr]
        client.stderr.close()  # type: ignore[union-attr]
    await wait_for_free_slots(http, server.ws_url, 2)  # both sessions of the dead client were freed
    async with http.get(server.url + "/health") as r:
        assert r.status == 200
    assert "Traceback" not in server.stderr(), server.stderr()
    assert server.terminate() == 0
    assert "Traceback" not in server.stderr(), server.stderr()


async def test_abrupt_disconnects_log_no_traceback(spawn_server, http) -> None:
    server = spawn_server("--game", "catch", "--log-level", "info")
    for path in ("/ws", "/v1/mux"):
        for _ in range(3):
            ws = await http.ws_connect(server.ws_url + path)
            if path == "/ws":
                await ws.send_json({"type": "reset"})
            else:
                await ws.send_bytes(b"\x91\x93\xa4ping\x01\x00")
            await ws.receive(timeout=10)
            ws._response.connection.transport.abort()  # no close frame, just a reset connection
            ws._response.close()
    await asyncio.sleep(0.3)
    async with http.get(server.url + "/health") as r:
        assert r.status == 200
    assert server.terminate() == 0
    assert "Traceback" not in server.stderr(), server.stderr()


async def test_sigterm_exits_cleanly_and_quickly(spawn_server, http) -> None:
    server = spawn_server("--game", "catch")
    ws = await http.ws_connect(server.ws_url + "/ws")
    mux = await http.ws_connect(server.ws_url + "/v1/mux")
    try:
        await ws.send_json({"type": "reset"})
        await ws.receive(timeout=10)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 10)
        elapsed = time.monotonic() - start
    finally:
        await ws.close()
        await mux.close()
    assert code == 0, server.stderr()
    assert elapsed < 3.0, elapsed
    assert "Traceback" not in server.stderr(), server.stderr()


def test_sigterm_when_idle(spawn_server) -> None:
    server = spawn_server("--env", "echo")
    start = time.monotonic()
    assert server.terminate() == 0
    assert time.monotonic() - start < 2.0
    assert "Traceback" not in server.stderr()


def test_bad_configuration_is_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "envserver", "--port", "0", "--game", "no_such_game"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no_such_game" in result.stderr and "Traceback" not in result.stderr
