"""Server throughput: OpenSpiel catch on ONE envserver process, driven from this process.

Two paths, each at 1, 64 and 256 sessions:

* ``mux``: ``WS /v1/mux`` with caller-built batch frames — up to 4 connections, each frame
  one ``steps`` request for every session of its connection, ``--depth`` frames in flight
  per connection so the server never idles. Sessions whose episode is over (catch: exactly
  9 steps) are reset by a ``resets`` request in the next frame instead; resets are not
  counted as steps.
* ``ws``: OpenEnv's ``WS /ws``, one connection per session, one JSON step per message.

Latency is per step: from sending the frame (or message) that carries it to receiving its
reply. Both paths measure the server: replies are read only for their ids, failures and end of episode,
not decoded into observations as a client must (``pool_throughput.py`` measures that);
the table says so. Failed steps are counted as errors, not as steps. Full observations (legal actions, the 50-float tensor and the text rendering) travel
on every step; ``--options '{"text": false}'`` measures tensor-only sessions.

    python loadtests/server_throughput.py [--seconds 5] [--options '{"text": false}']

Writes ``loadtests/out/server_throughput.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from common import cpu_seconds  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from envserver.protocol import Open, Reset, ResetMany, StepMany, msgpack_encoder, mux_reply_decoder
from rollout.fleet.health import wait_healthy
from rollout.telemetry import LatencyHistogram

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "server_throughput.json"
CATCH_STEPS = 9  # every catch episode is exactly this long
TARGETS = {("mux", 256): 200_000.0, ("ws", 64): 5_000.0}


class _WsObservation(msgspec.Struct, frozen=True):
    done: bool = False


class _WsObservationReply(msgspec.Struct):
    type: str
    data: _WsObservation = _WsObservation()


_ws_reply = msgspec.json.Decoder(_WsObservationReply)


class _BatchFailures(msgspec.Struct, array_like=True):
    """A ``Batch`` reply body read only for its failures."""

    results: msgspec.Raw
    failures: dict[int, Any] = {}


_batch_failures = msgspec.msgpack.Decoder(_BatchFailures)
_STEP_MESSAGES = [json.dumps({"type": "step", "data": {"action_id": a}}) for a in range(3)]
_RESET_MESSAGE = json.dumps({"type": "reset", "data": {}})


class Tally:
    """Steps answered without error inside the measuring window, and per-step latencies (a frame's, for each of its steps)."""

    def __init__(self) -> None:
        self.measuring = False
        self.steps = 0
        self.errors = 0
        self.latency = LatencyHistogram()

    def record(self, latency: float, steps: int, failed: int = 0) -> None:
        """A frame (or message) of ``steps`` steps, ``failed`` of which were answered with an error, took ``latency``."""
        if self.measuring and steps:
            self.steps += steps - failed
            self.errors += failed
            self.latency.observe(latency, steps)

    def summary(self, seconds: float) -> dict[str, Any]:
        marks = {name: round(self.latency.percentile(q) * 1000, 3) for name, q in (("p50_ms", 0.50), ("p99_ms", 0.99))}
        return {"steps": self.steps, "seconds": round(seconds, 3), "steps_per_s": round(self.steps / seconds, 1), "errors": self.errors, **marks}


# --------------------------------------------------------------------------- mux


async def mux_connection(http: aiohttp.ClientSession, url: str, sessions: int, depth: int, tally: Tally, stop: asyncio.Event) -> None:
    ws = await http.ws_connect(url + "/v1/mux", max_msg_size=0, compress=0)
    rng = random.Random(sessions)
    sids = list(range(sessions))
    await ws.send_bytes(msgpack_encoder.encode([Open(s, s) for s in sids] + [Reset(sessions + s, s, s) for s in sids]))
    replies = mux_reply_decoder.decode((await ws.receive()).data)
    while len(replies) < 2 * sessions:
        replies += mux_reply_decoder.decode((await ws.receive()).data)
    assert all(r.ok for r in replies), [r for r in replies if not r.ok][:3]
    issued = [0] * sessions  # steps issued since the last reset, per session
    next_id = 2 * sessions
    in_flight: deque[tuple[float, int, int, int]] = deque()  # (sent at, steps, requests, id of its steps request)
    failed: dict[int, int] = {}  # steps request id -> its sessions answered with an error

    def build() -> tuple[bytes, int, int]:
        nonlocal next_id
        resetting = [s for s in sids if issued[s] == CATCH_STEPS]
        stepping = [s for s in sids if issued[s] < CATCH_STEPS]
        frame: list[Any] = []
        if resetting:
            next_id += 1
            frame.append(ResetMany(next_id, resetting, [None] * len(resetting)))
        steps_id = 0
        if stepping:
            next_id += 1
            steps_id = next_id
            failed[steps_id] = 0
            frame.append(StepMany(next_id, stepping, [int(rng.random() * 3) for _ in stepping]))
        for s in resetting:
            issued[s] = 0
        for s in stepping:
            issued[s] += 1
        return msgpack_encoder.encode(frame), len(stepping), len(frame), steps_id

    async def send() -> None:
        data, steps, count, steps_id = build()
        in_flight.append((time.perf_counter(), steps, count, steps_id))
        await ws.send_bytes(data)

    for _ in range(depth):
        await send()
    answered = 0  # replies received toward the oldest frames in flight (the server may merge reply frames)
    while in_flight:
        message = await ws.receive()
        if message.type != aiohttp.WSMsgType.BINARY:
            raise RuntimeError(f"mux connection ended: {message.type} {message.data!r}")
        replies = mux_reply_decoder.decode(message.data)
        for reply in replies:  # only ids and failures are read: the observations are not decoded
            if reply.id not in failed:  # a reset: its failures are errors, and it counts no steps
                if tally.measuring:
                    tally.errors += 1 if not reply.ok else len(_batch_failures.decode(reply.body).failures)
            elif not reply.ok:
                failed[reply.id] = -1  # the whole request failed
            else:  # count the sessions that failed in it
                failed[reply.id] = len(_batch_failures.decode(reply.body).failures)
        answered += len(replies)
        now = time.perf_counter()
        while in_flight and answered >= in_flight[0][2]:
            sent, steps, count, steps_id = in_flight.popleft()
            answered -= count
            lost = failed.pop(steps_id, 0)
            tally.record(now - sent, steps, steps if lost < 0 else lost)
            if not stop.is_set():
                await send()
    await ws.close()


async def run_mux(http: aiohttp.ClientSession, url: str, sessions: int, connections: int, depth: int, seconds: float, warmup: float) -> dict[str, Any]:
    tally, stop = Tally(), asyncio.Event()
    per = [sessions // connections + (1 if i < sessions % connections else 0) for i in range(connections)]
    tasks = [asyncio.create_task(mux_connection(http, url, n, depth, tally, stop)) for n in per if n]
    return await measure(tally, stop, tasks, seconds, warmup, {"surface": "mux", "sessions": sessions, "connections": len(tasks), "frames_in_flight": depth})


# --------------------------------------------------------------------------- OpenEnv /ws


async def ws_session(http: aiohttp.ClientSession, url: str, seed: int, tally: Tally, stop: asyncio.Event) -> None:
    ws = await http.ws_connect(url + "/ws", max_msg_size=0, compress=0)
    rng = random.Random(seed)
    await ws.send_str(_RESET_MESSAGE)
    await ws.receive()
    perf = time.perf_counter
    while not stop.is_set():
        start = perf()
        await ws.send_str(_STEP_MESSAGES[int(rng.random() * 3)])
        message = await ws.receive()
        reply = _ws_reply.decode(message.data)
        if reply.type != "observation":
            tally.record(perf() - start, 1, failed=1)
            continue
        tally.record(perf() - start, 1)
        if reply.data.done:
            await ws.send_str(_RESET_MESSAGE)
            await ws.receive()
    await ws.send_str('{"type":"close"}')
    await ws.close()


async def run_ws(http: aiohttp.ClientSession, url: str, sessions: int, seconds: float, warmup: float) -> dict[str, Any]:
    tally, stop = Tally(), asyncio.Event()
    tasks = [asyncio.create_task(ws_session(http, url, i, tally, stop)) for i in range(sessions)]
    return await measure(tally, stop, tasks, seconds, warmup, {"surface": "ws", "sessions": sessions, "connections": sessions, "frames_in_flight": 1})


SERVER_PID = 0  # set by main_async: the server whose CPU time each case reports


async def measure(tally: Tally, stop: asyncio.Event, tasks: list[asyncio.Task[None]], seconds: float, warmup: float, case: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(warmup)
    tally.measuring = True
    start, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(SERVER_PID), time.process_time()
    await asyncio.sleep(seconds)
    tally.measuring = False
    elapsed = time.perf_counter() - start
    server_cpu, client_cpu = cpu_seconds(SERVER_PID) - server_cpu, time.process_time() - client_cpu
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    summary = tally.summary(elapsed)
    steps = max(summary["steps"], 1)
    return {
        **case,
        **summary,
        "server_cpu_share": round(server_cpu / elapsed, 2),  # 1.0 = one core busy the whole time
        "server_cpu_us_per_step": round(server_cpu / steps * 1e6, 2),
        "client_cpu_us_per_step": round(client_cpu / steps * 1e6, 2),
    }


# --------------------------------------------------------------------------- driver


def start_server(extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    command = [sys.executable, "-m", "envserver", "--env", "openspiel", "--game", "catch", "--port", "0", "--max-sessions", "100000", *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()  # type: ignore[union-attr]
    if " listening on " not in line:
        proc.kill()
        raise RuntimeError(f"envserver did not start: {line!r}")
    return proc, line.split()[-1]


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    global SERVER_PID
    proc, url = start_server([*(args.server_arg or []), "--env-options", json.dumps(args.options)])
    SERVER_PID = proc.pid
    results = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_healthy(http, url, time.monotonic() + 10.0)
            for sessions in args.sessions:
                case = await run_mux(http, url, sessions, min(args.connections, sessions), args.depth, args.seconds, args.warmup)
                print(json.dumps(case), file=sys.stderr, flush=True)
                results.append(case)
            for sessions in args.sessions:
                case = await run_ws(http, url, sessions, args.seconds, args.warmup)
                print(json.dumps(case), file=sys.stderr, flush=True)
                results.append(case)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| path | sessions | connections | frames in flight / conn | steps/s | p50 ms/step | p99 ms/step "
        "| server CPU share | server CPU µs/step | errors | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        target = TARGETS.get((r["surface"], r["sessions"]))
        mark = "" if target is None else f">= {target:,.0f}: {'met' if r['steps_per_s'] >= target else 'MISSED'}"
        path = "/v1/mux batch frames, replies not decoded" if r["surface"] == "mux" else "/ws one step per message, replies not decoded"
        lines.append(
            f"| {path} | {r['sessions']} | {r['connections']} | {r['frames_in_flight']} | {r['steps_per_s']:,.0f} "
            f"| {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['server_cpu_share']:.2f} | {r['server_cpu_us_per_step']:.1f} "
            f"| {r['errors']} | {mark} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each case (default 1)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--connections", type=int, default=4, help="mux connections (default 4)")
    parser.add_argument("--depth", type=int, default=2, help="mux frames in flight per connection (default 2)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--server-arg", action="append", help="extra envserver argument (repeatable)")
    parser.add_argument("--options", type=json.loads, default={}, help='JSON object of session options, e.g. \'{"text": false}\' (default: none)')
    args = parser.parse_args(argv)
    try:
        import uvloop

        results = uvloop.run(main_async(args))
    except ImportError:
        results = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "server_throughput",
        "command": " ".join(["python", "loadtests/server_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "game": "catch",
        "options": args.options,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
        "targets": {f"{k[0]}@{k[1]}": v for k, v in TARGETS.items()},
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.options:
        print(f"session options: {json.dumps(args.options)}")
    print(table(results))


if __name__ == "__main__":
    main()
