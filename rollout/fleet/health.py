"""Waiting for a server to answer ``GET /health``, with a deadline: the one health-wait loop of the project."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp

#: Why a server is known dead (e.g. "exited with code 1"), or None while it may still come up.
DeathCheck = Callable[[], Awaitable[str | None]]

_FIRST_DELAY, _MAX_DELAY, _GROWTH = 0.02, 0.25, 1.5


async def wait_healthy(
    http: aiohttp.ClientSession,
    url: str,
    deadline: float,
    *,
    token: str | None = None,
    dead: DeathCheck | None = None,
) -> None:
    """Poll ``url``/health until it answers 200; raise ``TimeoutError`` at ``deadline`` (monotonic).

    Between probes, ``dead()`` (if given) says whether the server is known to be dead,
    which ends the wait early with ``ConnectionError``. While nothing listens on the port,
    a bare TCP connect stands in for the HTTP request (it is far cheaper). Both errors'
    messages end with the last probe's outcome.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    parts = urlsplit(url)
    delay, last = _FIRST_DELAY, "no answer yet"
    while True:
        if dead is not None and (reason := await dead()) is not None:
            raise ConnectionError(f"{url} {reason} before it answered /health (last: {last})")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{url} did not answer /health in time (last: {last})")
        if parts.hostname and parts.port and not await _port_open(parts.hostname, parts.port):
            last = "connection refused"
        else:
            try:
                timeout = aiohttp.ClientTimeout(total=min(2.0, remaining))
                async with http.get(f"{url}/health", headers=headers, timeout=timeout) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = type(exc).__name__  # not listening yet
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * _GROWTH, _MAX_DELAY)


async def _port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host``:``port``."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except OSError:
            return False
    return True
