"""envfleet vs OpenEnv, side by side in one run on this machine: OpenSpiel catch, same session counts.

usage: python loadtests/openenv_compare.py [--sizes 1,16,256] [--seconds 5] [--warmup 1]
                                           [--servers 2] [--openenv-servers 2] [--no-uvloop]
                                           [--out loadtests/out/openenv_compare.json]

(a) OpenEnv's own stack: ``openenv_catch.py`` (catch written against OpenEnv's
    ``Environment``, served by its ``create_app`` under uvicorn) in ``--openenv-servers``
    subprocesses on 127.0.0.1, driven by OpenEnv's async ``GenericEnvClient``, one client
    (one WebSocket) per session, sessions spread round-robin over the servers.
(b) envfleet: ``EnvPool`` over ``--servers`` local envserver processes, the per-env API
    and (n >= 16) the batched API, measured by ``rollout.commands.bench.measure``.

For each n the three are measured back to back, so they see the same machine load.
Both sides step with a uniform random legal action and receive full observations.
Every subprocess is terminated and reaped in ``finally``; servers also exit when
their standard input closes, so nothing outlives this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from openenv.core import GenericEnvClient

from pool_throughput import CpuMeter, CpuUse, machine, run_size, sizes  # same directory; this file is run as a script
from rollout.commands.bench import BenchResult, StepCounter
from rollout.fleet.health import wait_healthy

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "openenv_compare.json"


class Row(msgspec.Struct):
    """One (n, stack) of the comparison; ``ratio`` is envfleet's steps/s over OpenEnv's at the same n."""

    n: int
    stack: str  # "openenv", "envfleet per-env", "envfleet batched"
    servers: int
    result: BenchResult | None = None
    cpu: CpuUse | None = None
    error: str | None = None
    ratio: float | None = None
    cpu_ratio: float | None = None  # envfleet's steps per CPU second over OpenEnv's


# -- (a) OpenEnv


class OpenEnvServers:
    """``count`` uvicorn processes serving ``openenv_catch``; stopped and reaped by ``stop()``."""

    def __init__(self, count: int, max_sessions: int, start_timeout: float = 120.0) -> None:
        self.count = count
        self.max_sessions = max_sessions
        self.start_timeout = start_timeout
        self.processes: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="openenv-catch-"))
        self.close_tracebacks = 0  # uvicorn's "Exception in ASGI application" lines, counted at stop()

    async def start(self) -> list[str]:
        env = dict(os.environ, MAX_CONCURRENT_ENVS=str(self.max_sessions), ENABLE_WEB_INTERFACE="false")
        for index in range(self.count):
            with open(self.logdir / f"server-{index}.log", "wb") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, str(HERE / "openenv_catch.py"), "--host", "127.0.0.1", "--port", "0",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
                )
            self.processes.append(process)
        deadline = time.monotonic() + self.start_timeout
        ready = (self._ready(index, process, deadline) for index, process in enumerate(self.processes))
        self.urls = list(await asyncio.gather(*ready))
        return self.urls

    async def _ready(self, index: int, process: asyncio.subprocess.Process, deadline: float) -> str:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        if not line.startswith(b"openenv-catch listening on "):
            tail = (self.logdir / f"server-{index}.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"OpenEnv server exited before listening: {' | '.join(tail)}")
        url = line.decode().split()[-1]

        async def dead() -> str | None:
            return None if process.returncode is None else f"exited with code {process.returncode}"

        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, url, deadline, dead=dead)
        return url

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
            if process.stdin is not None:
                process.stdin.close()
        for log in sorted(self.logdir.glob("*.log")):
            self.close_tracebacks += log.read_text(errors="replace").count("Exception in ASGI application")
            log.unlink()
        self.logdir.rmdir()


class _Counter(StepCounter):
    def __init__(self) -> None:
        super().__init__()
        self.first_error = ""


async def _drive_openenv(clients: list[GenericEnvClient], stop_at: float, counter: _Counter, seed: int) -> None:
    """Each session steps its own client with a random legal action until ``stop_at``."""

    async def drive(index: int, client: GenericEnvClient) -> None:
        rng = random.Random(seed + index)
        clock = time.perf_counter
        try:
            result = await client.reset(seed=seed + index)
            while clock() < stop_at:
                legal = result.observation["legal_actions"]
                action = {"action_id": legal[int(rng.random() * len(legal))]}
                start = clock()
                result = await client.step(action)
                counter.latency.observe(clock() - start)
                counter.steps += 1
                if result.done:
                    counter.episodes += 1
                    result = await client.reset()
        except Exception as exc:  # counted and reported; the other sessions go on
            counter.errors += 1
            counter.first_error = counter.first_error or f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(drive(i, c) for i, c in enumerate(clients)))


async def measure_openenv(
    servers: OpenEnvServers, n: int, seconds: float, warmup: float, seed: int = 0
) -> tuple[BenchResult, CpuUse, str]:
    urls = servers.urls
    clients = [GenericEnvClient(urls[i % len(urls)]) for i in range(n)]
    try:
        await asyncio.gather(*(client.connect() for client in clients))
        await _drive_openenv(clients, time.perf_counter() + warmup, _Counter(), seed)
        counter = _Counter()
        meter = CpuMeter([p.pid for p in servers.processes])
        meter.start()
        started = time.perf_counter()
        await _drive_openenv(clients, started + seconds, counter, seed)
        elapsed = time.perf_counter() - started
        cpu = meter.stop(counter.steps)
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return counter.result("openenv", n, len(urls), elapsed), cpu, counter.first_error


# -- (b) envfleet, and the comparison


async def openenv_row(openenv: OpenEnvServers, n: int, seconds: float, warmup: float) -> Row:
    """Measure OpenEnv's own stack at n sessions: the row the others are compared with."""
    row = Row(n=n, stack="openenv", servers=len(openenv.urls))
    try:
        row.result, row.cpu, first_error = await measure_openenv(openenv, n, seconds, warmup)
        row.error = first_error or None
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    print(f"  n={n:>4} {line(row)}", file=sys.stderr, flush=True)
    return row


