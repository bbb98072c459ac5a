"""EnvPool throughput and step latency over the local backend, OpenSpiel catch, n = 1 .. 4096 sessions.

usage: python loadtests/pool_throughput.py [--sizes 1,16,256,1024,4096] [--servers 2]
                                           [--seconds 5] [--warmup 1] [--options JSON] [--no-uvloop]
                                           [--out loadtests/out/pool_throughput.json]

Each n gets a fresh ``EnvPool(n, env="openspiel", game="catch", servers=S)``; the per-env
API (n coroutines each awaiting its own env's ``step``) is measured for every n and the
batched API (``pool.step`` over each server's envs) for n >= 16, both by ``rollout.commands.bench.measure``,
which counts full observations (legal actions, the catch tensor and the text rendering;
``--options '{"text": false}'`` measures tensor-only sessions). Each case also records
the CPU seconds the client and the servers used, so results from a busy machine can be read
as steps per CPU second as well as steps per wall second. A case that raises
is recorded with its error and the run goes on; the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from common import cpu_seconds  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from rollout.commands.bench import BenchResult, measure
from rollout.pool import EnvPool

OUT = Path(__file__).resolve().parent / "out" / "pool_throughput.json"

# issue 3 targets on this 2-core machine type: (mode, n) -> (field, bound, "min" | "max")
TARGETS: dict[tuple[str, int], list[tuple[str, float, str]]] = {
    ("per-env", 1): [("latency_p50_ms", 0.150, "max")],
    ("per-env", 256): [("steps_per_s", 100_000, "min")],
    ("batched", 256): [("steps_per_s", 200_000, "min")],
    ("per-env", 4096): [("latency_p99_ms", 100.0, "max"), ("errors", 0, "max")],
}


class CpuUse(msgspec.Struct):
    """CPU time the client and the servers used in the measured window.

    On a busy machine steps/s says as much about the neighbours as about the code;
    ``steps_per_cpu_s`` (steps per CPU second of client plus servers) much less so.
    """

    client_s: float
    servers_s: float
    cores_used: float  # (client_s + servers_s) / wall seconds: how much of the machine this case got
    steps_per_cpu_s: float


class CpuMeter:
    """Reads this process's CPU time and that of the server processes ``pids`` (Linux /proc)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._client = self._servers = self._wall = 0.0

    def _server_seconds(self) -> float:
        return sum(map(cpu_seconds, self.pids))

    def start(self) -> None:
        self._client, self._servers, self._wall = time.process_time(), self._server_seconds(), time.perf_counter()

    def stop(self, steps: int) -> CpuUse:
        wall = time.perf_counter() - self._wall
        client = time.process_time() - self._client
        servers = self._server_seconds() - self._servers
        used = client + servers
        return CpuUse(
            client_s=round(client, 3),
            servers_s=round(servers, 3),
            cores_used=round(used / wall, 2) if wall > 0 else 0.0,
            steps_per_cpu_s=round(steps / used, 1) if used > 0 else 0.0,
        )


class Case(msgspec.Struct):
    """One measured (n, mode), or the error that stopped it."""

    n: int
    mode: str
    result: BenchResult | None = None
    cpu: CpuUse | None = None
    error: str | None = None
    targets: list[str] = []  # "field <= bound: met" / "... MISSED"


def server_pids(pool: EnvPool) -> list[int]:
    """PIDs of a local pool's envserver processes."""
    backend: Any = pool.backend
    return [backend.pid(url) for url in pool.servers]


async def measure_with_cpu(pool: EnvPool, mode: str, seconds: float, warmup: float) -> tuple[BenchResult, CpuUse]:
    """``measure`` after an unmeasured warm-up, with the CPU used by client and servers."""
    if warmup > 0:
        await measure(pool, mode, warmup, warmup=0)
    meter = CpuMeter(server_pids(pool))
    meter.start()
    result = await measure(pool, mode, seconds, warmup=0)
    return result, meter.stop(result.steps)


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


