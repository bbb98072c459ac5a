"""Environments as plugins: entry points, ``package.module:Class``, ``--list-envs``, and the bad input around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from envserver import envs
from envserver.errors import ServerError
from envserver.protocol import ErrorCode

from ..plugin_support import pythonpath_with, write_plugins


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plugins(tmp_path_factory.mktemp("plugins"))


def envserver(plugins: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "envserver", "--port", "0", "--lifetime", "5", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **pythonpath_with(plugins)},
    )


def test_builtin_environments_register_through_entry_points() -> None:
    import importlib.metadata

    points = {p.name: p.value for p in importlib.metadata.entry_points(group="envfleet.envs")}
    assert points["echo"] == "envserver.envs.echo:EchoEnv"
    assert {"openspiel", "echo", "python_sandbox"} <= set(envs.names())
    assert envs.load("echo").name == "echo"


def test_list_envs_names_the_broken_plugins_and_hides_none(plugins: Path) -> None:
    done = envserver(plugins, "--list-envs")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert "Adds numbers; observations carry tensors." in lines["count"]
    assert "Echoes each message back" in lines["echo"] and "OpenSpiel games" in lines["openspiel"]
    assert "cannot load" in lines["broken_plugin"] and "this plugin is broken at import" in lines["broken_plugin"]
    assert "cannot load" in lines["missing_plugin"] and "no_such_module_xyz" in lines["missing_plugin"]
    assert "Traceback" not in done.stdout + done.stderr
    as_json = json.loads(envserver(plugins, "--list-envs", "--json").stdout)
    rows = {row["name"]: row for row in as_json}
    assert rows["count"] == {"name": "count", "description": "Adds numbers; observations carry tensors.", "target": "tinyplug.env:CountEnv"}
    assert "this plugin is broken at import" in rows["broken_plugin"]["error"] and "description" not in rows["broken_plugin"]


@pytest.mark.parametrize(
    "spec,cause",
    [
        ("no_such_module_xyz:Env", "no module named 'no_such_module_xyz'"),
        ("tinyplug.env:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("raises_on_import:Env", "RuntimeError: this plugin is broken at import"),
        ("imports_missing:Env", "No module named 'no_such_dependency_xyz'"),
        ("not_an_env:Thing", "Thing is not an envserver.env.Environment subclass"),
        ("json:dumps", "function is not an envserver.env.Environment subclass"),
        ("broken_plugin", "this plugin is broken at import"),
        ("no_such_name", "unknown environment 'no_such_name'"),
        ("tinyplug.env:", "expected package.module:Class"),
        ("openenv:no_such_module_xyz:Env", ""),
    ],
)
def test_a_bad_env_exits_at_start_with_one_line(plugins: Path, spec: str, cause: str) -> None:
    done = envserver(plugins, "--env", spec)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("envserver: error: "), done.stderr
    assert cause in lines[0]
    assert "listening" not in done.stdout


def test_options_the_class_refuses_are_one_line_too(plugins: Path) -> None:
    done = envserver(plugins, "--env", "tinyplug.env:CountEnv", "--env-options", '{"limit": "many"}')
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot create tinyplug.env:CountEnv: ValueError" in done.stderr


def test_load_refuses_paths_when_asked_for_names_only() -> None:
    with pytest.raises(ServerError) as info:
        envs.load("json:dumps", allow_paths=False)
    assert info.value.code == ErrorCode.NOT_FOUND and "registered name" in info.value.message
    assert envs.load("echo", allow_paths=False).name == "echo"


def test_register_in_process_wins_and_is_forgotten() -> None:
    from envserver.envs.echo import EchoEnv

    envs.register("echo_again", EchoEnv)
    try:
        assert envs.load("echo_again") is EchoEnv and "echo_again" in envs.names()
    finally:
        envs.unregister("echo_again")
    assert "echo_again" not in envs.names()
    with pytest.raises(ValueError):
        envs.register("a:b", EchoEnv)


async def test_a_module_path_is_served_and_a_client_cannot_name_another(plugins: Path, spawn_server, mux_connect) -> None:
    server = spawn_server("--env", "tinyplug.env:CountEnv", env=pythonpath_with(plugins))
    mux = await mux_connect(server)
    assert (await mux.one("open", 1))["env"] == "count"  # the class's name
    body = await mux.one("reset", 1, 0)
    assert body["observation"]["total"] == 0 and body["observation"]["grid"][0] == [2, 2]
    assert (await mux.one("step", 1, {"add": 2}))["observation"]["total"] == 2
    for spec in ("json:dumps", "raises_on_import:Env", "openenv:tinyplug.env:CountEnv"):
        (reply,) = await mux.call(mux.req("open", 2, spec))
        assert not reply.ok and reply.body["code"] == "NOT_FOUND", reply
    assert (await mux.one("open", 3, "count"))["env"] == "count"  # registered names may be asked for
    assert "raises_on_import" not in server.stderr()


async def test_an_env_that_raises_in_step_fails_only_that_session(plugins: Path, spawn_server, mux_connect) -> None:
    server = spawn_server("--env", "count", "--env-options", '{"limit": 100}', env=pythonpath_with(plugins))
    mux = await mux_connect(server)
    for sid in (1, 2):
        await mux.one("open", sid)
        await mux.one("reset", sid, 0)
    bad, good = await mux.call(mux.req("step", 1, {"add": 13}), mux.req("step", 2, {"add": 1}))
    assert not bad.ok and bad.body["code"] == "EXECUTION_ERROR" and "unlucky number" in bad.body["message"]
    assert good.ok and good.body["observation"]["total"] == 1
    results, failures = await mux.one("steps", [1, 2], [{"add": 13}, {"add": 1}])  # in one many-request too
    assert results[0] is None and failures[0]["code"] == "EXECUTION_ERROR"
    assert results[1]["observation"]["total"] == 2
    assert (await mux.one("step", 1, {"add": 5}))["observation"]["total"] == 5  # the failed session goes on
    assert (await mux.one("step", 2, {"add": 1}))["observation"]["total"] == 3
    await mux.ping()
