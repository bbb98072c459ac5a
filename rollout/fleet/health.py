"""Waiting for a server to answer ``GET /health``, with a deadline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp


async def wait_healthy(
    http: aiohttp.ClientSession,
    url: str,
    deadline: float,
    *,
    token: str | None = None,
    alive: asyncio.Future[Any] | None = None,
) -> None:
    """Poll ``url``/health until it answers 200; raise ``TimeoutError`` at ``deadline`` (monotonic).

    ``alive``, if given, is a future that completes when the server is known to be dead,
    which ends the wait early with ``ConnectionError``.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    delay = 0.02
    while True:
        if alive is not None and alive.done():
            raise ConnectionError(f"{url} exited before it became healthy")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{url} did not answer /health in time")
        try:
            timeout = aiohttp.ClientTimeout(total=min(2.0, remaining))
            async with http.get(f"{url}/health", headers=headers, timeout=timeout) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass  # not listening yet
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.25)
