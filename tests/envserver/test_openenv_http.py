"""OpenEnv's HTTP routes on a real envserver: discovery, MCP, stateless and session-bound calls."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from envserver import __version__


async def get(http, url: str, **kw):
    async with http.get(url, **kw) as r:
        return r.status, await r.json()


async def post(http, url: str, body=None, *, data=None, **kw):
    async with http.post(url, json=body, data=data, **kw) as r:
        return r.status, r.headers, await r.json()


async def test_health(catch_server, http) -> None:
    assert await get(http, catch_server.url + "/health") == (200, {"status": "healthy"})


async def test_metadata(catch_server, http) -> None:
    status, body = await get(http, catch_server.url + "/metadata")
    assert status == 200
    assert body["name"] == "openspiel" and "OpenSpiel" in body["description"]
    assert body["version"] == __version__


async def test_schema(catch_server, http) -> None:
    status, body = await get(http, catch_server.url + "/schema")
    assert status == 200
    assert set(body) == {"action", "observation", "state"}
    assert "action_id" in str(body["action"])
    for name in ("legal_actions", "info_state", "current_player_id", "game_phase"):
        assert name in str(body["observation"])
    assert "step_count" in str(body["state"])


async def test_openapi_has_a_version_and_the_simulation_routes(catch_server, http) -> None:
    status, body = await get(http, catch_server.url + "/openapi.json")
    assert status == 200
    assert body["info"]["version"] == __version__
    assert {"/health", "/metadata", "/schema", "/reset", "/step", "/state", "/mcp"} <= set(body["paths"])


async def test_mcp_jsonrpc(echo_server, http) -> None:
    url = echo_server.url + "/mcp"
    _, _, body = await post(http, url, {"jsonrpc": "2.0", "id": 1, "method": "initialize"})
    assert body["id"] == 1 and body["result"]["serverInfo"]["name"] == "envserver-echo"
    _, _, body = await post(http, url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert [t["name"] for t in body["result"]["tools"]] == ["echo_message"]
    call = {"name": "echo_message", "arguments": {"message": "hi there"}}
    _, _, body = await post(http, url, {"jsonrpc": "2.0", "id": "c", "method": "tools/call", "params": call})
    assert body["id"] == "c" and body["result"]["structuredContent"] == {"echoed_message": "hi there"}


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"jsonrpc": "2.0", "id": 7, "method": "resources/list"}, -32601),
        ({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "rm_rf"}}, -32602),
        ({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo_message", "arguments": {"message": 3}}}, -32602),
        ({}, -32600),
        ({"jsonrpc": "1.0", "id": 7, "method": "tools/list"}, -32600),
        ([1, 2], -32600),
    ],
)
async def test_mcp_errors_are_coded(echo_server, http, payload, code: int) -> None:
    status, _, body = await post(http, echo_server.url + "/mcp", payload)
    assert status == 200 and body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == code and body["error"]["message"]
    if isinstance(payload, dict) and "id" in payload and code != -32600:
        assert body["id"] == 7


async def test_mcp_invalid_json(echo_server, http) -> None:
    status, _, body = await post(http, echo_server.url + "/mcp", data=b"{nope", headers={"content-type": "application/json"})
    assert status == 200 and body["error"]["code"] == -32700


async def test_stateless_reset_step_state(catch_server, http) -> None:
    status, _, body = await post(http, catch_server.url + "/reset", {"seed": 4})
    assert status == 200 and body["reward"] is None and body["done"] is False
    obs = body["observation"]
    assert obs["game_phase"] == "initial" and obs["legal_actions"] == [0, 1, 2] and len(obs["info_state"]) == 50
    status, _, again = await post(http, catch_server.url + "/reset", {"seed": 4})
    assert again == body  # the seed is honoured
    status, _, body = await post(http, catch_server.url + "/step", {"action": {"action_id": 1}})
    assert status == 200 and body["observation"]["game_phase"] == "playing" and body["reward"] == 0.0
    status, body = await get(http, catch_server.url + "/state")
    assert status == 200 and body["step_count"] == 0 and body["game_name"] == "catch"


async def test_session_bound_reset_step_state_close(catch_server, http) -> None:
    key = uuid.uuid4().hex
    headers = {"X-Session-Id": key}
    url = catch_server.url
    status, reply_headers, body = await post(http, url + "/reset", {"seed": 9}, headers=headers)
    assert status == 200 and reply_headers["x-session-id"] == key
    done, steps = body["done"], 0
    while not done:
        status, _, body = await post(http, url + "/step", {"action": {"action_id": 2}}, headers=headers)
        assert status == 200
        done, steps = body["done"], steps + 1
    assert steps == 9 and body["reward"] in (1.0, -1.0) and body["observation"]["game_phase"] == "terminal"
    status, state = await get(http, url + "/state", headers=headers)
    assert status == 200 and state["step_count"] == 9 and state["seed"] == 9
    assert state["history"][1:] == [2] * 9  # the ball's column, then the agent's moves
    status, _, body = await post(http, url + "/step", {"action": {"action_id": 1}}, headers=headers)
    assert status == 409 and body["code"] == "EPISODE_OVER"
    status, _, body = await post(http, url + "/close", headers=headers)
    assert status == 200 and body == {"closed": key}
    status, body = await get(http, url + "/state", headers=headers)
    assert status == 404 and body["code"] == "UNKNOWN_SESSION"
    status, _, body = await post(http, url + "/step", {"action": {"action_id": 1}}, headers=headers)
    assert status == 404 and body["code"] == "UNKNOWN_SESSION"
    status, _, body = await post(http, url + "/close", headers=headers)
    assert status == 404


@pytest.mark.parametrize(
    ("route", "data", "status", "code"),
    [
        ("/reset", b"{bad json", 400, "INVALID_JSON"),
        ("/step", b"\xff\xfe", 400, "INVALID_JSON"),
        ("/reset", b'{"seed": "four"}', 422, "VALIDATION_ERROR"),
        ("/step", b'{"action": {"action_id": "left"}}', 422, "VALIDATION_ERROR"),
        ("/step", b'{"action": {"action_id": 1, "bogus": 1}}', 422, "VALIDATION_ERROR"),
        ("/step", b'{"action": {"action_id": 7}}', 422, "INVALID_ACTION"),
        ("/step", b'{}', 422, "VALIDATION_ERROR"),
        ("/reset", b'{"options": {"game": "no_such_game"}}', 422, "VALIDATION_ERROR"),
        ("/reset", b'{"options": {"game": "catch", "params": {"rows": "many"}}}', 422, "VALIDATION_ERROR"),
    ],
)
async def test_bad_requests(catch_server, http, route: str, data: bytes, status: int, code: str) -> None:
    got, _, body = await post(http, catch_server.url + route, data=data, headers={"content-type": "application/json"})
    assert (got, body["code"]) == (status, code), body
    assert body["detail"]


async def test_oversized_body(spawn_server, http) -> None:
    server = spawn_server("--game", "catch", "--max-frame-bytes", "1024")
    status, _, body = await post(http, server.url + "/reset", {"options": {"pad": "x" * 5000}})
    assert status == 413 and body["code"] == "FRAME_TOO_LARGE"
    status, _, body = await post(http, server.url + "/reset", {"seed": 1})
    assert status == 200


async def test_session_ids_are_bounded(catch_server, http) -> None:
    status, _, body = await post(http, catch_server.url + "/reset", {}, headers={"X-Session-Id": "k" * 200})
    assert status == 422 and body["code"] == "VALIDATION_ERROR"


async def test_idle_http_session_expires(spawn_server, http) -> None:
    server = spawn_server("--game", "catch", "--idle-ttl", "0.3")
    headers = {"X-Session-Id": "idle"}
    status, _, _ = await post(http, server.url + "/reset", {}, headers=headers)
    assert status == 200
    import asyncio

    await asyncio.sleep(0.9)
    status, body = await get(http, server.url + "/state", headers=headers)
    assert status == 404 and body["code"] == "UNKNOWN_SESSION"


def openenv_cli() -> list[str]:
    """The ``openenv`` console script of the running interpreter's environment (its bin may not be on PATH)."""
    script = Path(sys.executable).parent / "openenv"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from openenv.cli.__main__ import main; sys.exit(main())"]


def test_openenv_validate_passes(catch_server) -> None:
    server = catch_server
    result = subprocess.run([*openenv_cli(), "validate", "--url", server.url, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"passed": true' in result.stdout


async def test_unknown_route_and_wrong_method_are_coded_json(catch_server, http) -> None:
    assert await get(http, catch_server.url + "/no/such/route") == (404, {"detail": "Not Found", "code": "NOT_FOUND"})
    async with http.get(catch_server.url + "/reset") as response:
        assert response.status == 405 and response.headers["allow"] == "POST"
        assert await response.json() == {"detail": "Method Not Allowed", "code": "VALIDATION_ERROR"}
