"""The local backend: servers stop with the pool, on SIGTERM, and when their owner dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout.config import FleetConfig
from rollout.errors import FleetError
from rollout.fleet.local import LocalFleet

DRIVER = textwrap.dedent(
    """
    import asyncio, sys
    from rollout import EnvPool

    async def main():
        async with EnvPool(n=4, game="catch", servers=2) as pool:
            print(" ".join(str(pool.backend.pid(u)) for u in pool.servers), flush=True)
            while True:
                await pool.step([1, 1, 1, 1], return_exceptions=True)
                await asyncio.sleep(0.01)

    asyncio.run(main())
    """
)


async def _driver_with_servers(tmp_path: Path) -> tuple[asyncio.subprocess.Process, list[int]]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2
    return process, pids


async def _gone(pids: list[int], alive, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.05)):
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
async def test_servers_stop_when_the_client_process_is_signalled(tmp_path: Path, alive, sig: int) -> None:  # type: ignore[no-untyped-def]
    process, pids = await _driver_with_servers(tmp_path)
    try:
        assert all(alive(pid) for pid in pids)
        process.send_signal(sig)
        await asyncio.wait_for(process.wait(), 15)
        if sig != signal.SIGKILL:
            assert process.returncode != 0 or sig == signal.SIGINT
        assert await _gone(pids, alive), f"servers {pids} outlived their client after {sig!r}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_failed_start_leaves_nothing_running(alive) -> None:  # type: ignore[no-untyped-def]
    before = set(_envserver_pids())
    fleet = LocalFleet(FleetConfig(servers=3, env_options={"game": "no_such_game"}))
    with pytest.raises(FleetError, match="unknown game 'no_such_game'"):
        await fleet.start()
    assert fleet.urls == []
    assert await _gone([p for p in _envserver_pids() if p not in before], alive)


async def test_replace_gives_a_new_healthy_server(local_fleet: LocalFleet, alive) -> None:  # type: ignore[no-untyped-def]
    old = local_fleet.urls[0]
    pid = local_fleet.pid(old)
    new = await local_fleet.replace(old)
    assert new != old and new in local_fleet.urls and old not in local_fleet.urls
    assert await _gone([pid], alive)
    assert len(local_fleet.urls) == 2


def _envserver_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"envserver" in cmdline and b"--exit-with-stdin" in cmdline:
                pids.append(int(entry))
    return pids


async def test_the_health_wait_ends_at_its_deadline_or_when_the_server_is_known_dead() -> None:
    import socket
    import time

    import aiohttp

    from rollout.fleet.health import wait_healthy

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="connection refused"):
            await wait_healthy(http, url, time.monotonic() + 0.5)
        assert time.monotonic() - started < 1.5

        async def dead() -> str | None:
            return "exited with code 3"

        with pytest.raises(ConnectionError, match="exited with code 3"):
            await asyncio.wait_for(wait_healthy(http, url, time.monotonic() + 30, dead=dead), 2.0)
