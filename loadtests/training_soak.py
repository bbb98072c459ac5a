"""Training-loop soak: a pool that steps, pauses past the session TTL, gets odd actions and loses a server.

usage: python loadtests/training_soak.py [--seconds 1200] [--n 256] [--servers 2] [--ttl 10]
                                         [--step-seconds 30] [--pause 15] [--out loadtests/out/training_soak.json]

What a training loop does to a pool, in cycles: ``--step-seconds`` of ``pool.run``
(rounds of 4n catch episodes with a random legal policy), then a pause of ``--pause``
seconds, longer than the servers' idle TTL ``--ttl`` (a policy update, a checkpoint). While
stepping, a side task keeps sending actions that must fail alone: one over the frame limit
and one msgpack cannot carry, on envs that are also playing episodes. Halfway through, one
server is killed with SIGKILL. Sampled after every phase: RSS and open file descriptors of
this process and of each server, and the number of asyncio tasks.

Checks: no episode lost (every round reports all its episodes), every injected action
refused with its own error class and no other error, RSS growth under 10% (this process, and
each server that lived from the first sample after the first cycle to the end), file
descriptors and tasks flat, exactly one server replaced. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import msgspec

from common import fd_count, rss_mb, write_report  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from rollout import EnvCrashed, EnvPool, PoolConfig, RequestTooLarge, UnencodableAction
from rollout.policies import random_legal

OUT = Path(__file__).resolve().parent / "out" / "training_soak.json"
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 2  # a transient socket or pipe at the moment of a sample is not a leak
MAX_FRAME_BYTES = 256 * 1024
INJECT_EVERY = 0.5  # seconds between injected bad actions while stepping


class Sample(msgspec.Struct, array_like=True):
    t: float  # seconds since the start
    phase: str
    episodes: int
    client_rss_mb: float
    client_fds: int
    tasks: int
    server_pids: list[int]
    server_rss_mb: list[float]
    server_fds: list[int]


class TrainingSoakReport(msgspec.Struct):
    seconds: float
    n: int
    servers: int
    ttl: float
    pause: float
    cycles: int
    episodes: int
    episodes_lost: int
    steps: int
    steps_per_s_while_stepping: float
    injected: dict[str, int]  # bad actions sent, by kind
    refused: dict[str, int]  # errors they got, by class
    errors: dict[str, int]  # errors of pool.run and of anything not injected, by class
    replacements: int
    client_rss_mb_start: float
    client_rss_mb_end: float
    server_rss_mb_start: list[float]
    server_rss_mb_end: list[float]
    client_fds_start: int
    client_fds_end: int
    tasks_start: int
    tasks_end: int
    samples: list[Sample]
    failures: list[str]


def _count(table: dict[str, int], key: str, n: int = 1) -> None:
    table[key] = table.get(key, 0) + n


async def run_training_soak(
    seconds: float = 1200.0, n: int = 256, servers: int = 2, ttl: float = 10.0, step_seconds: float = 30.0, pause: float = 15.0
) -> TrainingSoakReport:
    """Run the soak for about ``seconds`` (whole cycles) and return what it measured and which checks failed."""
    failures: list[str] = []
    samples: list[Sample] = []
    injected: dict[str, int] = {}
    refused: dict[str, int] = {}
    errors: dict[str, int] = {}
    episodes = steps = lost = cycles = 0
    stepping_time = 0.0
    config = PoolConfig(n=n, heartbeat=min(5.0, ttl / 4))
    async with EnvPool(n=n, game="catch", servers=servers, idle_ttl=ttl, max_frame_bytes=MAX_FRAME_BYTES, config=config) as pool:
        backend = pool.backend
        me = os.getpid()
        start = time.monotonic()
        killed = False

        def sample(phase: str) -> None:
            pids = [backend.pid(url) for url in pool.servers]  # type: ignore[union-attr]
            samples.append(Sample(
                t=round(time.monotonic() - start, 2), phase=phase, episodes=episodes, client_rss_mb=rss_mb(me),
                client_fds=fd_count(me), tasks=len(asyncio.all_tasks()), server_pids=pids,
                server_rss_mb=[rss_mb(pid) for pid in pids], server_fds=[fd_count(pid) for pid in pids],
            ))

        async def inject() -> None:
            """Bad actions on envs that are busy playing: each must fail alone, before it is sent."""
            bad = {"oversized": [0] * MAX_FRAME_BYTES, "unencodable": object()}
            turn = 0
            while True:
                await asyncio.sleep(INJECT_EVERY)
                kind = "oversized" if turn % 2 == 0 else "unencodable"
                env = pool.envs[turn % n]
                turn += 1
                try:
                    await env.step(bad[kind])
                    _count(errors, f"injected {kind} action was accepted")
                except (RequestTooLarge, UnencodableAction) as exc:
                    _count(refused, type(exc).__name__)
                except EnvCrashed:  # its server was killed or is being replaced: refused for that reason first
                    _count(refused, "EnvCrashed")
                except Exception as exc:
                    _count(errors, f"injected {kind}: {type(exc).__name__}")
                _count(injected, kind)  # counted once answered: the end of a phase may cancel one in flight

        sample("start")
        while time.monotonic() - start < seconds:
            cycles += 1
            phase_end = time.monotonic() + step_seconds
            phase_start = time.monotonic()
            injector = asyncio.create_task(inject())
            try:
                while time.monotonic() < phase_end:
                    if not killed and time.monotonic() - start >= seconds / 2:
                        killed = True
                        victim = backend.pid(pool.servers[0])  # type: ignore[union-attr]
                        asyncio.get_running_loop().call_later(step_seconds / 4, os.kill, victim, signal.SIGKILL)
                    size, reported = 4 * n, 0
                    try:
                        run = pool.run(random_legal, episodes=size, seed=episodes, per_episode=True)
                        async with contextlib.aclosing(run) as records:
                            async for record in records:
                                reported += 1
                                steps += record.length + 1  # the steps and the reset
                    except Exception as exc:
                        _count(errors, type(exc).__name__)
                    episodes += reported
                    lost += size - reported
            finally:
                injector.cancel()
                await asyncio.gather(injector, return_exceptions=True)
            stepping_time += time.monotonic() - phase_start
            sample(f"stepped {cycles}")
            await asyncio.sleep(pause)  # longer than the TTL: the pool's keepalive must hold its sessions
            sample(f"paused {cycles}")
        elapsed = time.monotonic() - start
        replacements = len(pool.replacements_log)

    baseline = next((s for s in samples if s.phase == "paused 1"), samples[0])  # after the first cycle: warm
    last = samples[-1]
    if lost:
        failures.append(f"{lost} episodes lost")
    if errors:
        failures.append(f"errors other than the injected ones: {errors}")
    if sum(refused.values()) != sum(injected.values()):
        failures.append(f"injected {injected} but refused {refused}")
    if last.client_rss_mb > baseline.client_rss_mb * (1 + RSS_GROWTH_LIMIT):
        failures.append(f"client RSS grew {baseline.client_rss_mb} -> {last.client_rss_mb} MiB")
    for pid, a in zip(baseline.server_pids, baseline.server_rss_mb):
        if pid in last.server_pids:
            b = last.server_rss_mb[last.server_pids.index(pid)]
            if b > a * (1 + RSS_GROWTH_LIMIT):
                failures.append(f"server pid {pid} RSS grew {a} -> {b} MiB")
    if last.client_fds > baseline.client_fds + FD_SLACK:
        failures.append(f"client file descriptors grew {baseline.client_fds} -> {last.client_fds}")
    if last.tasks > baseline.tasks:
        failures.append(f"asyncio tasks grew {baseline.tasks} -> {last.tasks}")
    if replacements != 1:
        failures.append(f"{replacements} servers replaced; the soak kills exactly one")
    if cycles < 2:
        failures.append("fewer than two cycles: run longer")
    return TrainingSoakReport(
        seconds=round(elapsed, 1), n=n, servers=servers, ttl=ttl, pause=pause, cycles=cycles, episodes=episodes,
        episodes_lost=lost, steps=steps, steps_per_s_while_stepping=round(steps / stepping_time, 1) if stepping_time else 0.0,
        injected=injected, refused=refused, errors=errors, replacements=replacements,
        client_rss_mb_start=baseline.client_rss_mb, client_rss_mb_end=last.client_rss_mb,
        server_rss_mb_start=baseline.server_rss_mb, server_rss_mb_end=last.server_rss_mb,
        client_fds_start=baseline.client_fds, client_fds_end=last.client_fds,
        tasks_start=baseline.tasks, tasks_end=last.tasks, samples=samples, failures=failures,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1200.0, help="run length (whole cycles; default 1200)")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--ttl", type=float, default=10.0, help="the servers' idle TTL, seconds (default 10)")
    parser.add_argument("--step-seconds", type=float, default=30.0, help="stepping per cycle (default 30)")
    parser.add_argument("--pause", type=float, default=15.0, help="pause per cycle, longer than --ttl (default 15)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.pause <= args.ttl:
        parser.error("--pause must be longer than --ttl: the pauses are what this soak tests")
    report = await run_training_soak(args.seconds, args.n, args.servers, args.ttl, args.step_seconds, args.pause)
    write_report("training_soak", report, args.out, print_without=("samples",))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

