"""Fuzzing in CI: 2,000 seeded hostile inputs, plus the inputs that once broke the server.

The full run (10,000 inputs) is ``loadtests/fuzz.py``.
"""

from __future__ import annotations

import msgspec
import pytest

from envserver.protocol import ErrorCode
from loadtests.fuzz import run_fuzz

DEEP_MSGPACK = b"\x91" * 5000 + b"\xc0"  # 5,000 nested one-element arrays
DEEP_JSON = "[" * 5000 + "]" * 5000


@pytest.mark.slow
async def test_two_thousand_hostile_inputs_leave_the_server_serving() -> None:
    report = await run_fuzz(inputs=2000, seed=11, max_frame_bytes=64 * 1024)
    assert report.failures == [], report.examples
    assert report.inputs == 2000
    assert not report.server_crashed and report.serving_after
    assert report.tracebacks == 0 and report.hung == 0 and report.server_5xx == 0 and report.uncoded == 0
    assert report.mux_errors_by_code and report.ws_errors_by_code  # the inputs did reach the handlers


# -- regressions: each of these once raised in the server (traceback in its log, 500 or a dropped socket)


@pytest.mark.parametrize(
    "data",
    [DEEP_MSGPACK, b"\x91\xa3\xff\xfe\xfd", b"\x91\x93\xa4step\x01\xa2\xc3\x28"],
    ids=["deep-nesting", "invalid-utf8-string", "invalid-utf8-in-request"],
)
async def test_mux_frames_that_escaped_the_decoder(catch_server, mux_connect, data: bytes) -> None:
    mux = await mux_connect(catch_server)
    await mux.send_raw(data)
    replies = await mux.recv()
    assert replies and all(r.body["code"] in (ErrorCode.INVALID_JSON, ErrorCode.VALIDATION_ERROR) for r in replies)
    await mux.ping()
    assert "Traceback" not in catch_server.stderr()


async def test_ws_deep_nesting(catch_server, http) -> None:
    async with http.ws_connect(catch_server.ws_url + "/ws") as ws:
        await ws.send_str('{"type": "step", "data": {"action_id": ' + DEEP_JSON + "}}")
        reply = await ws.receive_json(timeout=10)
        assert reply["type"] == "error" and reply["data"]["code"] == "INVALID_JSON"
        await ws.send_json({"type": "state"})
        assert (await ws.receive_json(timeout=10))["type"] == "state"
    assert "Traceback" not in catch_server.stderr()


@pytest.mark.parametrize(
    "route,body",
    [("/reset", '{"options": {"a": %s}}'), ("/step", '{"action": {"a": %s}}'), ("/mcp", "%s")],
)
async def test_http_deep_nesting(catch_server, http, route: str, body: str) -> None:
    async with http.post(catch_server.url + route, data=body % DEEP_JSON) as r:
        assert r.status < 500
        body = await r.json()
        assert body.get("code") == "INVALID_JSON" or body.get("error", {}).get("code") == -32700
    assert "Traceback" not in catch_server.stderr()


@pytest.mark.parametrize("params", ["fly", [1], True, 7])
async def test_mcp_params_that_are_not_an_object(catch_server, http, params: object) -> None:
    request = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params}
    async with http.post(catch_server.url + "/mcp", data=msgspec.json.encode(request)) as r:
        assert r.status == 200
        assert (await r.json())["error"]["code"] == -32602
    async with http.ws_connect(catch_server.ws_url + "/ws") as ws:
        await ws.send_json({"type": "mcp", "data": request})
        reply = await ws.receive_json(timeout=10)
        assert reply["type"] == "mcp" and reply["data"]["error"]["code"] == -32602
    assert "Traceback" not in catch_server.stderr()


async def test_mcp_tool_name_of_the_wrong_type(catch_server, http) -> None:
    request = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": ["x"]}}
    async with http.post(catch_server.url + "/mcp", data=msgspec.json.encode(request)) as r:
        assert (await r.json())["error"]["code"] == -32602
