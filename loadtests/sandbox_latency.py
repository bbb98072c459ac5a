"""Python sandbox: step latency of ``print(1)``, grading latency, and how many sandboxes one server holds.

Starts ``python -m envserver --env python_sandbox`` on 127.0.0.1 (port 0) and drives it
over ``WS /v1/mux`` from this process:

* latency: ``--steps`` sequential ``print(1)`` steps per session, with 1 and with 16
  sessions stepping concurrently on one connection; per-step time from send to reply;
* grading: one session submits each built-in task's reference solution (reset, then one
  step), ``--grading-rounds`` times over the 20 tasks; the step's time from send to reply
  (the cell plus the grading) and the grading's own time (the step's
  ``info["grading_seconds"]``: a fresh grading process in a fresh sandbox, replay,
  tests, comparison). Run with the server's default isolation (namespaces where
  bubblewrap works) and with ``isolation="process"``; each with the step sent right after
  the reset, and after ``--think-ms`` (the time an agent takes to answer, during which
  the next grading process starts);
* capacity: opens and resets sandboxes in batches of 16 until one is refused, a reset
  takes over 30 s, ``--max-sandboxes`` is reached or the machine's available memory drops
  under ``--min-free-gb``; then one ``print(1)`` on every sandbox, close all, and check
  that no interpreter is left. Run twice: with the server's file limit as it is, and
  with ``ulimit -n 1024`` (a common default), where each sandbox's five pipe/pidfd
  descriptors make the file limit bite first.

    python loadtests/sandbox_latency.py [--steps 500] [--max-sandboxes 400]

Writes ``loadtests/out/sandbox_latency.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from common import proc_stat  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from envserver.envs.sandbox_isolation import descendants
from envserver.envs.sandbox_tasks import TASKS
from envserver.protocol import Close, Open, Reply, Reset, Step, msgpack_decoder, msgpack_encoder
from rollout.telemetry import percentile

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "sandbox_latency.json"
PRINT_1 = {"code": "print(1)"}
_replies = msgpack_decoder(list[Reply])


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def interpreters_of(server_pid: int) -> list[int]:
    """Live children of the server: its sandboxes (the interpreter, or bubblewrap around it)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields and int(fields[1]) == server_pid and fields[0] != b"Z":
                found.append(int(name))
    return found


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes and all their descendants (bubblewrap, its init, the interpreter)."""
    total = 0
    for pid in {p for root in pids for p in (root, *descendants(root))}:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 2**20


class Server:
    def __init__(self, nofile: int | None, env_options: dict[str, Any] | None = None) -> None:
        command = [sys.executable, "-m", "envserver", "--env", "python_sandbox", "--port", "0", "--max-sessions", "100000", "--no-web"]
        if env_options:
            command += ["--env-options", json.dumps(env_options)]
        if nofile:
            command = ["sh", "-c", f"ulimit -n {nofile} && exec {shlex.join(command)}"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if " listening on " not in line:
            self.proc.kill()
            raise RuntimeError(f"envserver did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[-1].replace("http://", "ws://") + "/v1/mux"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Mux:
    """A minimal ``/v1/mux`` client: one future per request id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            for reply in _replies.decode(message.data):
                future = self.pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)

    async def call(self, kind: type, sid: int, *fields: Any, timeout: float = 60.0) -> Reply:
        rid = next(self.ids)
        future = self.pending[rid] = asyncio.get_running_loop().create_future()
        await self.ws.send_bytes(msgpack_encoder.encode([kind(rid, sid, *fields)]))
        return await asyncio.wait_for(future, timeout)


def _check(reply: Reply, what: str) -> Any:
    if not reply.ok:
        raise RuntimeError(f"{what} failed: {reply.body}")
    return reply.body


