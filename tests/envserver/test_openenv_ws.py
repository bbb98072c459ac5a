"""OpenEnv's ``WS /ws`` on a real envserver, and an unmodified OpenEnv client against it."""

from __future__ import annotations

import aiohttp
import pytest
from openenv.core.generic_client import GenericEnvClient


async def ask(ws: aiohttp.ClientWebSocketResponse, frame: dict | str) -> dict:
    if isinstance(frame, str):
        await ws.send_str(frame)
    else:
        await ws.send_json(frame)
    message = await ws.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return message.json()


def assert_error(reply: dict, code: str) -> None:
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == code and reply["data"]["message"], reply


async def test_reset_step_state_close(catch_server, http) -> None:
    async with http.ws_connect(catch_server.ws_url + "/ws") as ws:
        reply = await ask(ws, {"type": "reset", "data": {"seed": 5, "unknown_key": 1}})
        assert reply["type"] == "observation"
        data = reply["data"]
        assert data["reward"] is None and data["done"] is False
        obs = data["observation"]
        assert obs["legal_actions"] == [0, 1, 2] and obs["game_phase"] == "initial" and obs["current_player_id"] == 0
        assert len(obs["info_state"]) == 50 and sorted(set(obs["info_state"])) == [0.0, 1.0]
        for n in range(1, 10):
            reply = await ask(ws, {"type": "step", "data": {"action_id": 1, "game_name": "catch", "game_params": {}}})
            assert reply["type"] == "observation" and reply["data"]["done"] is (n == 9)
        assert reply["data"]["reward"] in (1.0, -1.0) and reply["data"]["observation"]["game_phase"] == "terminal"
        state = await ask(ws, {"type": "state"})
        assert state["type"] == "state"
        assert state["data"]["step_count"] == 9 and state["data"]["game_name"] == "catch" and state["data"]["seed"] == 5
        await ws.send_json({"type": "close"})
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1000


async def test_mcp_frame(echo_server, http) -> None:
    async with http.ws_connect(echo_server.ws_url + "/ws") as ws:
        reply = await ask(ws, {"type": "mcp", "data": {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}})
        assert reply["type"] == "mcp" and reply["data"]["result"]["tools"][0]["name"] == "echo_message"
        call = {"name": "echo_message", "arguments": {"message": "ping"}}
        reply = await ask(ws, {"type": "mcp", "data": {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": call}})
        assert reply["data"]["id"] == 4 and reply["data"]["result"]["structuredContent"] == {"echoed_message": "ping"}
        reply = await ask(ws, {"type": "mcp", "data": {"jsonrpc": "2.0", "id": 5, "method": "prompts/list"}})
        assert reply["data"]["error"]["code"] == -32601


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "INVALID_JSON"),
        ("", "INVALID_JSON"),
        ({"type": "dance"}, "UNKNOWN_TYPE"),
        ({"data": {}}, "VALIDATION_ERROR"),
        ({"type": "reset", "extra": 1}, "VALIDATION_ERROR"),
        ({"type": "reset", "data": {"seed": "abc"}}, "VALIDATION_ERROR"),
        ({"type": "reset", "data": {"options": {"game": "no_such_game"}}}, "VALIDATION_ERROR"),
        ({"type": "step", "data": {"action_id": "left"}}, "VALIDATION_ERROR"),
        ({"type": "step", "data": {"action_id": 1, "nope": 2}}, "VALIDATION_ERROR"),
        ({"type": "step", "data": {"action_id": 42}}, "INVALID_ACTION"),
    ],
)
async def test_bad_frames_keep_the_socket_open(catch_server, http, frame, code: str) -> None:
    async with http.ws_connect(catch_server.ws_url + "/ws") as ws:
        await ask(ws, {"type": "reset", "data": {"seed": 1}})
        assert_error(await ask(ws, frame), code)
        reply = await ask(ws, {"type": "step", "data": {"action_id": 0}})
        assert reply["type"] == "observation" and reply["data"]["observation"]["game_phase"] == "playing"
        assert (await ask(ws, {"type": "state"}))["data"]["step_count"] == 1