def with_ratios(rows: list[Row]) -> list[Row]:
    """Set every row's ratios over the first row's (OpenEnv's) steps/s and steps/CPU-s."""
    base, base_cpu = rows[0].result, rows[0].cpu
    for row in rows[1:]:
        if base is not None and row.result is not None and base.steps_per_s > 0:
            row.ratio = round(row.result.steps_per_s / base.steps_per_s, 1)
        if base_cpu is not None and row.cpu is not None and base_cpu.steps_per_cpu_s > 0:
            row.cpu_ratio = round(row.cpu.steps_per_cpu_s / base_cpu.steps_per_cpu_s, 1)
    return rows


CompareSize = Callable[[int, OpenEnvServers, int, float, float], Awaitable[list[Row]]]


async def compare_sizes(args: argparse.Namespace, compare_size: CompareSize) -> tuple[list[Row], OpenEnvServers]:
    """Start OpenEnv's servers, run ``compare_size`` at each of ``args.sizes``, and stop the servers."""
    rows: list[Row] = []
    openenv = OpenEnvServers(args.openenv_servers, max_sessions=max(args.sizes) + 8)
    try:
        await openenv.start()
        for n in args.sizes:
            rows += await compare_size(n, openenv, args.servers, args.seconds, args.warmup)
    finally:
        await openenv.stop()
    return rows, openenv


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")