async def latency(mux: Mux, sessions: int, steps: int, first_sid: int) -> dict[str, Any]:
    sids = range(first_sid, first_sid + sessions)
    for sid in sids:
        _check(await mux.call(Open, sid), "open")
    resets = await asyncio.gather(*(mux.call(Reset, sid) for sid in sids))
    for reply in resets:
        _check(reply, "reset")
    times: list[float] = []

    async def drive(sid: int) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            body = _check(await mux.call(Step, sid, PRINT_1), "step")
            times.append(time.perf_counter() - start)
            assert body["observation"]["stdout"] == "1\n", body

    started = time.perf_counter()
    await asyncio.gather(*(drive(sid) for sid in sids))
    elapsed = time.perf_counter() - started
    for sid in sids:
        await mux.call(Close, sid)
    times.sort()
    return {
        "sessions": sessions,
        "steps": len(times),
        "p50_ms": round(percentile(times, 0.50) * 1000, 3),
        "p99_ms": round(percentile(times, 0.99) * 1000, 3),
        "steps_per_s": round(len(times) / elapsed, 1),
    }


async def grading(http: aiohttp.ClientSession, rounds: int, isolation: str, think: float) -> dict[str, Any]:
    server = Server(None, {"isolation": isolation})
    try:
        mux = Mux(await http.ws_connect(server.url, max_msg_size=64 * 2**20))
        _check(await mux.call(Open, 0), "open")
        step_times: list[float] = []
        grade_times: list[float] = []
        mode = None
        for _ in range(rounds):
            for name, task in TASKS.items():
                reset = _check(await mux.call(Reset, 0, None, {"task": name}), "reset")
                mode = reset["info"]["isolation"]
                await asyncio.sleep(think)  # the agent reading the prompt: the spare grading process starts meanwhile
                start = time.perf_counter()
                body = _check(await mux.call(Step, 0, {"code": task.solution}), "step")
                step_times.append(time.perf_counter() - start)
                assert body["reward"] == 1.0, (name, body)
                grade_times.append(body["info"]["grading_seconds"])
        await mux.call(Close, 0)
        await mux.ws.close()
    finally:
        server.stop()
    step_times.sort()
    grade_times.sort()
    return {
        "isolation": mode,
        "think_ms": round(think * 1000),
        "gradings": len(grade_times),
        "step_p50_ms": round(percentile(step_times, 0.50) * 1000, 1),
        "step_p99_ms": round(percentile(step_times, 0.99) * 1000, 1),
        "grading_p50_ms": round(percentile(grade_times, 0.50) * 1000, 1),
        "grading_p99_ms": round(percentile(grade_times, 0.99) * 1000, 1),
    }