async def test_execution_error_keeps_the_socket_open(test_envs_server, http) -> None:
    async with http.ws_connect(test_envs_server.ws_url + "/ws") as ws:
        await ask(ws, {"type": "reset"})
        reply = await ask(ws, {"type": "step", "data": {"message": "boom"}})
        assert_error(reply, "EXECUTION_ERROR")
        assert "boom went the environment" in reply["data"]["message"]
        reply = await ask(ws, {"type": "step", "data": {"message": "fine"}})
        assert reply["data"]["observation"] == {"echoed_message": "fine", "message_length": 4}
    # the mux reports the same error the same way and keeps going
    assert "Traceback" in test_envs_server.stderr()  # unexpected env errors are logged with their stack


async def test_oversized_ws_frame(spawn_server, http) -> None:
    server = spawn_server("--env", "echo", "--max-frame-bytes", "1024")
    async with http.ws_connect(server.ws_url + "/ws") as ws:
        await ask(ws, {"type": "reset"})
        assert_error(await ask(ws, {"type": "step", "data": {"message": "x" * 1500}}), "FRAME_TOO_LARGE")
        reply = await ask(ws, {"type": "step", "data": {"message": "ok"}})
        assert reply["data"]["observation"]["echoed_message"] == "ok"


async def test_capacity_reached_closes_the_socket(spawn_server, http) -> None:
    server = spawn_server("--game", "catch", "--max-sessions", "2")
    async with http.ws_connect(server.ws_url + "/ws") as a, http.ws_connect(server.ws_url + "/ws") as b:
        await ask(a, {"type": "reset"})
        await ask(b, {"type": "reset"})
        async with http.ws_connect(server.ws_url + "/ws") as c:
            message = await c.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.TEXT
            assert_error(message.json(), "CAPACITY_REACHED")
            assert "2/2" in message.json()["data"]["message"]
            message = await c.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1000
        assert (await ask(a, {"type": "step", "data": {"action_id": 1}}))["type"] == "observation"
        await a.send_json({"type": "close"})
        await a.receive(timeout=10)
        # the closed session's slot is free again
        async with http.ws_connect(server.ws_url + "/ws") as d:
            assert (await ask(d, {"type": "reset"}))["type"] == "observation"


async def test_openenv_client_plays_catch(catch_server) -> None:
    async with GenericEnvClient(base_url=catch_server.url) as env:
        result = await env.reset(seed=21)
        assert result.done is False and result.observation["legal_actions"] == [0, 1, 2]
        first = result.observation["info_state"]
        steps = 0
        while not result.done:
            ball = first.index(1.0) % 5  # the ball's column in row 0
            paddle = result.observation["info_state"][45:].index(1.0)
            action = 0 if ball < paddle else 2 if ball > paddle else 1
            result = await env.step({"action_id": action, "game_name": "catch", "game_params": {}})
            steps += 1
        assert steps == 9 and result.reward == 1.0  # a paddle that follows the ball catches it
        state = await env.state()
        assert state["step_count"] == 9 and state["game_name"] == "catch" and state["num_players"] == 1
        again = await env.reset(seed=21)
        assert again.observation["info_state"] == first


async def test_openenv_client_echo_exchange(echo_server) -> None:
    client = GenericEnvClient(base_url=echo_server.url)
    async with client as env:
        result = await env.reset()
        assert result.observation == {"echoed_message": "", "message_length": 0}
        result = await env.step({"message": "hello envfleet"})
        assert result.observation == {"echoed_message": "hello envfleet", "message_length": 14}
        assert result.reward == pytest.approx(1.4) and result.done is False
        with pytest.raises(RuntimeError, match="VALIDATION_ERROR"):
            await env.step({"message": 5})
        result = await env.step({"message": "still here"})
        assert result.observation["echoed_message"] == "still here"
        assert (await env.state())["step_count"] == 2


def test_openenv_sync_client(echo_server) -> None:
    with GenericEnvClient(base_url=echo_server.url).sync() as env:
        env.reset()
        assert env.step({"message": "sync"}).observation["message_length"] == 4
