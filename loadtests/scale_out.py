"""Scale-out (issue 8): a swarm service of K replicas against K docker containers, n sessions over them.

usage: python loadtests/scale_out.py [--replicas 128] [--n 4096] [--seconds 10] [--warmup 2]
                                     [--backends swarm,docker] [--image envfleet:latest]
                                     [--max-seconds 1500] [--out loadtests/out/scale_out.json]
       python loadtests/scale_out.py --backend ray [--counts 8,32,64] [--rounds 2] [--n 1024]
                                     [--seconds 5] [--out loadtests/out/scale_out_ray.json]

With ``--backend ray`` (issue 17), see ``run_ray``: K server actors on a local Ray cluster against K
local server processes, for each K of ``--counts``, in the same run.

For each backend, one ``EnvPool(n, game="catch", backend=B, servers=K)``:

- **healthy_s**: the fleet's ``start()`` until all K servers answer /health (the swarm: service
  create until K tasks are healthy; docker: K containers created, 8 at a time);
- **sessions_s**: then connecting to every server and opening the n sessions;
- steps/s of the per-env and the batched API over all n (``rollout.commands.bench.measure``), with the
  CPU seconds the client and all K servers used meanwhile;
- memory per replica (cgroup usage and RSS) after the measurement, n/K sessions each;
- **remove_s**: ``pool.close()`` until every container is gone.

Everything is on loopback. If the node is not in a swarm, the run inits one on 127.0.0.1 and
leaves it at the end (also removing docker_gwbridge); the whole run is bounded by
--max-seconds, and the pools are closed in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiodocker
import msgspec
from common import cpu_seconds
from fleet_startup import (  # loadtests/ is on sys.path when run as a script
    cgroup_cpu,
    cgroup_memory,
)

import rollout.pool as pool_module
from rollout.commands.bench import measure
from rollout.fleet import make_backend
from rollout.fleet.docker import LABEL_POOL
from rollout.pool import EnvPool

OUT = Path(__file__).resolve().parent / "out" / "scale_out.json"
RAY_MODES = ("per-env", "batched", "vector")  # --backend ray: the per-env, batched and columnar (VectorPool) APIs
MIB = 1024 * 1024


def _timed_backends(timings: dict[str, float]) -> None:
    """Make the pool's backends record how long their start() took (the pool starts them itself)."""

    def make(config: Any) -> Any:
        backend = make_backend(config)
        start = backend.start

        async def timed_start() -> list[str]:
            began = time.perf_counter()
            urls = await start()
            timings["healthy_s"] = time.perf_counter() - began
            return urls

        backend.start = timed_start  # type: ignore[method-assign]
        return backend

    pool_module.make_backend = make  # type: ignore[assignment]


async def _container_ids(pool_id: str) -> list[str]:
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(filters=json.dumps({"label": [f"{LABEL_POOL}={pool_id}"]}))
        return [c.id for c in found]


