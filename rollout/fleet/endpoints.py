"""Servers someone else runs: a list of URLs, or one DNS name resolved to all its addresses.

``openenv+ws://host:port`` names an unmodified OpenEnv server, driven over its ``WS /ws``
(``rollout.openenv_client``). ``dns://name:port`` suits a Kubernetes headless Service, whose name resolves to one
address per ready pod; the name is resolved again whenever a server has to be replaced.
"""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

import aiohttp

from ..config import FleetConfig
from ..errors import FleetError
from ..openenv_client import http_url
from .base import FleetBackend
from .health import wait_healthy


async def resolve(name: str, port: int) -> list[str]:
    """Every address ``name`` resolves to, as ``http://addr:port`` URLs, in a stable order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(name, port, type=socket.SOCK_STREAM), 10.0)
    except (OSError, UnicodeError, asyncio.TimeoutError) as exc:  # UnicodeError: not a valid host name
        raise FleetError(f"cannot resolve {name!r}: {exc}") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


class EndpointsFleet(FleetBackend):
    """Use running servers; never starts or stops any."""

    def __init__(self, config: FleetConfig) -> None:
        if not config.endpoints:
            raise FleetError("backend 'endpoints' needs at least one URL or dns://name:port")
        self.config = config
        self.token = config.token
        self._urls: list[str] = []

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    async def _discover(self) -> list[str]:
        urls: list[str] = []
        for endpoint in self.config.endpoints:
            if endpoint.startswith("dns://"):
                parts = urlsplit(endpoint)
                if not parts.hostname:
                    raise FleetError(f"bad endpoint {endpoint!r}: expected dns://name:port")
                urls += await resolve(parts.hostname, parts.port or 8000)
            else:  # http://host:port (envserver) or openenv+ws://host:port (an OpenEnv server)
                urls.append(endpoint.rstrip("/"))
        return list(dict.fromkeys(urls))

    async def start(self) -> list[str]:
        urls = await self._discover()
        deadline = time.monotonic() + self.config.start_timeout
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(
                *(wait_healthy(http, http_url(url), deadline, token=self.token) for url in urls), return_exceptions=True
            )
        healthy = [url for url, result in zip(urls, results) if result is None]
        if not healthy:
            raise FleetError(f"no endpoint answered /health: {', '.join(urls) or 'none resolved'}")
        self._urls = healthy
        return self.urls

    async def replace(self, url: str) -> str:
        """Re-discover and return a healthy server not in use (or ``url`` itself once it recovers)."""
        if url in self._urls:
            self._urls.remove(url)
        deadline = time.monotonic() + self.config.start_timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                for candidate in await self._discover():
                    if candidate in self._urls:
                        continue
                    try:
                        await wait_healthy(http, http_url(candidate), min(deadline, time.monotonic() + 2.0), token=self.token)
                    except TimeoutError:
                        continue
                    self._urls.append(candidate)
                    return candidate
                await asyncio.sleep(0.5)
        raise FleetError(f"no healthy replacement for {url} among {', '.join(self.config.endpoints)}", server=url)

    async def stop(self) -> None:
        self._urls = []
