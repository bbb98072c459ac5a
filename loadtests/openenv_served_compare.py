"""One OpenEnv environment on two servers, side by side in one run: envserver (through the adapter) vs OpenEnv's own.

usage: python loadtests/openenv_served_compare.py [--sizes 1,64,256] [--seconds 5] [--warmup 1]
                                                  [--servers 2] [--openenv-servers 2]
                                                  [--out loadtests/out/openenv_served_compare.json]

The environment is ``openenv_catch.CatchEnvironment``: catch written against
``openenv.core.env_server.Environment`` with pydantic models, unchanged on both sides.

(a) OpenEnv's stack: ``create_app`` under uvicorn in ``--openenv-servers`` processes,
    OpenEnv's async ``GenericEnvClient``, one WebSocket per session (``openenv_compare.py``).
(b) envfleet: ``envserver --env openenv:openenv_catch:CatchEnvironment`` in ``--servers``
    local processes, ``EnvPool`` per-env and (n >= 16) batched, as ``rollout bench`` measures.

For each n the cases run back to back, so they see the same machine load. Both sides step
with a uniform random legal action and receive the full observation. Every subprocess is
stopped in ``finally``; servers also exit when their standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from openenv_compare import OpenEnvServers, Row, arguments, compare_sizes, line, openenv_row, table, with_ratios, write_json  # same directory
from pool_throughput import machine, measure_with_cpu
from rollout import EnvPool

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "openenv_served_compare.json"
TARGET = "openenv:openenv_catch:CatchEnvironment"
RATIO_TARGET = (256, 20.0)  # envfleet serving the OpenEnv environment >= 20x OpenEnv's own server at 256 sessions


async def measure_served(n: int, servers: int, seconds: float, warmup: float) -> list[Row]:
    """envserver serving the OpenEnv class: per-env, and batched from n = 16."""
    modes = ["per-env", "batched"] if n >= 16 else ["per-env"]
    rows = [Row(n=n, stack=f"envserver {mode}", servers=servers) for mode in modes]
    try:
        async with EnvPool(n=n, env=TARGET, backend="local", servers=servers) as pool:
            for row, mode in zip(rows, modes):
                try:
                    row.result, row.cpu = await measure_with_cpu(pool, mode, seconds, warmup)
                    row.error = f"{row.result.errors} errors" if row.result.errors else None
                except Exception as exc:  # recorded; the other cases go on
                    row.error = f"{type(exc).__name__}: {exc}"
                print(f"  n={n:>4} {line(row)}", file=sys.stderr, flush=True)
    except Exception as exc:  # the pool itself failed
        for row in rows:
            row.error = row.error or f"{type(exc).__name__}: {exc}"
    return rows


async def compare_size(n: int, openenv: OpenEnvServers, servers: int, seconds: float, warmup: float) -> list[Row]:
    return with_ratios([await openenv_row(openenv, n, seconds, warmup), *await measure_served(n, servers, seconds, warmup)])


def target_note(rows: list[Row]) -> str:
    n, bound = RATIO_TARGET
    ratios = [r.ratio for r in rows if r.n == n and r.ratio is not None]
    if not ratios:
        return f"target envserver/OpenEnv >= {bound:g}x at n={n}: not measured"
    best = max(ratios)
    return f"target envserver/OpenEnv >= {bound:g}x at n={n}: {'met' if best >= bound else 'MISSED'} ({best:g}x)"


async def main_async(args: argparse.Namespace) -> int:
    # The envserver processes import openenv_catch from this directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    info = machine()
    started = time.time()
    rows, openenv = await compare_sizes(args, compare_size)
    info["loadavg_at_end"] = os.getloadavg()
    errors = sum(1 if r.result is None else r.result.errors for r in rows)
    note = target_note(rows)
    report = {
        "benchmark": "openenv_served_compare",
        "env": TARGET,
        "seconds_per_case": args.seconds,
        "warmup": args.warmup,
        "envserver_servers": args.servers,
        "openenv_servers": args.openenv_servers,
        "openenv_max_concurrent_envs": openenv.max_sessions,
        "openenv_server_close_tracebacks": openenv.close_tracebacks,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "machine": info,
        "errors": errors,
        "target": note,
        "rows": rows,
    }
    write_json(args.out, report)
    print(table(rows).replace("envfleet / OpenEnv", "envserver / OpenEnv"))
    print(f"\n{note}")
    print(f"machine: {info['cpus']} vCPU {info['cpu_model']}, load average {info['loadavg_at_start'][0]:.2f} -> "
          f"{info['loadavg_at_end'][0]:.2f}; OpenEnv: {args.openenv_servers} uvicorn process(es), "
          f"envserver: {args.servers} process(es); JSON: {args.out}")
    return 1 if errors else 0


def main() -> None:
    parser = arguments(__doc__, [1, 64, 256], "envserver processes serving the OpenEnv class", OUT)
    args = parser.parse_args()
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
