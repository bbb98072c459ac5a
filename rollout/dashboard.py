"""A live page of a running ``rollout bench`` / ``rollout eval``, served on 127.0.0.1.

    async with Dashboard(telemetry, port=0) as dashboard:   # port 0: a free port
        print(dashboard.url)
        ...                                                  # the command runs, updating telemetry

Routes: ``GET /`` (the page, ``dashboard_static/``), ``GET /api/status`` (JSON). Two tasks
run while it is open: a sampler turns the telemetry's totals into a throughput history
and latency percentiles once per ``interval``, and a scraper reads each pool server's
``GET /metrics`` (with the pool's token and a timeout) for its sessions, steps/s and errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from .client import ClientState
from .telemetry import LatencyHistogram, Telemetry

STATIC = Path(__file__).parent / "dashboard_static"
HISTORY_POINTS = 600  # samples kept for the chart (10 minutes at one per second)
LATENCY_WINDOW = 20  # samples (intervals) the latency percentiles are taken over (the most recent ones)
HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'self'; img-src 'self' data:",
    "x-content-type-options": "nosniff",
}


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of Prometheus text as ``{name: value}``."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


class ServerView:
    """What the dashboard knows about one server of the pool."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.state = "up"  # up | down | replaced
        self.sessions: float | None = None
        self.steps_per_s: float | None = None
        self.errors: float | None = None
        self.problem = ""
        self._last: tuple[float, float] | None = None  # (monotonic time, steps total) of the last scrape

    def scraped(self, samples: dict[str, float], now: float) -> None:
        steps = samples.get("envserver_steps_total")
        self.sessions = samples.get("envserver_sessions_active")
        self.errors = samples.get("envserver_errors_total")
        if steps is not None:
            if self._last is not None and now > self._last[0]:
                self.steps_per_s = max(0.0, steps - self._last[1]) / (now - self._last[0])
            self._last = (now, steps)
        self.problem = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "sessions": self.sessions,
            "steps_per_s": self.steps_per_s,
            "errors": self.errors,
            "problem": self.problem,
        }


class Dashboard:
    """The dashboard's web server and its sampling tasks; an async context manager."""

    def __init__(self, telemetry: Telemetry, *, host: str = "127.0.0.1", port: int = 0, interval: float = 1.0) -> None:
        self.telemetry = telemetry
        self.host = host
        self.port = port
        self.interval = interval
        self.url = ""
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_POINTS)
        self.servers: dict[str, ServerView] = {}
        self._latencies: collections.deque[LatencyHistogram] = collections.deque(maxlen=LATENCY_WINDOW)
        self._latency: tuple[float | None, float | None] = (None, None)  # p50, p99 in seconds
        self._rates = (0.0, 0.0)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- life cycle

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._status)
        app.router.add_static("/static/", STATIC)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            try:
                await site.start()
            except OSError as exc:
                hint = f"the dashboard cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); pass --dashboard 0 for any free port"
                raise OSError(exc.errno, hint) from exc
            port = self._runner.addresses[0][1]  # the port chosen for port 0
            self.url = f"http://{self.host}:{port}/"
            timeout = aiohttp.ClientTimeout(total=max(0.5, min(2.0, self.interval * 2)))
            self._http = aiohttp.ClientSession(timeout=timeout)
            self._tasks = [
                asyncio.create_task(self._sample_forever(), name="dashboard-sample"),
                asyncio.create_task(self._scrape_forever(), name="dashboard-scrape"),
            ]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop sampling, close connections and the listening socket (idempotent)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            try:
                if self._http is not None:
                    await self._http.close()
                    self._http = None
            finally:
                if self._runner is not None:
                    runner, self._runner = self._runner, None
                    await runner.cleanup()

    # -- routes

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers=HEADERS)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self.status()), content_type="application/json", headers=HEADERS)

    def status(self) -> dict[str, Any]:
        """Everything the page shows, as one JSON-able dict."""
        t = self.telemetry
        totals = t.totals()
        pool = t.pool
        p50, p99 = self._latency
        return {
            "command": t.command,
            "phase": t.phase,
            "uptime_s": time.monotonic() - t.started,
            "interval_s": self.interval,
            "pool": None if pool is None else {"n": pool.n, "servers": len(pool.servers)},
            "totals": {"steps": totals.steps, "episodes": totals.episodes, "errors": totals.errors},
            "rates": {"steps_per_s": self._rates[0], "episodes_per_s": self._rates[1]},
            "latency": {
                "kind": t.latency_kind,
                "p50_ms": None if p50 is None else p50 * 1e3,
                "p99_ms": None if p99 is None else p99 * 1e3,
                "samples": sum(window.count for window in self._latencies),
            },
            "history": list(self.history),
            "servers": [view.as_json() for view in self.servers.values()],
            "server_errors": sum(view.errors or 0 for view in self.servers.values()),
            "eval": t.eval_progress(),
        }

    # -- sampling

    async def _sample_forever(self) -> None:
        last = self.telemetry.totals()
        last_time = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            totals = self.telemetry.take()
            elapsed = max(now - last_time, 1e-9)
            steps_rate = max(0, totals.steps - last.steps) / elapsed
            episodes_rate = max(0, totals.episodes - last.episodes) / elapsed
            self._rates = (steps_rate, episodes_rate)
            self.history.append(
                {
                    "t": round(now - self.telemetry.started, 3),
                    "steps_per_s": round(steps_rate, 1),
                    "episodes_per_s": round(episodes_rate, 2),
                }
            )
            if totals.latency.count:
                self._latencies.append(totals.latency)
                recent = sum(self._latencies, LatencyHistogram())
                self._latency = (recent.percentile(0.50), recent.percentile(0.99))
            last, last_time = totals, now

    async def _scrape_forever(self) -> None:
        while True:
            await self.scrape()
            await asyncio.sleep(self.interval)

    async def scrape(self) -> None:
        """Read every current server's ``/metrics`` once; mark servers the pool replaced."""
        pool = self.telemetry.pool
        if pool is None:
            return
        current = pool.servers
        clients = {client.url: client for client in pool.clients}
        for url, view in self.servers.items():
            if url not in current:
                view.state, view.sessions, view.steps_per_s = "replaced", None, None
        for url in current:
            self.servers.setdefault(url, ServerView(url))
        token = getattr(pool.backend, "token", None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        await asyncio.gather(*(self._scrape_one(self.servers[url], clients.get(url), headers) for url in current))

    async def _scrape_one(self, view: ServerView, client: Any, headers: dict[str, str]) -> None:
        assert self._http is not None
        try:
            async with self._http.get(f"{view.url}/metrics", headers=headers) as response:
                if response.status != 200:
                    raise ValueError(f"GET /metrics answered {response.status}")
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            view.state, view.steps_per_s = "down", None
            view.problem = _describe(exc)
            return
        view.scraped(parse_metrics(text), time.monotonic())
        broken = client is not None and client.state is not ClientState.OPEN
        view.state = "down" if broken else "up"
        if broken:
            view.problem = f"connection {client.state.value}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "GET /metrics timed out"
    return str(exc) or type(exc).__name__


@contextlib.asynccontextmanager
async def maybe_dashboard(port: int | None, command: str, *, stream: Any = sys.stderr) -> AsyncIterator[Telemetry | None]:
    """Serve a dashboard on ``port`` while the block runs and yield its telemetry; None: no dashboard."""
    if port is None:
        yield None
        return
    telemetry = Telemetry(command)
    async with Dashboard(telemetry, port=port) as dashboard:
        print(f"rollout: dashboard at {dashboard.url} (served while {command} runs)", file=stream, flush=True)
        yield telemetry
