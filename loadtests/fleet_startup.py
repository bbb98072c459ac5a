"""Docker fleet start-up: time until K containers answer /health, idle memory, teardown.

usage: python loadtests/fleet_startup.py [--sizes 1,8,32,64] [--image envfleet:latest]
                                         [--max-creating 8] [--out loadtests/out/fleet_startup.json]

Each K runs a fresh DockerFleet (the same code path as EnvPool(backend="docker")):
``start()`` until every container answers /health, then 2 s idle, then the memory
of each container from its cgroup, then ``stop()`` (force-remove all).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from rollout.config import FleetConfig
from rollout.fleet.docker import DockerFleet, list_containers

MIB = 1024 * 1024


def cgroup_memory(container_id: str) -> tuple[int, int] | None:
    """(usage, rss) bytes of a container from cgroup v1, or v2 as a fallback."""
    v1 = glob.glob(f"/sys/fs/cgroup/memory/docker/{container_id}*/")
    if v1:
        usage = int(Path(v1[0], "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in Path(v1[0], "memory.stat").read_text().splitlines())
        return usage, int(stat.get("total_rss", stat.get("rss", 0)))
    v2 = glob.glob(f"/sys/fs/cgroup/system.slice/docker-{container_id}*.scope/") or glob.glob(
        f"/sys/fs/cgroup/docker/{container_id}*/"
    )
    if v2:
        usage = int(Path(v2[0], "memory.current").read_text())
        stat = dict(line.split() for line in Path(v2[0], "memory.stat").read_text().splitlines())
        return usage, int(stat.get("anon", 0))
    return None


def cgroup_cpu(container_id: str) -> float | None:
    """CPU seconds a container has used (cgroup v1 cpuacct, or v2 cpu.stat)."""
    v1 = glob.glob(f"/sys/fs/cgroup/cpuacct/docker/{container_id}*/cpuacct.usage")
    if v1:
        return int(Path(v1[0]).read_text()) / 1e9
    v2 = glob.glob(f"/sys/fs/cgroup/system.slice/docker-{container_id}*.scope/cpu.stat")
    if v2:
        stat = dict(line.split() for line in Path(v2[0]).read_text().splitlines())
        return int(stat["usage_usec"]) / 1e6
    return None


DAEMONS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2")


def daemon_cpu() -> float:
    """CPU seconds used so far by dockerd, containerd and the shims (with their reaped runc children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm in DAEMONS or comm.startswith("containerd-shim"):
            fields = text[text.rindex(")") + 2 :].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


async def run_one(k: int, image: str, max_creating: int) -> dict[str, Any]:
    fleet = DockerFleet(FleetConfig(backend="docker", image=image, servers=k, max_creating=max_creating))
    load_before = os.getloadavg()[0]  # other work on the machine skews the wall times
    daemon_before = daemon_cpu()
    client_before = time.process_time()
    started = time.monotonic()
    await fleet.start()
    healthy = time.monotonic() - started
    client = time.process_time() - client_before
    try:
        await asyncio.sleep(2.0)
        rows = [r for r in await list_containers() if r["pool"] == fleet.pool_id]
        memory = [m for r in rows if (m := cgroup_memory(r["id"])) is not None]
        cpu = [c for r in rows if (c := cgroup_cpu(r["id"])) is not None]
        daemon = daemon_cpu() - daemon_before
    finally:
        t0 = time.monotonic()
        await fleet.stop()
        teardown = time.monotonic() - t0
    result: dict[str, Any] = {
        "containers": k,
        "max_creating": max_creating,
        "all_healthy_s": round(healthy, 2),
        "containers_per_s": round(k / healthy, 2),
        "teardown_s": round(teardown, 2),
        "loadavg_1m_before": round(load_before, 2),
    }
    if cpu:
        result["container_cpu_s_each"] = round(statistics.mean(cpu), 3)
    result["daemon_cpu_s_each"] = round(daemon / k, 3)
    result["client_cpu_s"] = round(client, 2)
    if memory:
        result["idle_mem_usage_mib"] = round(statistics.mean(u for u, _ in memory) / MIB, 1)
        result["idle_rss_mib"] = round(statistics.mean(r for _, r in memory) / MIB, 1)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,8,32,64")
    parser.add_argument("--image", default="envfleet:latest")
    parser.add_argument("--max-creating", type=int, default=FleetConfig().max_creating)
    parser.add_argument("--out", default="loadtests/out/fleet_startup.json")
    args = parser.parse_args()

    results = []
    for k in (int(s) for s in args.sizes.split(",")):
        result = await run_one(k, args.image, args.max_creating)
        results.append(result)
        cpu = f", CPU/container {result.get('container_cpu_s_each', '?')} s in it + {result['daemon_cpu_s_each']} s daemons, client {result['client_cpu_s']} s"
        mem = f", idle {result.get('idle_mem_usage_mib', '?')} MiB/container" if "idle_rss_mib" in result else ""
        print(
            f"K={k:3d}: all healthy in {result['all_healthy_s']:6.2f} s "
            f"({result['containers_per_s']:.1f}/s){cpu}{mem}, teardown {result['teardown_s']:.2f} s",
            flush=True,
        )
    report = {
        "benchmark": "fleet_startup",
        "image": args.image,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
