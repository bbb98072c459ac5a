"""Fuzz: malformed and hostile inputs against ``/v1/mux``, ``/ws`` and the HTTP routes of one envserver.

usage: python loadtests/fuzz.py [--inputs 10000] [--seed 0] [--max-frame-bytes 65536]
                                [--out loadtests/out/fuzz.json]

A seeded generator (same seed, same inputs) makes garbage bytes, truncated msgpack/JSON,
deep nesting, huge strings and arrays, wrong types, unknown ops, reused request ids,
out-of-range actions and frames over the size limit. Half go to ``/v1/mux``, a quarter each
to ``/ws`` and the HTTP routes, three lanes at once. After every WebSocket input a sentinel
(a mux ping, a ``/ws`` state request) must be answered, or the server must have closed the
connection; every error reply must carry a code of the protocol's table; every HTTP answer
must be below 500, and coded JSON when it is an error of an envserver route. At the end the
server must be alive, healthy, able to play an episode, and its stderr free of tracebacks.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from common import write_report  # loadtests/ is on sys.path (script dir; pytest's pythonpath)
from envserver.protocol import ErrorCode

OUT = Path(__file__).resolve().parent / "out" / "fuzz.json"
REPLY_TIMEOUT = 10.0  # seconds a sentinel may take before the input counts as hung
CODES = {code.value for code in ErrorCode}
ENCODE = msgspec.msgpack.encode
OPS = ["open", "reset", "step", "state", "close", "ping", "steps", "resets"]
ROUTES = [
    ("POST", "/reset"), ("POST", "/step"), ("GET", "/state"), ("POST", "/close"), ("POST", "/mcp"),
    ("GET", "/health"), ("GET", "/metadata"), ("GET", "/schema"), ("GET", "/openapi.json"),
    ("GET", "/metrics"), ("GET", "/reset"), ("PUT", "/step"), ("GET", "/no/such/route"),
]
ODD_ACTIONS: list[Any] = [-1, 3, 99, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"), float("inf"),
                          "1", "", None, True, [], [1], {}, {"action_id": 7}, {"action_id": "x"}, b"\x01"]


class FuzzReport(msgspec.Struct):
    inputs: int
    by_surface: dict[str, int]
    by_kind: dict[str, int]
    mux_replies: int
    mux_errors_by_code: dict[str, int]
    ws_errors_by_code: dict[str, int]
    http_status: dict[str, int]
    connections_closed_by_server: int
    hung: int
    uncoded: int
    server_5xx: int
    server_crashed: bool
    tracebacks: int
    traceback_kinds: dict[str, int]  # the exception line ending each traceback, counted
    serving_after: bool
    seconds: float
    failures: list[str]
    examples: list[str]  # the first few failing inputs, abbreviated


# --------------------------------------------------------------------------- generators


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack/JSON-able value: odd numbers, strings, nesting."""
    pick = rng.randrange(12 if depth < 4 else 8)
    if pick == 0:
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if pick == 1:
        return rng.choice([0.0, -0.0, 1e308, float("nan"), float("inf"), rng.random()])
    if pick == 2:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 20)))
    if pick == 3:
        return rng.choice(OPS + ["", "OPEN", "fly", "step\x00", "__class__"])
    if pick in (4, 5):
        return rng.choice([None, True, False])
    if pick in (6, 7):
        return rng.randbytes(rng.randrange(0, 16))
    if pick in (8, 9):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {str(junk(rng, depth + 1))[:10]: junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def to_json_able(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [to_json_able(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json_able(v) for k, v in value.items()}
    return value


def deep(rng: random.Random, opener: bytes, closer: bytes, inner: bytes, limit: int) -> bytes:
    depth = rng.choice([100, 1_000, 10_000, min(100_000, limit // max(1, len(opener) + len(closer)) - 1)])
    return opener * depth + inner + closer * depth


class MuxInputs:
    """Binary frames for ``/v1/mux``; requests on sid 1 act on an open, reset catch session."""

    def __init__(self, rng: random.Random, limit: int) -> None:
        self.rng, self.limit = rng, limit
        self.kinds = [self.garbage, self.truncated, self.nested, self.huge, self.wrong_types, self.unknown_op,
                      self.reused_ids, self.odd_action, self.oversized, self.junk_requests, self.odd_sessions,
                      self.many]

    def next(self) -> tuple[str, bytes]:
        maker = self.rng.choice(self.kinds)
        return maker.__name__, maker()

    def _id(self) -> int:
        return self.rng.randrange(1, 1_000_000)

    def garbage(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(0, 300))

    def truncated(self) -> bytes:
        frame = ENCODE([["reset", self._id(), 1, self.rng.randrange(100), {}], ["step", self._id(), 1, 1],
                        ["open", self._id(), self.rng.randrange(2, 99), None, {"game": "catch"}]])
        return frame[: self.rng.randrange(0, len(frame))]

    def nested(self) -> bytes:
        inner = ENCODE(["step", 1, 1, 0])
        return deep(self.rng, b"\x91", b"", inner, self.limit)  # fixarray(1) around fixarray(1) around ...

    def huge(self) -> bytes:
        room = self.limit - 64
        if self.rng.random() < 0.5:
            return ENCODE([["step", self._id(), 1, "x" * self.rng.randrange(room // 2, room)]])
        return ENCODE([["step", self._id(), 1, list(range(self.rng.randrange(1000, room // 5)))]])

    def wrong_types(self) -> bytes:
        op = self.rng.choice(OPS)
        fields = [op, junk(self.rng), junk(self.rng)] + [junk(self.rng) for _ in range(self.rng.randrange(0, 3))]
        return ENCODE([fields])

    def unknown_op(self) -> bytes:
        return ENCODE([[self.rng.choice(["fly", "OPEN", "", 7, None, "step2"]), self._id(), 1]])

    def reused_ids(self) -> bytes:
        rid = self._id()
        return ENCODE([["ping", rid, 0], ["state", rid, 1], ["step", rid, 1, 0], ["reset", rid, 1, 3, None]])

    def odd_action(self) -> bytes:
        return ENCODE([["reset", self._id(), 1, None, None], ["step", self._id(), 1, self.rng.choice(ODD_ACTIONS)]])

    def oversized(self) -> bytes:
        return b"\x91" + ENCODE("y" * self.rng.randrange(self.limit + 1, 3 * self.limit))

    def junk_requests(self) -> bytes:
        value = junk(self.rng)
        return ENCODE(value if self.rng.random() < 0.5 else [value])

    def odd_sessions(self) -> bytes:
        sid = self.rng.choice([0, 1, 2, -1, 2**63 - 1, self.rng.randrange(100)])
        opts = self.rng.choice([{}, {"game": "no_such_game"}, {"game": junk(self.rng)}, {"opponent": "x"}, junk(self.rng)])
        env = self.rng.choice([None, "openspiel", "no_such_env", "echo", "../../etc/passwd", ""])
        return ENCODE([["open", self._id(), sid, env, opts], ["close", self._id(), sid], ["state", self._id(), sid]])

    def many(self) -> bytes:
        """``steps``/``resets`` with odd session lists: unknown, repeated, mismatched, huge, wrong-typed."""
        rng = self.rng
        sids = rng.choice([[], [1], [1, 1, 1], [1, 99, -1], [2**63 - 1], list(range(rng.randrange(1, 5000))), junk(rng)])
        count = len(sids) if isinstance(sids, list) else 1
        args = [rng.choice(ODD_ACTIONS) for _ in range(count + rng.choice([0, 0, 0, -1, 1]))]
        op = rng.choice(["steps", "resets"])
        extra = [rng.choice([None, {}, {"game": "no_such_game"}, junk(rng)])] if op == "resets" and rng.random() < 0.5 else []
        return ENCODE([[op, self._id(), sids, args, *extra], ["step", self._id(), 1, 1]])


class WsInputs:
    """Frames for OpenEnv's ``/ws``."""

    def __init__(self, rng: random.Random, limit: int) -> None:
        self.rng, self.limit = rng, limit
        self.kinds = [self.garbage, self.binary, self.truncated, self.nested, self.huge, self.wrong_types,
                      self.unknown_type, self.odd_action, self.oversized, self.mcp]

    def next(self) -> tuple[str, str | bytes]:
        maker = self.rng.choice(self.kinds)
        return maker.__name__, maker()

    def _msg(self, kind: Any, data: Any) -> str:
        return json.dumps({"type": kind, "data": to_json_able(data)})

    def garbage(self) -> str:
        return "".join(chr(self.rng.randrange(1, 0xD7FF)) for _ in range(self.rng.randrange(0, 200)))

    def binary(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(0, 200))

    def truncated(self) -> str:
        text = self._msg("step", {"action_id": 1, "extra": [1, 2, 3]})
        return text[: self.rng.randrange(0, len(text))]

    def nested(self) -> str:
        return deep(self.rng, b'{"a":', b"}", b"1", self.limit).decode() if self.rng.random() < 0.5 else \
            '{"type":"step","data":{"action_id":' + deep(self.rng, b"[", b"]", b"1", self.limit - 60).decode() + "}}"

    def huge(self) -> str:
        room = self.limit - 80
        if self.rng.random() < 0.5:
            return self._msg("step", {"action_id": "9" * self.rng.randrange(room // 2, room)})
        return self._msg("reset", {"seed": 1, "options": {"k": list(range(self.rng.randrange(1000, room // 8)))}})

    def wrong_types(self) -> str:
        return json.dumps(to_json_able({self.rng.choice(["type", "data", "tipe"]): junk(self.rng),
                                        self.rng.choice(["data", "type", "x"]): junk(self.rng)}))

    def unknown_type(self) -> str:
        return self._msg(self.rng.choice(["fly", "RESET", "", "observation", "error"]), {})

    def odd_action(self) -> str:
        data = self.rng.choice([{"action_id": self.rng.choice(ODD_ACTIONS)}, junk(self.rng),
                                {"action_id": 0, "extra": junk(self.rng)}, {"seed": junk(self.rng)}])
        return self._msg(self.rng.choice(["step", "reset"]), data)

    def oversized(self) -> str:
        return self._msg("step", {"action_id": "z" * self.rng.randrange(self.limit + 1, 3 * self.limit)})

    def mcp(self) -> str:
        return self._msg("mcp", self.rng.choice([junk(self.rng), {"jsonrpc": "2.0", "method": junk(self.rng), "id": 1},
                                                 {"jsonrpc": "2.0", "method": "tools/call", "id": 2, "params": junk(self.rng)}]))


class HttpInputs:
    """(method, path, headers, body) for the HTTP routes."""

    def __init__(self, rng: random.Random, limit: int) -> None:
        self.rng, self.limit = rng, limit
        self.ws = WsInputs(rng, limit)

    def next(self) -> tuple[str, tuple[str, str, dict[str, str], bytes]]:
        rng = self.rng
        method, path = rng.choice(ROUTES)
        kind, make = rng.choice([
            ("garbage", lambda: rng.randbytes(rng.randrange(0, 300))),
            ("truncated", lambda: b'{"seed": 1, "options": {"a": [1, 2'[: rng.randrange(0, 34)]),
            ("nested", lambda: deep(rng, b"[", b"]", b"1", self.limit)),
            ("huge", lambda: json.dumps({"action": "x" * rng.randrange(1000, self.limit - 20)}).encode()),
            ("oversized", lambda: b" " * rng.randrange(self.limit + 1, 3 * self.limit)),
            ("junk_json", lambda: json.dumps(to_json_able(junk(rng))).encode()),
            ("odd_action", lambda: json.dumps({"action": to_json_able(rng.choice(ODD_ACTIONS))}).encode()),
            ("odd_reset", lambda: json.dumps(to_json_able({"seed": junk(rng), "options": junk(rng)})).encode()),
            ("jsonrpc", lambda: json.dumps(to_json_able({"jsonrpc": junk(rng), "method": junk(rng), "id": junk(rng)})).encode()),
        ])
        body = make()
        headers: dict[str, str] = {}
        if rng.random() < 0.4:
            headers["X-Session-Id"] = rng.choice(["", "a", "x" * 129, "x" * 128, "é", "../", str(rng.randrange(5))])
        if rng.random() < 0.3:
            headers["Content-Type"] = rng.choice(["text/plain", "application/msgpack", "application/json; charset=latin-1", "x"])
        return kind, (method, path, headers, body)


# --------------------------------------------------------------------------- lanes


class Tally:
    def __init__(self) -> None:
        self.inputs = 0
        self.by_surface: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.mux_replies = 0
        self.mux_codes: Counter[str] = Counter()
        self.ws_codes: Counter[str] = Counter()
        self.http_status: Counter[str] = Counter()
        self.closed = 0
        self.hung = 0
        self.uncoded = 0
        self.server_5xx = 0
        self.examples: list[str] = []

    def count(self, surface: str, kind: str) -> None:
        self.inputs += 1
        self.by_surface[surface] += 1
        self.by_kind[f"{surface}:{kind}"] += 1

    def bad(self, what: str, data: Any) -> None:
        if len(self.examples) < 10:
            self.examples.append(f"{what}: {repr(data)[:160]}")


async def receive(
    ws: aiohttp.ClientWebSocketResponse, kind: aiohttp.WSMsgType, tally: Tally, surface: str, frame: Any
) -> aiohttp.WSMessage | None:
    """The next message answering ``frame``; None, counted as hung or closed, when the connection is done."""
    try:
        message = await ws.receive(timeout=REPLY_TIMEOUT)
    except TimeoutError:
        tally.hung += 1
        tally.bad(f"{surface} hung", frame)
        await ws.close()
        return None
    if message.type != kind:
        tally.closed += 1
        return None
    return message


async def mux_lane(http: aiohttp.ClientSession, url: str, count: int, rng: random.Random, limit: int, tally: Tally) -> None:
    inputs = MuxInputs(rng, limit)
    ws: aiohttp.ClientWebSocketResponse | None = None
    sentinel = 0
    for _ in range(count):
        if ws is None or ws.closed:
            ws = await http.ws_connect(url + "/v1/mux", max_msg_size=0)
            await ws.send_bytes(ENCODE([["open", 1, 1, None, {}], ["reset", 2, 1, 0, None]]))
            await ws.receive(timeout=REPLY_TIMEOUT)
        kind, frame = inputs.next()
        tally.count("mux", kind)
        sentinel -= 1  # negative ids never collide with the generator's
        try:
            await ws.send_bytes(frame)
            await ws.send_bytes(ENCODE([["ping", sentinel, 0]]))
        except (ConnectionError, aiohttp.ClientError):
            tally.closed += 1
            ws = None
            continue
        while True:
            message = await receive(ws, aiohttp.WSMsgType.BINARY, tally, "mux", frame)
            if message is None:
                ws = None
                break
            replies = msgspec.msgpack.decode(message.data)
            done = False
            for reply_id, ok, body in replies:
                tally.mux_replies += 1
                if reply_id == sentinel:
                    done = True
                elif not ok:
                    code = body.get("code") if isinstance(body, dict) else None
                    tally.mux_codes[str(code)] += 1
                    if code not in CODES or not body.get("message"):
                        tally.uncoded += 1
                        tally.bad("mux uncoded error", (frame, body))
                    if code == "EXECUTION_ERROR":
                        tally.server_5xx += 1
                        tally.bad("mux EXECUTION_ERROR", (frame, body))
            if done:
                break
        if rng.random() < 0.05 and ws is not None:  # now and then, start over on a fresh connection
            await ws.close()
            ws = None
    if ws is not None:
        await ws.close()


async def ws_lane(http: aiohttp.ClientSession, url: str, count: int, rng: random.Random, limit: int, tally: Tally) -> None:
    inputs = WsInputs(rng, limit)
    ws: aiohttp.ClientWebSocketResponse | None = None
    for _ in range(count):
        if ws is None or ws.closed:
            ws = await http.ws_connect(url + "/ws", max_msg_size=0)
            await ws.send_str('{"type": "reset", "data": {"seed": 1}}')
            await ws.receive(timeout=REPLY_TIMEOUT)
        kind, frame = inputs.next()
        tally.count("ws", kind)
        try:
            await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            await ws.send_str('{"type": "state"}')
        except (ConnectionError, aiohttp.ClientError):
            tally.closed += 1
            ws = None
            continue
        while True:
            message = await receive(ws, aiohttp.WSMsgType.TEXT, tally, "ws", frame)
            if message is None:
                ws = None
                break
            reply = json.loads(message.data)
            if reply.get("type") == "state":
                break
            if reply.get("type") == "error":
                code = reply.get("data", {}).get("code")
                tally.ws_codes[str(code)] += 1
                if code not in CODES:
                    tally.uncoded += 1
                    tally.bad("ws uncoded error", (frame, reply))
                if code in ("EXECUTION_ERROR", "SESSION_ERROR"):
                    tally.server_5xx += 1
                    tally.bad(f"ws {code}", (frame, reply))
    if ws is not None:
        await ws.close()


async def http_lane(http: aiohttp.ClientSession, url: str, count: int, rng: random.Random, limit: int, tally: Tally) -> None:
    inputs = HttpInputs(rng, limit)
    for _ in range(count):
        kind, (method, path, headers, body) = inputs.next()
        tally.count("http", kind)
        try:
            async with http.request(method, url + path, headers=headers, data=body,
                                    timeout=aiohttp.ClientTimeout(total=REPLY_TIMEOUT)) as resp:
                status = resp.status
                text = await resp.read()
        except TimeoutError:
            tally.hung += 1
            tally.bad("http hung", (method, path, body))
            continue
        except (aiohttp.ClientError, ConnectionError):
            tally.closed += 1
            continue
        tally.http_status[str(status)] += 1
        if status >= 500:
            tally.server_5xx += 1
            tally.bad(f"http {status}", (method, path, headers, body, text[:200]))
        elif status >= 400 and status not in (404, 405) or (status == 404 and path != "/no/such/route"):
            try:
                payload = json.loads(text)
                coded = payload.get("code") in CODES
            except (ValueError, AttributeError):
                coded = False
            if not coded:
                tally.uncoded += 1
                tally.bad(f"http {status} uncoded", (method, path, body, text[:200]))
        elif path == "/mcp" and status == 200:
            try:
                payload = json.loads(text)
            except ValueError:
                tally.uncoded += 1
                continue
            error = payload.get("error") if isinstance(payload, dict) else None
            if error is not None and not isinstance(error.get("code"), int):
                tally.uncoded += 1
                tally.bad("mcp uncoded", (body, text[:200]))


# --------------------------------------------------------------------------- the run


def start_server(max_frame_bytes: int, stderr_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    args = [sys.executable, "-m", "envserver", "--game", "catch", "--port", "0", "--no-web", "--log-level", "info",
            "--max-frame-bytes", str(max_frame_bytes), "--max-sessions", "256"]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"envserver did not start: {stderr_path.read_text()}")
    return proc, line.split()[-1]


async def serving(http: aiohttp.ClientSession, url: str) -> bool:
    """Whether the server answers /health and plays one catch episode over the mux."""
    try:
        async with http.get(url + "/health") as resp:
            if resp.status != 200:
                return False
        async with http.ws_connect(url + "/v1/mux") as ws:
            await ws.send_bytes(ENCODE([["open", 1, 1, None, {}], ["reset", 2, 1, 7, None]]))
            rid, terminated = 3, False
            for _ in range(20):
                message = await ws.receive(timeout=REPLY_TIMEOUT)
                replies = msgspec.msgpack.decode(message.data)
                if not all(ok for _, ok, _ in replies):
                    return False
                if any(rep_id == 2 or rep_id >= 3 for rep_id, _, _ in replies):
                    body = replies[-1][2]
                    terminated = bool(body.get("terminated")) if isinstance(body, dict) else False
                    if terminated:
                        return True
                    await ws.send_bytes(ENCODE([["step", rid, 1, 1]]))
                    rid += 1
            return terminated
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        return False


async def run_fuzz(inputs: int = 10_000, seed: int = 0, max_frame_bytes: int = 64 * 1024) -> FuzzReport:
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="envfleet-fuzz-") as tmp:
        stderr_path = Path(tmp) / "stderr"
        proc, url = start_server(max_frame_bytes, stderr_path)
        tally = Tally()
        start = time.perf_counter()
        try:
            async with aiohttp.ClientSession() as http:
                mux_n, ws_n = inputs // 2, inputs // 4
                await asyncio.gather(
                    mux_lane(http, url, mux_n, random.Random(f"{seed}-mux"), max_frame_bytes, tally),
                    ws_lane(http, url, ws_n, random.Random(f"{seed}-ws"), max_frame_bytes, tally),
                    http_lane(http, url, inputs - mux_n - ws_n, random.Random(f"{seed}-http"), max_frame_bytes, tally),
                )
                crashed = proc.poll() is not None
                ok = not crashed and await serving(http, url)
        finally:
            seconds = time.perf_counter() - start
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        log = stderr_path.read_text(errors="replace")
    tracebacks = log.count("Traceback")
    kinds: Counter[str] = Counter()
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = [line for line in block.splitlines() if line and not line.startswith((" ", "["))]
        kinds[(lines[0] if lines else "?")[:200]] += 1
    if crashed:
        failures.append(f"the server died (exit code {proc.returncode})")
    if not ok:
        failures.append("the server does not serve after the fuzzing")
    if tracebacks:
        first = log[log.index("Traceback"):][:1500]
        failures.append(f"{tracebacks} tracebacks in the server's stderr; first: {first}")
    for name, value in (("hung inputs", tally.hung), ("uncoded errors", tally.uncoded), ("5xx answers", tally.server_5xx)):
        if value:
            failures.append(f"{value} {name}")
    return FuzzReport(
        inputs=tally.inputs,
        by_surface=dict(tally.by_surface),
        by_kind=dict(sorted(tally.by_kind.items())),
        mux_replies=tally.mux_replies,
        mux_errors_by_code=dict(tally.mux_codes),
        ws_errors_by_code=dict(tally.ws_codes),
        http_status=dict(sorted(tally.http_status.items())),
        connections_closed_by_server=tally.closed,
        hung=tally.hung,
        uncoded=tally.uncoded,
        server_5xx=tally.server_5xx,
        server_crashed=crashed,
        tracebacks=tracebacks,
        traceback_kinds=dict(kinds.most_common()),
        serving_after=ok,
        seconds=round(seconds, 2),
        failures=failures,
        examples=tally.examples,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-frame-bytes", type=int, default=64 * 1024)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    report = await run_fuzz(args.inputs, args.seed, args.max_frame_bytes)
    write_report("fuzz", report, args.out)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
