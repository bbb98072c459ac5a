"""Chaos: ``EnvPool.run`` over a fleet while a random server is SIGKILLed every few seconds.

usage: python loadtests/chaos.py [--episodes 10000] [--n 256] [--servers 8] [--kill-every 2]
                                 [--step-delay 0] [--backend local|docker] [--seed 0]
                                 [--max-episode-retries 3] [--out loadtests/out/chaos.json]

The same pool first plays the episodes undisturbed (the reference), then plays them again
while a killer SIGKILLs one random serving server (process, or container with
``--backend docker``) every ``--kill-every`` seconds. Checks: every episode reported exactly
once, none twice, each episode's record (seed, reward, length, returns) equal to the
reference, every call in flight on a killed server failed within 1 s with ``EnvCrashed``
naming env, server and request, and nothing left running afterwards (envserver processes
started by the run, or containers labelled with the pool). Recovery time is the time from
the kill to the replacement serving again (``EnvPool.replacements_log``).
``--step-delay`` makes the policy sleep per step (an async policy), to stretch a short run
over more kills and to have kills land while envs are between calls rather than in flight.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec

from common import proc_stat, write_report  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from rollout.errors import EnvCrashed
from rollout.pool import EnvPool, PoolConfig
from rollout.telemetry import percentile

OUT = Path(__file__).resolve().parent / "out" / "chaos.json"
FAIL_FAST_LIMIT = 1.0  # seconds from a kill to the failure of the calls in flight on it
REPLACE_WAIT = 120.0  # seconds to wait for the last replacements after the run


class Kill(msgspec.Struct):
    url: str
    pid: int | None  # local backend
    container: str | None  # docker backend
    at: float  # time.monotonic() just before the signal


class ChaosReport(msgspec.Struct):
    backend: str
    episodes: int
    n: int
    servers: int
    kill_every: float
    step_delay: float
    reference_seconds: float
    chaos_seconds: float
    reported: int
    duplicated: int
    missing: int
    mismatched: int
    retried_episodes: int
    servers_killed: int
    replacements: int
    crashes_in_flight: int  # EnvCrashed of calls sent before the kill
    crashes_after_break: int  # EnvCrashed of calls refused by a broken client (no request id)
    crashes_unnamed: int  # in-flight EnvCrashed missing env, server or request
    fail_fast_max_s: float | None
    fail_fast_p50_s: float | None
    recovery_p50_s: float | None
    recovery_max_s: float | None
    leftovers: list[str]
    failures: list[str]


class ProbedPool(EnvPool):
    """An EnvPool that also records every EnvCrashed its whole-episode runs see."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crashes: list[tuple[float, EnvCrashed]] = []

    async def _play(self, *args: Any) -> Any:
        try:
            return await super()._play(*args)
        except EnvCrashed as exc:
            self.crashes.append((time.monotonic(), exc))
            raise


def make_policy(step_delay: float) -> Any:
    """A deterministic policy (a checksum of the observation picks the legal action), optionally slow."""

    def choose(observation: Any) -> int:
        legal = observation.legal_actions
        return int(legal[zlib.crc32(observation.text.encode()) % len(legal)])

    if step_delay <= 0:
        return choose

    async def slow(observation: Any) -> int:
        await asyncio.sleep(step_delay)
        return choose(observation)

    return slow


def median(values: list[float]) -> float | None:
    return percentile(sorted(values), 0.5) if values else None


# --------------------------------------------------------------------------- processes


