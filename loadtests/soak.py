"""Soak: steady ``EnvPool.run`` load for a configurable time; memory, file descriptors and tasks must not grow.

usage: python loadtests/soak.py [--seconds 1800] [--warmup 60] [--n 256] [--servers 2]
                                [--sample-every 5] [--out loadtests/out/soak.json]

n envs play catch episodes without pause (``pool.run`` with a deterministic policy) over
local servers. Every ``--sample-every`` seconds the RSS and open file descriptors of this
client process and of every server process, and the number of asyncio tasks, are sampled.
Checks against the first sample after ``--warmup``: RSS growth under 10% (client and each
server), no growth of file descriptors or tasks, no server replaced, no episode lost.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import msgspec

from common import fd_count, rss_mb, write_report  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from rollout.pool import EnvPool

OUT = Path(__file__).resolve().parent / "out" / "soak.json"
RSS_GROWTH_LIMIT = 0.10
ROUND_ENVS = 50  # episodes per env in one pool.run call
FD_SLACK = 2  # a transient socket or pipe at the moment of a sample is not a leak


class Sample(msgspec.Struct, array_like=True):
    t: float  # seconds since the start of the load
    episodes: int
    client_rss_mb: float
    client_fds: int
    tasks: int
    server_rss_mb: list[float]
    server_fds: list[int]


class SoakReport(msgspec.Struct):
    seconds: float
    warmup: float
    n: int
    servers: int
    episodes: int
    steps: int
    steps_per_s: float
    client_rss_mb_start: float  # after warm-up
    client_rss_mb_end: float
    server_rss_mb_start: list[float]
    server_rss_mb_end: list[float]
    client_fds_start: int
    client_fds_end: int
    server_fds_start: list[int]
    server_fds_end: list[int]
    tasks_start: int
    tasks_end: int
    replacements: int
    samples: list[Sample]
    failures: list[str]


def first_legal(observation: object) -> int:
    return int(observation.legal_actions[0])  # type: ignore[attr-defined]


async def run_soak(seconds: float = 1800.0, warmup: float = 60.0, n: int = 256, servers: int = 2,
                   sample_every: float = 5.0) -> SoakReport:
    failures: list[str] = []
    samples: list[Sample] = []
    episodes = steps = 0
    async with EnvPool(n=n, game="catch", servers=servers) as pool:
        backend = pool.backend
        pids = [backend.pid(url) for url in pool.servers]  # type: ignore[union-attr]
        me = os.getpid()
        start = time.monotonic()
        next_sample = start

        def sample() -> None:
            samples.append(Sample(
                t=round(time.monotonic() - start, 2), episodes=episodes, client_rss_mb=rss_mb(me),
                client_fds=fd_count(me), tasks=len(asyncio.all_tasks()),
                server_rss_mb=[rss_mb(pid) for pid in pids], server_fds=[fd_count(pid) for pid in pids],
            ))

        round_size = ROUND_ENVS * n
        while time.monotonic() - start < seconds:  # rounds: pool.run lists its episode indices up front
            run = pool.run(first_legal, episodes=round_size, seed=episodes)
            async with contextlib.aclosing(run) as records:
                async for record in records:
                    episodes += 1
                    steps += record.length + 1  # the steps and the reset
                    now = time.monotonic()
                    if now >= next_sample:
                        sample()
                        next_sample += sample_every
                    if now - start >= seconds:
                        break
        sample()
        elapsed = time.monotonic() - start
        replacements = len(pool.replacements_log)

    measured = [s for s in samples if s.t >= warmup] or samples[-1:]
    first, last = measured[0], measured[-1]
    if last.client_rss_mb > first.client_rss_mb * (1 + RSS_GROWTH_LIMIT):
        failures.append(f"client RSS grew {first.client_rss_mb} -> {last.client_rss_mb} MiB")
    for index, (a, b) in enumerate(zip(first.server_rss_mb, last.server_rss_mb)):
        if b > a * (1 + RSS_GROWTH_LIMIT):
            failures.append(f"server {index} RSS grew {a} -> {b} MiB")
    if last.client_fds > first.client_fds + FD_SLACK:
        failures.append(f"client file descriptors grew {first.client_fds} -> {last.client_fds}")
    for index, (a, b) in enumerate(zip(first.server_fds, last.server_fds)):
        if b > a + FD_SLACK:
            failures.append(f"server {index} file descriptors grew {a} -> {b}")
    if last.tasks > first.tasks:
        failures.append(f"asyncio tasks grew {first.tasks} -> {last.tasks}")
    if replacements:
        failures.append(f"{replacements} servers died and were replaced during the soak")
    if len(measured) < 2:
        failures.append("fewer than two samples after the warm-up: run longer or sample more often")
    return SoakReport(
        seconds=round(elapsed, 1), warmup=warmup, n=n, servers=servers, episodes=episodes, steps=steps,
        steps_per_s=round(steps / elapsed, 1),
        client_rss_mb_start=first.client_rss_mb, client_rss_mb_end=last.client_rss_mb,
        server_rss_mb_start=first.server_rss_mb, server_rss_mb_end=last.server_rss_mb,
        client_fds_start=first.client_fds, client_fds_end=last.client_fds,
        server_fds_start=first.server_fds, server_fds_end=last.server_fds,
        tasks_start=first.tasks, tasks_end=last.tasks, replacements=replacements,
        samples=samples, failures=failures,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    report = await run_soak(args.seconds, args.warmup, args.n, args.servers, args.sample_every)
    write_report("soak", report, args.out, print_without=("samples",))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
