"""Overload: twice as many sessions requested as the servers admit.

usage: python loadtests/overload.py [--servers 2] [--cap 2048] [--requested 8192] [--active 256]
                                    [--seconds 5] [--out loadtests/out/overload.json]

``--servers`` local servers run with ``--max-sessions CAP`` each (4,096 in total by default).
``--active`` sessions are opened first and step catch in a closed loop (each awaits its own
step, as EnvPool's per-env API does); their step latency is measured for ``--seconds`` with
the servers nearly empty ("before"), while the rest of ``--requested`` sessions are opened in
one burst ("burst"), and again with the servers full ("after"). Checks: exactly the cap is
admitted, every excess open gets ``CapacityReached`` (time to the refusal measured), no
call hangs (everything resolves within its deadline), the servers stay healthy and their RSS
stays bounded. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import msgspec

from common import rss_mb, write_report  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from rollout.client import EnvClient
from rollout.config import FleetConfig
from rollout.errors import CapacityReached
from rollout.fleet.local import LocalFleet
from rollout.telemetry import percentile

OUT = Path(__file__).resolve().parent / "out" / "overload.json"
HANG_LIMIT = 30.0  # seconds any single phase may take before it counts as hung


class OverloadReport(msgspec.Struct):
    servers: int
    cap_per_server: int
    requested: int
    admitted: int
    refused: int
    other_errors: list[str]
    refusal_p50_ms: float | None
    refusal_max_ms: float | None
    burst_seconds: float
    active: int
    p50_before_ms: float | None
    p99_before_ms: float | None
    p99_burst_ms: float | None
    p50_after_ms: float | None
    p99_after_ms: float | None
    steps_before: int
    steps_after: int
    server_rss_mb_empty: list[float]
    server_rss_mb_full: list[float]
    server_rss_mb_end: list[float]
    failures: list[str]


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds, or None when there are none."""
    return round(percentile(sorted(values), q) * 1000, 3) if values else None


class Stepper:
    """``count`` sessions stepping catch in closed loops; latency samples go to ``samples``."""

    def __init__(self, sessions: list[tuple[EnvClient, int]]) -> None:
        self.sessions = sessions
        self.samples: list[float] = []
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, client: EnvClient, sid: int) -> None:
        result = await client.reset(sid, seed=sid)
        while True:
            start = time.perf_counter()
            if result.terminated or result.truncated:
                result = await client.reset(sid)
            else:
                result = await client.step(sid, result.observation.legal_actions[0])
            self.samples.append(time.perf_counter() - start)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(c, sid)) for c, sid in self.sessions]

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for result in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(result, Exception):
                self.errors.append(repr(result))


async def run_overload(
    servers: int = 2, cap: int = 2048, requested: int = 8192, active: int = 256, seconds: float = 5.0
) -> OverloadReport:
    failures: list[str] = []
    config = FleetConfig(servers=servers, max_sessions=cap, env_options={"game": "catch"}, start_timeout=120)
    clients: list[EnvClient] = []
    async with LocalFleet(config) as fleet:
        pids = [fleet.pid(url) for url in fleet.urls]
        # two connections per server: the burst also crosses connections, not only sessions
        for url in fleet.urls:
            for _ in range(2):
                clients.append(await EnvClient(url, token=fleet.token, request_timeout=HANG_LIMIT).connect())
        try:
            rss_empty = [rss_mb(pid) for pid in pids]
            slots = [(clients[i % len(clients)], clients[i % len(clients)].new_sid()) for i in range(requested)]
            first, rest = slots[:active], slots[active:]
            await asyncio.wait_for(asyncio.gather(*(c.open(sid) for c, sid in first)), HANG_LIMIT)

            stepper = Stepper(first)
            stepper.start()
            await asyncio.sleep(min(1.0, seconds / 5))  # warm-up
            stepper.take()
            await asyncio.sleep(seconds)
            before = stepper.take()

            refusal_times: list[float] = []
            other: list[str] = []
            admitted = active

            async def open_one(client: EnvClient, sid: int, sent: float) -> None:
                nonlocal admitted
                try:
                    await client.open(sid)
                    admitted += 1
                except CapacityReached:
                    refusal_times.append(time.perf_counter() - sent)
                except Exception as exc:  # noqa: BLE001 - every other outcome is recorded as a failure
                    other.append(repr(exc))

            burst_start = time.perf_counter()
            try:
                await asyncio.wait_for(asyncio.gather(*(open_one(c, sid, burst_start) for c, sid in rest)), HANG_LIMIT)
            except TimeoutError:
                failures.append(f"the burst of {len(rest)} opens did not resolve within {HANG_LIMIT:g} s")
            burst_seconds = time.perf_counter() - burst_start
            during = stepper.take()
            rss_full = [rss_mb(pid) for pid in pids]

            await asyncio.sleep(seconds)
            after = stepper.take()
            await stepper.stop()
            # more opens against full servers: still refused promptly
            extra = [(c, c.new_sid()) for c in clients]
            late = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(open_one(c, sid, late) for c, sid in extra)), HANG_LIMIT)
            for client in clients:
                await asyncio.wait_for(client.ping(), HANG_LIMIT)
            rss_end = [rss_mb(pid) for pid in pids]
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    refused = len(refusal_times) - len(extra)
    total_cap = servers * cap
    if admitted != min(total_cap, requested):
        failures.append(f"admitted {admitted} sessions, the cap is {total_cap}")
    if refused != max(0, requested - total_cap):
        failures.append(f"refused {refused} of {requested - total_cap} excess sessions")
    if other or stepper.errors:
        failures.append(f"unexpected errors: {(other + stepper.errors)[:3]}")
    if not before or not after:
        failures.append("the active sessions made no progress")
    return OverloadReport(
        servers=servers,
        cap_per_server=cap,
        requested=requested,
        admitted=admitted,
        refused=refused,
        other_errors=other[:10],
        refusal_p50_ms=quantile(refusal_times, 0.5),
        refusal_max_ms=quantile(refusal_times, 1.0),
        burst_seconds=round(burst_seconds, 3),
        active=active,
        p50_before_ms=quantile(before, 0.5),
        p99_before_ms=quantile(before, 0.99),
        p99_burst_ms=quantile(during, 0.99),
        p50_after_ms=quantile(after, 0.5),
        p99_after_ms=quantile(after, 0.99),
        steps_before=len(before),
        steps_after=len(after),
        server_rss_mb_empty=rss_empty,
        server_rss_mb_full=rss_full,
        server_rss_mb_end=rss_end,
        failures=failures,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--cap", type=int, default=2048, help="--max-sessions of each server")
    parser.add_argument("--requested", type=int, default=8192)
    parser.add_argument("--active", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    report = await run_overload(args.servers, args.cap, args.requested, args.active, args.seconds)
    write_report("overload", report, args.out)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
