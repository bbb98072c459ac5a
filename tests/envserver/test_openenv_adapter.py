"""OpenEnv environments served by envserver through ``openenv:package.module:Class``, unmodified.

Two environments written against ``openenv.core.env_server``: the catch of
``loadtests/openenv_catch.py`` and ``tests/envserver/openenv_envs.py``'s MCP notebook,
each served by a real envserver process and driven over the mux (``EnvPool``), OpenEnv's
``WS /ws`` and ``POST /mcp``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from envserver import envs
from envserver.errors import ServerError
from rollout import EnvPool
from rollout.errors import InvalidAction, ServerReplyError

from ..conftest import ServerProcess
from .test_openenv_ws import ask, assert_error

REPO = Path(__file__).resolve().parents[2]
CATCH = "openenv:openenv_catch:CatchEnvironment"
NOTES = "openenv:tests.envserver.openenv_envs:NotesEnvironment"
SINGLE = "openenv:tests.envserver.openenv_envs:SingleSessionEnvironment"
# The server process imports the environments' modules from these directories.
PYTHONPATH = {"PYTHONPATH": os.pathsep.join([str(REPO / "loadtests"), str(REPO), os.environ.get("PYTHONPATH", "")])}


# Importing openenv.core.env_server imports gradio: seconds of CPU, far more on a busy machine.
STARTUP_TIMEOUT = 120.0


@contextlib.contextmanager
def served(env: str) -> Iterator[ServerProcess]:
    """An envserver serving ``env``, given OpenEnv's slow import time to start; stopped on exit."""
    server = ServerProcess(("--env", env), env=PYTHONPATH)
    try:
        yield server.wait_ready(timeout=STARTUP_TIMEOUT)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def openenv_catch() -> Iterator[ServerProcess]:
    with served(CATCH) as server:
        yield server


@pytest.fixture(scope="module")
def openenv_notes() -> Iterator[ServerProcess]:
    with served(NOTES) as server:
        yield server


def pool_on(server: ServerProcess, env: str, n: int) -> EnvPool:
    return EnvPool(n=n, env=env, backend="endpoints", endpoints=(server.url,))


async def test_catch_over_the_mux_is_seeded_and_batched(openenv_catch: ServerProcess) -> None:
    async with pool_on(openenv_catch, CATCH, 8) as pool:
        first = await pool.reset(seeds=[7] * 4 + [8] * 4)
        assert first[0].observation == first[3].observation  # same seed, same ball
        assert first[0].observation["legal_actions"] == [0, 1, 2] and len(first[0].observation["info_state"]) == 50
        assert first[0].reward == 0.0 and not first[0].terminated
        for step in range(1, 10):
            results = await pool.step([{"action_id": 1}] * 8)
            assert all(r.terminated is (step == 9) for r in results)
        assert {r.reward for r in results} <= {1.0, -1.0}
        assert results[0].reward == results[3].reward  # same seed, same actions, same outcome
        state = await pool.envs[0].state()
        assert state["step_count"] == 9 and state["game_name"] == "catch"


async def test_catch_bad_actions_are_coded_and_leave_the_episode(openenv_catch: ServerProcess) -> None:
    async with pool_on(openenv_catch, CATCH, 2) as pool:
        env = pool.envs[0]
        await env.reset(seed=1)
        for bad in ({"action_id": "left"}, {"action_id": 1, "extra": 2}, [1], True, "1", None):
            with pytest.raises(InvalidAction, match="VALIDATION_ERROR"):
                await env.step(bad)
        assert (await env.state())["step_count"] == 0
        for _ in range(9):
            result = await env.step(0)  # a bare id is the action_id
        assert result.terminated
        with pytest.raises(ServerReplyError, match="EXECUTION_ERROR: RuntimeError: episode is over") as caught:
            await env.step({"action_id": 0})  # the environment raised: this session is told
        assert caught.value.code == "EXECUTION_ERROR"
        other = pool.envs[1]
        await other.reset(seed=2)
        assert not (await other.step({"action_id": 1})).terminated  # the others go on


async def test_catch_over_openenv_ws(openenv_catch: ServerProcess, http) -> None:
    async with http.ws_connect(openenv_catch.ws_url + "/ws") as ws:
        reply = await ask(ws, {"type": "reset", "data": {"seed": 5}})
        assert reply["type"] == "observation" and reply["data"]["reward"] is None and reply["data"]["done"] is False
        assert reply["data"]["observation"]["game_phase"] == "initial"
        for n in range(1, 10):
            reply = await ask(ws, {"type": "step", "data": {"action_id": 1}})
            assert reply["data"]["done"] is (n == 9)
        assert reply["data"]["reward"] in (1.0, -1.0)
        assert_error(await ask(ws, {"type": "step", "data": {"action_id": "x"}}), "VALIDATION_ERROR")
        assert_error(await ask(ws, {"type": "step", "data": {"action_id": 1}}), "EXECUTION_ERROR")
        state = await ask(ws, {"type": "state"})
        assert state["data"]["step_count"] == 9


