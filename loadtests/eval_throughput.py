"""Eval job throughput: ``rollout.evaluate`` (JSONL writing on) vs the bare ``pool.run`` loop.

usage: python loadtests/eval_throughput.py [--episodes 20000] [--rounds 3] [--n 256] [--servers N]
                                           [--out loadtests/out/eval_throughput.json]

OpenSpiel catch, the built-in random policy (seeded per episode) in both modes. Each
round runs both modes back to back (bare first in even rounds, eval first in odd ones) so
load drift from other work hits both alike, and the verdict uses the median over rounds
of eval/bare within a round; each
round starts a fresh local fleet whose start-up is not timed. "bare" is
``async for record in pool.run(...)`` counting records; "eval" is ``evaluate()`` writing
one JSONL line per episode to a fresh file (fsync about once a second), the progress
reporter on (plain lines to /dev/null). Besides episodes/s, the client's CPU time per
episode (``time.process_time`` of this process; the servers are other processes) isolates
the cost of the eval machinery from the machine's load, and a micro-benchmark times the
per-episode write path alone (building the line, encoding it, one ``write``). During the
eval rounds the wall time spent inside ``ResultsFile.append`` is summed too (wrapped here,
not in the library): the share of the run the event loop spent writing results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rollout import EnvPool, evaluate
from rollout.commands.eval import BUILTIN_POLICIES, outcome
from rollout.commands.results import EpisodeLine, Header, ResultsFile
from rollout.pool import EpisodeRecord

TARGET = 0.90
_append_seconds = [0.0]
_append = ResultsFile.append


def _timed_append(self: ResultsFile, line: EpisodeLine) -> None:
    start = time.perf_counter()
    _append(self, line)
    _append_seconds[0] += time.perf_counter() - start


async def bare(episodes: int, n: int, servers: int | None) -> dict[str, Any]:
    async with EnvPool(n=n, env="openspiel", game="catch", servers=servers) as pool:
        count = 0
        cpu, wall = time.process_time(), time.perf_counter()
        async for _ in pool.run(BUILTIN_POLICIES["random"], episodes, 0, per_episode=True):
            count += 1
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert count == episodes
    return {"mode": "bare", "episodes": count, "seconds": wall, "episodes_per_s": count / wall, "client_cpu_us_per_episode": cpu / count * 1e6}


async def with_eval(episodes: int, n: int, servers: int | None, directory: str) -> dict[str, Any]:
    out = os.path.join(directory, f"eval-{time.monotonic_ns()}.jsonl")
    _append_seconds[0] = 0.0
    ResultsFile.append = _timed_append  # type: ignore[method-assign]
    with open(os.devnull, "w") as devnull:
        cpu = time.process_time()
        summary = await evaluate("random", episodes, out=out, n=n, game="catch", servers=servers, progress=devnull, progress_interval=1.0)
        cpu = time.process_time() - cpu
    ResultsFile.append = _append  # type: ignore[method-assign]
    lines = Path(out).read_bytes().count(b"\n") - 1
    os.unlink(out)
    assert summary.played == episodes == lines and summary.seconds
    # the CPU above also covers the fleet start-up; subtract a bare pool's start/stop estimate below
    return {"mode": "eval", "episodes": episodes, "seconds": summary.seconds, "episodes_per_s": summary.episodes_per_s,
            "client_cpu_us_per_episode_incl_startup": cpu / episodes * 1e6,
            "append_wall_share": _append_seconds[0] / summary.seconds}  # fmt: skip


async def startup_cpu(n: int, servers: int | None) -> float:
    """Client CPU seconds of starting and stopping a pool (to subtract from the eval rounds)."""
    cpu = time.process_time()
    async with EnvPool(n=n, env="openspiel", game="catch", servers=servers):
        pass
    return time.process_time() - cpu


async def write_path_us(directory: str, count: int = 50_000) -> float:
    """Client CPU µs per episode of what eval adds to a record: the line, its encoding, one write."""
    header = Header(env="openspiel", options={"game": "catch"}, seed=0, policy="random", episodes=count)
    results = ResultsFile.open(os.path.join(directory, "write-path.jsonl"), header)
    record = EpisodeRecord(0, 4_128_000_000_000_000_000, 1.0, 10, {"server": "http://127.0.0.1:40000", "env": 3, "wall_time": 0.0123, "returns": [1.0]})
    cpu = time.process_time()
    for i in range(count):
        info = record.info
        results.append(EpisodeLine(episode=i, seed=record.seed, ret=record.reward, length=record.length, outcome=outcome(record),
                                   wall_time=round(info["wall_time"], 6), server=info["server"], time=round(time.time(), 3)))  # fmt: skip
    cpu = time.process_time() - cpu
    await results.close()
    return cpu / count * 1e6


def load_average() -> float:
    return os.getloadavg()[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--servers", type=int)
    parser.add_argument("--out", default="loadtests/out/eval_throughput.json")
    args = parser.parse_args()

    rounds: list[dict[str, Any]] = []
    start_cpu = statistics.median([await startup_cpu(args.n, args.servers) for _ in range(2)])
    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as directory:
        write_us = await write_path_us(directory)
        for index in range(args.rounds):
            for mode in ("bare", "eval") if index % 2 == 0 else ("eval", "bare"):
                load = load_average()
                if mode == "bare":
                    row = await bare(args.episodes, args.n, args.servers)
                else:
                    row = await with_eval(args.episodes, args.n, args.servers, directory)
                    total = row.pop("client_cpu_us_per_episode_incl_startup") * args.episodes / 1e6
                    row["client_cpu_us_per_episode"] = max(0.0, total - start_cpu) / args.episodes * 1e6
                row.update(round=index, load_avg_1m=load)
                rounds.append(row)
                share = f"  writing {row['append_wall_share']:.1%} of wall" if mode == "eval" else ""
                print(f"round {index} {mode:>4}: {row['episodes_per_s']:8,.0f} episodes/s  "
                      f"client CPU {row['client_cpu_us_per_episode']:6.1f} µs/episode{share}  (load {load:.1f})", flush=True)  # fmt: skip

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds if r["mode"] == mode)

    bare_rate, eval_rate = median("bare", "episodes_per_s"), median("eval", "episodes_per_s")
    by_round = {(r["round"], r["mode"]): r for r in rounds}
    ratios = [by_round[i, "eval"]["episodes_per_s"] / by_round[i, "bare"]["episodes_per_s"] for i in range(args.rounds)]
    result = {
        "test": "eval_throughput",
        "env": "openspiel",
        "game": "catch",
        "n": args.n,
        "servers": args.servers,
        "episodes_per_round": args.episodes,
        "rounds": rounds,
        "bare_episodes_per_s_median": bare_rate,
        "eval_episodes_per_s_median": eval_rate,
        "ratio_of_medians": eval_rate / bare_rate,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "bare_client_cpu_us_per_episode": median("bare", "client_cpu_us_per_episode"),
        "eval_client_cpu_us_per_episode": median("eval", "client_cpu_us_per_episode"),
        "cpu_efficiency": median("bare", "client_cpu_us_per_episode") / median("eval", "client_cpu_us_per_episode"),
        "pool_start_stop_client_cpu_s": start_cpu,
        "write_path_client_cpu_us_per_episode": write_us,
        "write_path_share_of_bare_client_cpu": write_us / median("bare", "client_cpu_us_per_episode"),
        "append_wall_share_of_eval_median": median("eval", "append_wall_share"),
        "target": f"eval >= {TARGET:.0%} of bare",
        "met": statistics.median(ratios) >= TARGET,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