def envserver_pids() -> dict[int, int]:
    """Live (non-zombie) envserver processes on this machine: pid -> parent pid."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"envserver" not in cmdline and not any(part.endswith(b"/envserver") for part in cmdline):
            continue
        fields = proc_stat(int(entry))
        if fields and fields[0] != b"Z":
            found[int(entry)] = int(fields[1])
    return found


def alive_envservers(pids: set[int]) -> list[int]:
    """Those of ``pids`` that are still live envserver processes (or unreaped zombies of ours)."""
    left = []
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = proc_stat(pid)
        if not fields:
            continue
        zombie_of_ours = fields[:2] == [b"Z", str(os.getpid()).encode()]
        if b"envserver" in cmdline or zombie_of_ours:
            left.append(pid)
    return left


# --------------------------------------------------------------------------- killers


class LocalKiller:
    """SIGKILLs a random serving local server process."""

    def __init__(self, pool: EnvPool, rng: random.Random) -> None:
        self.pool, self.rng = pool, rng
        self.kills: list[Kill] = []
        self.pids_seen: set[int] = set()

    def note_pids(self) -> None:
        backend: Any = self.pool.backend
        for url in backend.urls:
            self.pids_seen.add(backend.pid(url))

    async def kill_one(self) -> None:
        backend: Any = self.pool.backend
        self.note_pids()
        killed = {k.url for k in self.kills}
        serving = [url for url in self.pool.servers if url in backend.urls and url not in killed]
        if not serving:
            return
        url = self.rng.choice(serving)
        pid = backend.pid(url)
        at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.kills.append(Kill(url, pid, None, at))

    async def leftovers(self) -> list[str]:
        return [f"envserver pid {pid}" for pid in alive_envservers(self.pids_seen)]


class DockerKiller:
    """SIGKILLs a random serving container of the pool."""

    def __init__(self, pool: EnvPool, rng: random.Random) -> None:
        import aiodocker

        self.pool, self.rng = pool, rng
        self.kills: list[Kill] = []
        self.docker = aiodocker.Docker()

    def note_pids(self) -> None:
        pass

    async def _containers(self, all_: bool = False) -> list[tuple[str, list[str]]]:
        """(id, names) of the pool's containers (running ones unless ``all_``)."""
        from rollout.fleet.docker import LABEL_POOL

        backend: Any = self.pool.backend
        filters = json.dumps({"label": [f"{LABEL_POOL}={backend.pool_id}"]})
        found = await self.docker.containers.list(all="1" if all_ else "0", filters=filters)
        return [(c.id, [n.lstrip("/") for n in c["Names"]]) for c in found]

    async def kill_one(self) -> None:
        backend: Any = self.pool.backend
        killed = {k.url for k in self.kills}
        serving = [url for url in self.pool.servers if url in backend.urls and url not in killed]
        if not serving:
            return
        url = self.rng.choice(serving)
        name = backend.describe(url).split()[1]
        for container_id, names in await self._containers():
            if name in names:
                at = time.monotonic()
                await self.docker.containers.container(container_id).kill()
                self.kills.append(Kill(url, None, name, at))
                return

    async def leftovers(self) -> list[str]:
        try:
            return [f"container {names[0]}" for _, names in await self._containers(all_=True)]
        finally:
            await self.docker.close()


async def kill_forever(killer: Any, every: float, first: float | None = None) -> None:
    await asyncio.sleep(every if first is None else first)
    while True:
        await killer.kill_one()
        await asyncio.sleep(every)


# --------------------------------------------------------------------------- the run


async def play(pool: EnvPool, policy: Any, episodes: int, seed: int) -> tuple[list[Any], float]:
    start = time.perf_counter()
    records = [record async for record in pool.run(policy, episodes=episodes, seed=seed)]
    return records, time.perf_counter() - start


def _key(record: Any) -> tuple[Any, ...]:
    return (record.seed, record.reward, record.length, tuple(record.info.get("returns") or ()))


