"""The embedded default backend: envserver subprocesses on 127.0.0.1.

Each server gets a free port (it binds port 0 and prints its URL) and watches its
standard input: when this process goes away, by any exit or signal, the pipe closes
and the servers stop by themselves. ``stop()`` terminates and reaps them explicitly.

Every pool's servers require a bearer token (random unless the config names one). It
travels as the first line of the server's standard input (``--token-file -``): never in
its environment or command line, which code the server runs could read.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from ..config import FleetConfig
from ..errors import FleetError
from .base import FleetBackend, pool_token
from .health import wait_healthy


class _Server:
    __slots__ = ("index", "process", "url", "log")

    def __init__(self, index: int, process: asyncio.subprocess.Process, log: Path) -> None:
        self.index = index
        self.process = process
        self.url = ""
        self.log = log


class LocalFleet(FleetBackend):
    """``servers`` envserver processes on this machine."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.token: str = pool_token(config)
        self._servers: dict[str, _Server] = {}
        self._starting: set[_Server] = set()  # spawned, not yet healthy
        self._next_index = 0
        self._logdir: Path | None = None

    @property
    def urls(self) -> list[str]:
        return list(self._servers)

    def describe(self, url: str) -> str:
        server = self._servers.get(url)
        if server is None:
            return url
        return f"local server #{server.index} (pid {server.process.pid}, {url})"

    def pid(self, url: str) -> int:
        return self._servers[url].process.pid

    async def start(self) -> list[str]:
        self._logdir = Path(tempfile.mkdtemp(prefix="envfleet-local-"))
        async with self._stopped_if_start_fails():
            await asyncio.gather(*(self._spawn() for _ in range(self.config.server_count())))
        return self.urls

    async def replace(self, url: str) -> str:
        server = self._servers.pop(url, None)
        if server is not None:
            await _terminate(server)
        return await self._spawn()

    async def stop(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        starting, self._starting = list(self._starting), set()
        await asyncio.gather(*(_terminate(s) for s in servers + starting))
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None

    async def _spawn(self) -> str:
        assert self._logdir is not None, "start() first"
        index, self._next_index = self._next_index, self._next_index + 1
        log = self._logdir / f"server-{index}.log"
        args = [sys.executable, "-m", "envserver", "--host", "127.0.0.1", "--port", "0", "--exit-with-stdin", "--no-web", "--token-file", "-"]
        with open(log, "wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *args, *self.config.server_args(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr
            )
        server = _Server(index, process, log)
        self._starting.add(server)
        deadline = time.monotonic() + self.config.start_timeout
        try:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(self.token.encode() + b"\n")  # the pipe stays open: --exit-with-stdin watches it
            await asyncio.wait_for(process.stdin.drain(), max(0.1, deadline - time.monotonic()))
            line = await asyncio.wait_for(process.stdout.readline(), max(0.1, deadline - time.monotonic()))
            if not line.startswith(b"envserver ") or "http://" not in line.decode(errors="replace"):
                raise ConnectionError("exited before it was listening")
            server.url = line.decode().split()[-1]

            async def dead() -> str | None:
                return None if process.returncode is None else f"exited with code {process.returncode}"

            async with aiohttp.ClientSession() as http:
                await wait_healthy(http, server.url, deadline, token=self.token, dead=dead)
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError) as exc:
            self._starting.discard(server)
            await _terminate(server)
            detail = _failure_detail(log) or str(exc) or type(exc).__name__
            raise FleetError(f"local server #{index} failed to start: {detail}", server=server.url or None) from exc
        self._starting.discard(server)
        self._servers[server.url] = server
        return server.url


async def _terminate(server: _Server, grace: float = 5.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reap."""
    process = server.process
    if process.returncode is None:
        try:
            process.terminate()
            await asyncio.wait_for(process.wait(), grace)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile (uvloop raises then)
                process.kill()
            await process.wait()
    if process.stdin is not None:
        process.stdin.close()
    await process.wait()


def _failure_detail(log: Path) -> str:
    """The server's own error line, or the end of its log."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    for line in reversed(lines):
        if line.startswith("envserver: error:"):
            return line.removeprefix("envserver: error:").strip()
    return " | ".join(lines[-3:])