async def capacity(http: aiohttp.ClientSession, nofile: int | None, bound: int, min_free_gb: float) -> dict[str, Any]:
    server = Server(nofile)
    try:
        mux = Mux(await http.ws_connect(server.url, max_msg_size=64 * 2**20))
        held, stopped_by, reset_times, live = 0, f"the test's bound of {bound} sandboxes", [], []
        next_sid = 0
        while held < bound:
            if mem_available_gb() < min_free_gb:
                stopped_by = f"the test's memory floor: under {min_free_gb} GB available"
                break
            batch = range(next_sid, next_sid + min(16, bound - held))
            next_sid = batch.stop
            for sid in batch:
                _check(await mux.call(Open, sid), "open")
            start = time.perf_counter()
            try:
                replies = await asyncio.gather(*(mux.call(Reset, sid, timeout=30.0) for sid in batch))
            except asyncio.TimeoutError:
                stopped_by = "a reset took over 30 s"
                break
            reset_times.append((time.perf_counter() - start) / len(batch))
            refused = [r.body for r in replies if not r.ok]
            live += [sid for sid, r in zip(batch, replies) if r.ok]
            held = len(live)
            if refused:
                stopped_by = f"refused: {refused[0]['code']}: {refused[0]['message']}"
                break
        pids = interpreters_of(server.proc.pid)
        rss = rss_mb(pids)
        step_times = []
        for sid in live:
            start = time.perf_counter()
            _check(await mux.call(Step, sid, PRINT_1), "step at capacity")
            step_times.append(time.perf_counter() - start)
        health = await http.get(server.url.replace("ws://", "http://").replace("/v1/mux", "/health"))
        healthy = health.status == 200
        await mux.ws.close()  # closes every session of the connection
        deadline = time.monotonic() + 30
        while (left := interpreters_of(server.proc.pid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return {
            "server_nofile": nofile or "inherited",
            "held": held,
            "stopped_by": stopped_by,
            "interpreters_running": len(pids),
            "rss_mb_per_sandbox": round(rss / max(1, len(pids)), 1),
            "reset_ms_per_sandbox_p50": round(percentile(sorted(reset_times), 0.5) * 1000, 1),
            "step_p50_ms_at_capacity": round(percentile(sorted(step_times), 0.5) * 1000, 3),
            "server_healthy_after": healthy,
            "interpreters_left_after_close": len(left),
        }
    finally:
        server.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    grades: list[dict[str, Any]] = []
    caps: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        if "latency" in args.parts:
            server = Server(None)
            try:
                mux = Mux(await http.ws_connect(server.url))
                rows = [await latency(mux, 1, args.steps, 0), await latency(mux, 16, args.steps, 100)]
                await mux.ws.close()
            finally:
                server.stop()
        if "grading" in args.parts:
            for think in (0.0, args.think_ms / 1000):
                for isolation in ("auto", "process"):
                    grades.append(await grading(http, args.grading_rounds, isolation, think))
        if "capacity" in args.parts:
            caps = [await capacity(http, None, args.max_sandboxes, args.min_free_gb)]
            caps.append(await capacity(http, 1024, args.max_sandboxes, args.min_free_gb))
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]},
        "command": "python loadtests/sandbox_latency.py " + " ".join(sys.argv[1:]),
        "latency": rows,
        "grading": grades,
        "capacity": caps,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "| sessions | steps | p50 ms | p99 ms | steps/s |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {r['sessions']} | {r['steps']} | {r['p50_ms']} | {r['p99_ms']} | {r['steps_per_s']} |" for r in result["latency"]),
        "",
        "| isolation | think ms | gradings | step p50 ms | step p99 ms | grading p50 ms | grading p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {g['isolation']} | {g['think_ms']} | {g['gradings']} | {g['step_p50_ms']} | {g['step_p99_ms']} | {g['grading_p50_ms']} | "
            f"{g['grading_p99_ms']} |"
            for g in result["grading"]
        ),
        "",
        "| server fd limit | sandboxes held | stopped by | RSS MB / sandbox | reset ms / sandbox | step p50 ms at capacity | healthy after | left after close |",
        "|---|---:|---|---:|---:|---:|---|---:|",
        *(
            f"| {c['server_nofile']} | {c['held']} | {c['stopped_by']} | {c['rss_mb_per_sandbox']} | "
            f"{c['reset_ms_per_sandbox_p50']} | {c['step_p50_ms_at_capacity']} | {c['server_healthy_after']} | "
            f"{c['interpreters_left_after_close']} |"
            for c in result["capacity"]
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="print(1) steps per session in the latency runs")
    parser.add_argument("--max-sandboxes", type=int, default=400, help="stop the capacity runs here")
    parser.add_argument("--min-free-gb", type=float, default=6.0, help="stop the capacity runs when less memory is available")
    parser.add_argument("--grading-rounds", type=int, default=5, help="passes over the 20 tasks in the grading runs")
    parser.add_argument("--think-ms", type=float, default=200.0, help="pause between reset and step in the second grading runs")
    parser.add_argument(
        "--parts", type=lambda v: set(v.split(",")), default={"latency", "grading", "capacity"}, help="comma-separated: latency,grading,capacity"
    )
    result = asyncio.run(main(parser.parse_args()))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