async def run_chaos(
    episodes: int = 10_000,
    n: int = 256,
    servers: int = 8,
    kill_every: float = 2.0,
    *,
    step_delay: float = 0.0,
    backend: str = "local",
    seed: int = 0,
    image: str = "envfleet:latest",
    max_episode_retries: int = 3,
    first_kill: float | None = None,
) -> ChaosReport:
    """Play ``episodes`` undisturbed, then again under kills; return what was checked and measured."""
    rng = random.Random(seed)
    policy = make_policy(step_delay)
    extra = {"image": image} if backend == "docker" else {}
    config = PoolConfig(n=n, max_episode_retries=max_episode_retries)
    pool = ProbedPool(game="catch", backend=backend, servers=servers, config=config, **extra)
    killer: Any = LocalKiller(pool, rng) if backend == "local" else DockerKiller(pool, rng)
    failures: list[str] = []
    try:
        async with pool:
            killer.note_pids()
            reference, reference_seconds = await play(pool, make_policy(0.0), episodes, seed)
            chaos_task = asyncio.create_task(kill_forever(killer, kill_every, first_kill))
            try:
                records, chaos_seconds = await play(pool, policy, episodes, seed)
            finally:
                chaos_task.cancel()
                await asyncio.gather(chaos_task, return_exceptions=True)
            # let the last replacements finish, so every kill has a recovery time
            await asyncio.gather(*(env.wait_ready(REPLACE_WAIT) for env in pool.envs))
            killer.note_pids()
            log = list(pool.replacements_log)
    finally:
        leftovers = await killer.leftovers()

    expected = {r.episode: _key(r) for r in reference}
    counts: dict[int, int] = {}
    for record in records:
        counts[record.episode] = counts.get(record.episode, 0) + 1
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    missing = episodes - len(counts)
    mismatched = sum(1 for r in records if expected.get(r.episode) != _key(r))
    if len(reference) != episodes or len(expected) != episodes:
        failures.append(f"the undisturbed run reported {len(reference)} records for {len(expected)} episodes")
    if duplicated or missing:
        failures.append(f"{duplicated} duplicated and {missing} missing episodes")
    if mismatched:
        failures.append(f"{mismatched} episodes differ from the undisturbed run")

    kills = killer.kills
    in_flight, after_break, unnamed, fail_fast = 0, 0, 0, []
    for at, exc in pool.crashes:
        if exc.request is None:
            after_break += 1
            continue
        in_flight += 1
        if exc.env is None or exc.server is None:
            unnamed += 1
        kill_times = [k.at for k in kills if k.url == exc.server and k.at <= at]
        if kill_times:
            fail_fast.append(at - max(kill_times))
    if unnamed:
        failures.append(f"{unnamed} in-flight EnvCrashed without env/server/request")
    if fail_fast and max(fail_fast) > FAIL_FAST_LIMIT:
        failures.append(f"in-flight calls failed {max(fail_fast):.3f} s after the kill (limit {FAIL_FAST_LIMIT} s)")

    recovery = []
    for kill in kills:
        ready = [ready_at for old, _, ready_at in log if old == kill.url and ready_at >= kill.at]
        if ready:
            recovery.append(min(ready) - kill.at)
        else:
            failures.append(f"killed server {kill.url} was never replaced")
    if len(kills) == 0:
        failures.append("no server was killed: the run was shorter than --kill-every")
    if leftovers:
        failures.append(f"left running: {leftovers}")

    return ChaosReport(
        backend=backend,
        episodes=episodes,
        n=n,
        servers=servers,
        kill_every=kill_every,
        step_delay=step_delay,
        reference_seconds=round(reference_seconds, 3),
        chaos_seconds=round(chaos_seconds, 3),
        reported=len(records),
        duplicated=duplicated,
        missing=missing,
        mismatched=mismatched,
        retried_episodes=sum(1 for r in records if r.info.get("retries")),
        servers_killed=len(kills),
        replacements=len(log),
        crashes_in_flight=in_flight,
        crashes_after_break=after_break,
        crashes_unnamed=unnamed,
        fail_fast_max_s=_round(max(fail_fast) if fail_fast else None),
        fail_fast_p50_s=_round(median(fail_fast)),
        recovery_p50_s=_round(median(recovery)),
        recovery_max_s=_round(max(recovery) if recovery else None),
        leftovers=leftovers,
        failures=failures,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


async def docker_available(image: str) -> str | None:
    """Why the Docker variant cannot run here, or None."""
    try:
        import aiodocker

        async with aiodocker.Docker() as docker:
            await docker.version()
            await docker.images.inspect(image)
    except Exception as exc:  # noqa: BLE001 - any failure means: skip the variant, say why
        return f"{type(exc).__name__}: {exc}"
    return None


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=2.0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--backend", choices=["local", "docker"], default="local")
    parser.add_argument("--image", default="envfleet:latest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-episode-retries", type=int, default=3, help="PoolConfig.max_episode_retries")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.backend == "docker":
        reason = await docker_available(args.image)
        if reason is not None:
            print(f"chaos: skipping the docker variant: {reason}")
            return 0
    report = await run_chaos(
        args.episodes, args.n, args.servers, args.kill_every,
        step_delay=args.step_delay, backend=args.backend, seed=args.seed, image=args.image,
        max_episode_retries=args.max_episode_retries,
    )
    out = args.out if args.backend == "local" else args.out.with_name(args.out.stem + "_docker.json")
    write_report("chaos", report, out)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