def arguments(doc: str, default_sizes: list[int], servers_help: str, out: Path) -> argparse.ArgumentParser:
    """The options both comparisons take; ``doc`` is the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=default_sizes, help="comma-separated session counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each case")
    parser.add_argument("--servers", type=int, default=2, help=servers_help)
    parser.add_argument("--openenv-servers", type=int, default=2, help="OpenEnv uvicorn processes")
    parser.add_argument("--out", type=Path, default=out)
    return parser


async def compare_size(n: int, openenv: OpenEnvServers, servers: int, seconds: float, warmup: float) -> list[Row]:
    rows = [await openenv_row(openenv, n, seconds, warmup)]
    for case in await run_size(n, servers, seconds, warmup, {}):  # pool_throughput's cases, at the same n
        rows.append(Row(n=n, stack=f"envfleet {case.mode}", servers=servers, result=case.result, cpu=case.cpu, error=case.error))
    return with_ratios(rows)


def line(row: Row) -> str:
    r = row.result
    if r is None:
        return f"{row.stack:<17} ERROR {row.error}"
    tail = f"  ({row.error})" if row.error else ""
    cpu = f"  cores used {row.cpu.cores_used:.2f}  {row.cpu.steps_per_cpu_s:,.0f} steps/CPU-s" if row.cpu else ""
    return (
        f"{row.stack:<17} {r.steps_per_s:>10,.0f} steps/s  p50 {r.latency_p50_ms:.3f} ms  p99 {r.latency_p99_ms:.3f} ms  "
        f"errors {r.errors}{cpu}{tail}"
    )


def table(rows: list[Row]) -> str:
    out = [
        "| n | stack | server processes | steps/s | p50 ms/step | p99 ms/step | steps | errors | cores used "
        "| steps/CPU-s | envfleet / OpenEnv steps/s | envfleet / OpenEnv steps/CPU-s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row.result
        base = row.stack == "openenv" and r is not None
        ratio = f"**{row.ratio:g}x**" if row.ratio is not None else ("1x" if base else "")
        cpu_ratio = f"{row.cpu_ratio:g}x" if row.cpu_ratio is not None else ("1x" if base else "")
        if r is None:
            out.append(f"| {row.n} | {row.stack} | {row.servers} | | | | | 1: {row.error} | | | | |")
            continue
        cpu = f"{row.cpu.cores_used:.2f} | {row.cpu.steps_per_cpu_s:,.0f}" if row.cpu else " | "
        out.append(
            f"| {r.n} | {row.stack} | {row.servers} | {r.steps_per_s:,.0f} | {r.latency_p50_ms:.3f} | "
            f"{r.latency_p99_ms:.3f} | {r.steps:,} | {r.errors} | {cpu} | {ratio} | {cpu_ratio} |"
        )
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    info = machine()
    started = time.time()
    rows, openenv = await compare_sizes(args, compare_size)
    info["loadavg_at_end"] = os.getloadavg()
    errors = sum(1 if r.result is None else r.result.errors for r in rows)
    report = {
        "benchmark": "openenv_compare",
        "env": "openspiel catch",
        "seconds_per_case": args.seconds,
        "warmup": args.warmup,
        "envfleet_servers": args.servers,
        "openenv_servers": args.openenv_servers,
        "openenv_max_concurrent_envs": openenv.max_sessions,
        # OpenEnv's /ws handler logs a traceback for each session the client closes (it closes an
        # already closed socket in its finally); these are at teardown, outside the measured window
        "openenv_server_close_tracebacks": openenv.close_tracebacks,
        "uvloop_client": not args.no_uvloop,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "machine": info,
        "errors": errors,
        "rows": rows,
    }
    write_json(args.out, report)
    print(table(rows))
    print(f"\nmachine: {info['cpus']} vCPU {info['cpu_model']}, load average {info['loadavg_at_start'][0]:.2f} -> "
          f"{info['loadavg_at_end'][0]:.2f}; OpenEnv: {args.openenv_servers} uvicorn process(es), "
          f"envfleet: {args.servers} envserver process(es); JSON: {args.out}")
    return 1 if errors else 0


def main() -> None:
    parser = arguments(__doc__, [1, 16, 256], "envfleet local envserver processes", OUT)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop in the client")
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