def _cpu(ids: list[str]) -> float:
    return sum(cgroup_cpu(i) or 0.0 for i in ids)


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    timings: dict[str, float] = {}
    _timed_backends(timings)
    row: dict[str, Any] = {"backend": backend, "replicas": args.replicas, "n": args.n, "load_before": os.getloadavg()[0]}
    pool = EnvPool(n=args.n, game="catch", backend=backend, servers=args.replicas, image=args.image, start_timeout=args.start_timeout)
    began = time.perf_counter()
    try:
        await pool.start()
        row["pool_start_s"] = time.perf_counter() - began
        row["healthy_s"] = timings["healthy_s"]
        row["sessions_s"] = row["pool_start_s"] - row["healthy_s"]
        assert pool.backend is not None
        pool_id = pool.backend.pool_id  # type: ignore[attr-defined]
        ids = await _container_ids(pool_id)
        row["containers"] = len(ids)
        print(f"[{backend}] {len(set(pool.servers))} servers healthy in {row['healthy_s']:.1f} s, "
              f"{args.n} sessions open after {row['pool_start_s']:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        for mode in ("per-env", "batched"):
            cpu0, client0 = _cpu(ids), _client_cpu()
            result = await measure(pool, mode, args.seconds, warmup=args.warmup)
            servers_cpu, client_cpu = _cpu(ids) - cpu0, _client_cpu() - client0
            total_seconds = args.seconds + args.warmup
            row[mode] = {
                **msgspec.to_builtins(result),
                "client_cpu_s": client_cpu,
                "servers_cpu_s": servers_cpu,
                "cores_used": (client_cpu + servers_cpu) / total_seconds,
                # warm-up steps are not counted, their CPU is: a slight underestimate
                "steps_per_cpu_s": result.steps / max(1e-9, client_cpu + servers_cpu),
            }
            print(f"[{backend}] {mode}: {result.steps_per_s:,.0f} steps/s, p50 {result.latency_p50_ms:.1f} ms, "
                  f"p99 {result.latency_p99_ms:.1f} ms, errors {result.errors}, "
                  f"cores used {(client_cpu + servers_cpu) / total_seconds:.2f}", flush=True)
        memory = [m for m in (cgroup_memory(i) for i in ids) if m is not None]
        if memory:
            row["memory_usage_mib_median"] = statistics.median(u for u, _ in memory) / MIB
            row["memory_rss_mib_median"] = statistics.median(r for _, r in memory) / MIB
            row["memory_usage_mib_max"] = max(u for u, _ in memory) / MIB
        row["load_after"] = os.getloadavg()[0]
        if memory:
            print(f"[{backend}] memory per replica: median {row['memory_usage_mib_median']:.1f} MiB cgroup usage, "
                  f"{row['memory_rss_mib_median']:.1f} MiB RSS, max {row['memory_usage_mib_max']:.1f} MiB", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on with the next backend
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{backend}] failed: {row['error']}", flush=True)
    finally:
        closing = time.perf_counter()
        await pool.close()
        row["remove_s"] = time.perf_counter() - closing
        print(f"[{backend}] removed in {row['remove_s']:.1f} s", flush=True)
    return row


async def _swarm_state() -> str:
    async with aiodocker.Docker() as docker:
        return str((await docker.system.info())["Swarm"]["LocalNodeState"])


async def _init_swarm() -> None:
    async with aiodocker.Docker() as docker:
        await docker.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")


async def _leave_swarm() -> None:
    """Leave the swarm this run made; wait (up to 2 min) for a daemon that is restarting meanwhile."""
    for attempt in range(120):
        try:
            async with aiodocker.Docker() as docker:
                await docker.swarm.leave(force=True)
            break
        except aiodocker.DockerError as exc:
            if exc.status == 503:  # not in a swarm (any more)
                break
            if exc.status != 900 or attempt == 119:  # 900: aiodocker cannot reach the daemon
                raise
            await asyncio.sleep(1.0)
    async with aiodocker.Docker() as docker:
        for name in ("docker_gwbridge", "ingress"):
            for _ in range(50):
                try:
                    await (await docker.networks.get(name)).delete()
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        break
                await asyncio.sleep(0.1)


async def _measure_pool(backend: str, servers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start a catch pool of ``servers`` servers on ``backend``; time it; measure both APIs; close it."""
    timings: dict[str, float] = {}
    _timed_backends(timings)
    row: dict[str, Any] = {"backend": backend, "servers": servers, "n": args.n, "load_before": os.getloadavg()[0]}
    pool = EnvPool(n=args.n, game="catch", backend=backend, servers=servers, ray_cpus=args.ray_cpus, start_timeout=args.start_timeout)
    began = time.perf_counter()
    try:
        await pool.start()
        row["pool_start_s"] = time.perf_counter() - began
        row["healthy_s"] = timings["healthy_s"]
        backend_: Any = pool.backend
        pids = [backend_.pid(url) for url in pool.servers]
        print(f"[{backend} x{servers}] healthy in {row['healthy_s']:.2f} s, {args.n} sessions open after "
              f"{row['pool_start_s']:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        for mode in RAY_MODES:
            cpu0, client0 = sum(map(cpu_seconds, pids)), _client_cpu()
            result = await measure(pool, mode, args.seconds, warmup=args.warmup)
            servers_cpu, client_cpu = sum(map(cpu_seconds, pids)) - cpu0, _client_cpu() - client0
            row[mode] = {**msgspec.to_builtins(result), "client_cpu_s": client_cpu, "servers_cpu_s": servers_cpu,
                         "cores_used": (client_cpu + servers_cpu) / (args.seconds + args.warmup)}
            print(f"[{backend} x{servers}] {mode}: {result.steps_per_s:,.0f} steps/s, p50 {result.latency_p50_ms:.1f} ms, "
                  f"p99 {result.latency_p99_ms:.1f} ms, errors {result.errors}", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{backend} x{servers}] failed: {row['error']}", flush=True)
    finally:
        closing = time.perf_counter()
        await pool.close()
        row["remove_s"] = time.perf_counter() - closing
    return row


async def run_ray(args: argparse.Namespace) -> int:
    """K Ray server actors against K local server processes, for each K of ``--counts``.

    The run is the driver of a local Ray cluster it starts first (as a trainer's job would be),
    with ``max(K) * --ray-cpus`` logical CPUs, so that ``healthy_s`` is the actors' start-up,
    not the cluster's; ``ray_init_s`` is recorded apart. Local and Ray pools of the same size
    run back to back, so their ratio is measured under the same load.
    """
    import ray

    counts = [int(c) for c in args.counts.split(",")]
    began = time.perf_counter()
    ray.init(num_cpus=int(max(counts) * args.ray_cpus + 0.999), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray_init_s = time.perf_counter() - began
    rows: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(args.max_seconds):
            for count in counts:
                for round_ in range(args.rounds):  # ABBA order: neither backend always runs at the later load
                    for backend in ("ray", "local") if round_ % 2 == 0 else ("local", "ray"):
                        rows.append({**await _measure_pool(backend, count, args), "round": round_})
    finally:
        ray.shutdown()
        summary: dict[str, Any] = {"ray_init_s": ray_init_s}
        for count in counts:
            ray_rows = [r for r in rows if r["backend"] == "ray" and r["servers"] == count and "healthy_s" in r]
            local_rows = [r for r in rows if r["backend"] == "local" and r["servers"] == count and "healthy_s" in r]
            if ray_rows:
                summary[f"ray_healthy_s_{count}"] = max(r["healthy_s"] for r in ray_rows)  # the worst round
            for mode in RAY_MODES:
                ray_rate = [r[mode]["steps_per_s"] for r in ray_rows if mode in r]
                local_rate = [r[mode]["steps_per_s"] for r in local_rows if mode in r]
                if ray_rate and local_rate:  # mean over the rounds
                    summary[f"ray_vs_local_{mode}_{count}"] = statistics.mean(ray_rate) / statistics.mean(local_rate)
        if f"ray_healthy_s_{max(counts)}" in summary and max(counts) >= 64:
            summary["target_64_healthy_30s"] = summary[f"ray_healthy_s_{max(counts)}"] <= 30.0
        ratios = [v for k, v in summary.items() if k.startswith("ray_vs_local_per-env")]
        if ratios:
            summary["target_per_env_0.9x"] = min(ratios) >= 0.9
        _write(args, rows, [], summary)
    return 1 if any("error" in r for r in rows) else 0


async def main(args: argparse.Namespace) -> int:
    if args.backend == "ray":
        return await run_ray(args)
    backends = args.backends.split(",")
    ours = "swarm" in backends and await _swarm_state() == "inactive"
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        if ours:
            await _init_swarm()
        async with asyncio.timeout(args.max_seconds):
            for backend in backends:
                rows.append(await run_backend(backend, args))
    finally:
        if ours:
            try:
                await _leave_swarm()
            except aiodocker.DockerError as exc:
                notes.append(f"could not leave the swarm: {exc}; run `docker swarm leave --force`")
        _write(args, rows, notes)
    return 1 if notes or any("error" in r for r in rows) else 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], notes: list[str], summary: dict[str, Any] | None = None) -> None:
    by = {r["backend"]: r for r in rows}
    summary = {} if summary is None else summary
    if "swarm" in by and "docker" in by and "per-env" in by["swarm"] and "per-env" in by["docker"]:
        for mode in ("per-env", "batched"):
            summary[f"swarm_vs_docker_{mode}"] = by["swarm"][mode]["steps_per_s"] / by["docker"][mode]["steps_per_s"]
        summary["target_swarm_80pct"] = summary["swarm_vs_docker_per-env"] >= 0.8
    if "healthy_s" in by.get("swarm", {}):
        summary["target_healthy_60s"] = by["swarm"]["healthy_s"] <= 60.0
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "args": vars(args),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "notes": notes}, indent=2), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=128)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--backends", default="swarm,docker")
    parser.add_argument("--image", default="envfleet:latest")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--max-seconds", type=float, default=1500.0, help="bound on the whole run")
    parser.add_argument("--out", default=None, help=f"default {OUT} (--backend ray: scale_out_ray.json beside it)")
    parser.add_argument("--backend", choices=["ray"], help="ray: Ray server actors against local servers (--counts)")
    parser.add_argument("--counts", default="8,32,64", help="--backend ray: server counts to measure")
    parser.add_argument("--rounds", type=int, default=2, help="--backend ray: measurements of each backend per count")
    parser.add_argument("--ray-cpus", type=float, default=1.0, help="--backend ray: num_cpus of each server actor")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(OUT.with_name("scale_out_ray.json") if args.backend == "ray" else OUT)
    return args


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(parse_args())))