def check_targets(case: Case) -> list[str]:
    notes = []
    for name, bound, kind in TARGETS.get((case.mode, case.n), []):
        if case.result is None:
            notes.append(f"{name} {'>=' if kind == 'min' else '<='} {bound:g}: MISSED (case failed)")
            continue
        value = getattr(case.result, name)
        met = value >= bound if kind == "min" else value <= bound
        notes.append(f"{name} {'>=' if kind == 'min' else '<='} {bound:g}: {'met' if met else 'MISSED'} ({value:g})")
    return notes


async def run_size(n: int, servers: int, seconds: float, warmup: float, options: dict[str, Any]) -> list[Case]:
    modes = ["per-env", "batched"] if n >= 16 else ["per-env"]
    cases: list[Case] = []
    try:
        async with EnvPool(n=n, env="openspiel", game="catch", backend="local", servers=servers, options=options) as pool:
            for mode in modes:
                case = Case(n=n, mode=mode)
                try:
                    case.result, case.cpu = await measure_with_cpu(pool, mode, seconds, warmup)
                except Exception as exc:  # record it and go on with the other cases
                    case.error = f"{type(exc).__name__}: {exc}"
                cases.append(case)
                print(f"  n={n:>5} {mode:<8} {summary(case)}", file=sys.stderr, flush=True)
    except Exception as exc:  # the pool itself failed (start-up or close)
        done = {case.mode for case in cases}
        cases += [Case(n=n, mode=mode, error=f"{type(exc).__name__}: {exc}") for mode in modes if mode not in done]
    for case in cases:
        case.targets = check_targets(case)
    return cases


def summary(case: Case) -> str:
    r = case.result
    if r is None:
        return f"ERROR {case.error}"
    cpu = f"  cores used {case.cpu.cores_used:.2f}  {case.cpu.steps_per_cpu_s:,.0f} steps/CPU-s" if case.cpu else ""
    return f"{r.steps_per_s:>10,.0f} steps/s  p50 {r.latency_p50_ms:.3f} ms  p99 {r.latency_p99_ms:.3f} ms  errors {r.errors}{cpu}"


def table(cases: list[Case]) -> str:
    rows = [
        "| n | API | servers | steps/s | episodes/s | p50 ms/step | p99 ms/step | steps | errors | cores used | steps/CPU-s | target |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        target = "; ".join(case.targets)
        r = case.result
        if r is None:
            rows.append(f"| {case.n} | {case.mode} | | | | | | | 1: {case.error} | | | {target} |")
            continue
        cpu = f"{case.cpu.cores_used:.2f} | {case.cpu.steps_per_cpu_s:,.0f}" if case.cpu else " | "
        rows.append(
            f"| {r.n} | {r.mode} | {r.servers} | {r.steps_per_s:,.0f} | {r.episodes_per_s:,.0f} | "
            f"{r.latency_p50_ms:.3f} | {r.latency_p99_ms:.3f} | {r.steps:,} | {r.errors} | {cpu} | {target} |"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    info = machine()
    started = time.time()
    cases: list[Case] = []
    for n in args.sizes:
        cases += await run_size(n, args.servers, args.seconds, args.warmup, args.options)
    info["loadavg_at_end"] = os.getloadavg()
    report = {
        "benchmark": "pool_throughput",
        "env": "openspiel",
        "game": "catch",
        "options": args.options,
        "backend": "local",
        "servers": args.servers,
        "seconds_per_case": args.seconds,
        "warmup": args.warmup,
        "uvloop": not args.no_uvloop,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "machine": info,
        "errors": sum(1 if c.result is None else c.result.errors for c in cases),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    if args.options:
        print(f"session options: {json.dumps(args.options)}")
    print(table(cases))
    print(f"\nmachine: {info['cpus']} vCPU {info['cpu_model']}, load average {info['loadavg_at_start'][0]:.2f} -> "
          f"{info['loadavg_at_end'][0]:.2f}; JSON: {args.out}")
    return 1 if report["errors"] else 0


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=[1, 16, 256, 1024, 4096], help="comma-separated session counts")
    parser.add_argument("--servers", type=int, default=2, help="local envserver processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each case")
    parser.add_argument("--options", type=json.loads, default={}, help='JSON object of session options, e.g. \'{"text": false}\' (default: none)')
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