async def test_catch_schema_is_the_pydantic_models(openenv_catch: ServerProcess) -> None:
    status, schema = openenv_catch.get_json("/schema")
    assert status == 200
    assert schema["action"]["title"] == "CatchAction" and "action_id" in schema["action"]["required"]
    assert schema["observation"]["title"] == "CatchObservation" and schema["state"]["title"] == "CatchState"
    status, meta = openenv_catch.get_json("/metadata")
    assert meta["name"] == CATCH and meta["description"].startswith("pyspiel catch")


async def test_mcp_tools_over_envserver_mcp_and_ws(openenv_notes: ServerProcess, http) -> None:
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with http.post(openenv_notes.url + "/mcp", json=rpc) as response:
        tools = {t["name"]: t["description"] for t in (await response.json())["result"]["tools"]}
    assert tools == {"add_note": "Append a note; returns how many notes there are.", "read_notes": "Every note written in this episode."}
    async with http.ws_connect(openenv_notes.ws_url + "/ws") as ws:
        await ask(ws, {"type": "reset", "data": {}})
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add_note", "arguments": {"text": "a"}}}
        reply = await ask(ws, {"type": "mcp", "data": call})
        assert reply["data"]["result"]["structuredContent"] == {"count": 1}
        # a tool call as an action, routed by OpenEnv's own rules
        step = {"type": "call_tool", "tool_name": "add_note", "arguments": {"text": "b"}}
        reply = await ask(ws, {"type": "step", "data": step})
        assert reply["data"]["observation"]["result"]["structured_content"] == {"count": 2}
        read = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "read_notes", "arguments": {}}}
        assert (await ask(ws, {"type": "mcp", "data": read}))["data"]["result"]["structuredContent"] == {"notes": ["a", "b"]}
        boom = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "add_note", "arguments": {"text": "boom"}}}
        error = (await ask(ws, {"type": "mcp", "data": boom}))["data"]["error"]
        assert "notes cannot say boom" in error["message"]
        unknown = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "reset", "arguments": {}}}
        assert (await ask(ws, {"type": "mcp", "data": unknown}))["data"]["error"]["code"] == -32602


async def test_mcp_environment_over_the_mux(openenv_notes: ServerProcess) -> None:
    async with pool_on(openenv_notes, NOTES, 3) as pool:
        await pool.reset()
        calls = [{"type": "call_tool", "tool_name": "add_note", "arguments": {"text": f"n{i}"}} for i in range(3)]
        results = await pool.step(calls)
        assert [r.observation["result"]["structured_content"] for r in results] == [{"count": 1}] * 3  # one notebook each
        listed = await pool.envs[0].step({"type": "list_tools"})
        assert sorted(t["name"] for t in listed.observation["tools"]) == ["add_note", "read_notes"]


async def test_single_session_environment_refuses_a_second_session() -> None:
    with served(SINGLE) as server:
        await _single_session(server)


async def _single_session(server: ServerProcess) -> None:
    async with pool_on(server, SINGLE, 1) as pool:
        first = await pool.envs[0].reset(seed=3)  # its reset takes no seed: dropped, as OpenEnv does
        assert first.observation == {"total": 0}
        assert (await pool.envs[0].step({"amount": 2})).reward == 2.0
        with pytest.raises(ServerReplyError, match="FACTORY_ERROR: .*does not support concurrent sessions"):
            async with pool_on(server, SINGLE, 1):
                pass
    async with pool_on(server, SINGLE, 1) as pool:  # the first session's end freed the slot
        assert (await pool.envs[0].reset()).observation == {"total": 0}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule_xyz:Env", "cannot import 'nosuchmodule_xyz'"),
        ("openenv_catch:NoSuchClass", "has no 'NoSuchClass'"),
        ("openenv_catch:CatchAction", "is not a subclass of openenv.core.env_server.Environment"),
        ("openenv_catch", "expected openenv:package.module:Class"),
        ("tests.envserver.openenv_envs:BrokenToolsEnvironment", "cannot create BrokenToolsEnvironment: OSError: the tool backend"),
    ],
)
def test_bad_targets_are_one_line_errors(target: str, message: str) -> None:
    with pytest.raises(ServerError, match=message) as caught:
        envs.load("openenv:" + target)
    assert caught.value.code in ("NOT_FOUND", "FACTORY_ERROR") and "\n" not in caught.value.message


def test_envserver_exits_with_one_line_for_a_bad_target() -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as caught:
        with served("openenv:openenv_catch:NoSuchClass"):
            pass
    assert "envserver: error: module 'openenv_catch' has no 'NoSuchClass'" in str(caught.value)
    assert "Traceback" not in str(caught.value)


@pytest.mark.parametrize("spec", ["openenv:this:Zen", "this:Zen", "openenv:openenv_catch:CatchEnvironment"])
async def test_clients_cannot_make_a_server_import_modules(echo_server: ServerProcess, mux_connect, spec: str) -> None:
    """Opening a session of ``package.module:Class`` would import (run) that module: only ``--env`` may."""
    mux = await mux_connect(echo_server)
    (reply,) = await mux.call(mux.req("open", 1, spec, {}))
    assert not reply.ok and reply.body["code"] == "FORBIDDEN" and "does not serve" in reply.body["message"]
    await mux.ping()
    assert "Beautiful is better than ugly" not in echo_server.stdout_path.read_text()  # `import this` never ran
