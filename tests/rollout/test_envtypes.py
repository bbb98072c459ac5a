"""The client decodes a custom environment's observations: into its own Structs, or generic data with tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from envserver.protocol import Metadata, Tensor, json_schema
from rollout import EnvClient, EnvPool
from rollout.envtypes import generic_type, wire_types

from ..plugin_support import pythonpath_with, write_plugins


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plugins(tmp_path_factory.mktemp("plugins"))


@pytest.fixture
def importable(plugins: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugins importable here and in the servers the local backend starts."""
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", pythonpath_with(plugins)["PYTHONPATH"])
    yield plugins
    for name in [m for m in sys.modules if m == "tinyplug" or m.startswith("tinyplug.")]:
        del sys.modules[name]


async def test_a_pool_of_a_module_path_decodes_into_the_envs_own_structs(importable: Path) -> None:
    from tinyplug.env import CountObservation, CountState

    async with EnvPool(n=4, env="tinyplug.env:CountEnv", backend="local", servers=1) as pool:
        results = await pool.reset(seeds=[1, 2, 3, 4])
        assert all(isinstance(r.observation, CountObservation) for r in results)
        result = await pool.envs[0].step({"add": 3})
        assert result.observation.total == 3 and result.observation.grid.numpy().tolist() == [[3, 3], [3, 3]]
        assert isinstance(await pool.envs[0].state(), CountState)
        assert pool._slots[0].client.wire_types.source == "local"


async def test_without_the_package_observations_are_generic_data_with_tensors(plugins: Path, spawn_server) -> None:
    assert "tinyplug" not in sys.modules
    server = spawn_server("--env", "count", env=pythonpath_with(plugins))  # only the server has the plugin
    async with EnvClient(server.url, env="count") as client:
        assert client.wire_types.source == "schema"
        sid = client.new_sid()
        await client.open(sid)
        first = await client.reset(sid, 0)
        assert first.observation["maybe"] is None and first.observation["total"] == 0
        result = await client.step(sid, {"add": 2})
        observation = result.observation
        assert type(observation) is dict and observation["total"] == 2
        assert isinstance(observation["grid"], Tensor) and observation["grid"].numpy().tolist() == [[2, 2], [2, 2]]
        assert isinstance(observation["maybe"], Tensor)
        assert isinstance(observation["readings"][0]["values"], Tensor) and observation["readings"][0]["label"] == "total"
        assert (await client.get_state(sid)) == {"total": 2, "step_count": 1}
    assert "tinyplug" not in sys.modules


def test_a_server_cannot_make_the_client_import_a_module_it_names() -> None:
    script = (
        "import sys\n"
        "from envserver.protocol import Metadata\n"
        "from rollout.envtypes import wire_types\n"
        "meta = Metadata('x', 'x', '0', 'x', [], 'this:Env', 'this:Observation', 'antigravity:State')\n"
        "types = wire_types(meta, {'observation': {'type': 'object'}, 'state': {}}, 'openspiel')\n"
        "assert types.source == 'schema', types\n"
        "assert 'this' not in sys.modules and 'antigravity' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_local_types_that_differ_from_the_servers_schema_are_not_used() -> None:
    from envserver.envs.echo import EchoObservation, EchoState

    meta = Metadata("echo", "", "0", "echo", [], None, "envserver.envs.echo:EchoObservation", "envserver.envs.echo:EchoState")
    same = wire_types(meta, {"observation": json_schema(EchoObservation), "state": json_schema(EchoState)}, "echo")
    assert (same.observation, same.state, same.source) == (EchoObservation, EchoState, "local")
    newer = json_schema(EchoObservation)
    newer["$defs"]["EchoObservation"]["properties"]["extra"] = {"type": "integer"}
    skewed = wire_types(meta, {"observation": newer, "state": json_schema(EchoState)}, "echo")
    assert skewed.source == "schema" and skewed.observation is Any


class Inner(msgspec.Struct):
    t: Tensor
    name: str


class Outer(msgspec.Struct):
    a: Tensor
    b: Tensor | None
    many: list[Tensor]
    by_key: dict[str, Tensor]
    inner: Inner
    text: str
    plain: dict[str, int]


class Node(msgspec.Struct):
    t: Tensor
    children: list[Node] = []


def test_generic_types_follow_the_schema_to_every_tensor() -> None:
    kind = generic_type(json_schema(Outer))
    t = Tensor((2,), bytes(8), "float32")
    value = Outer(t, None, [t, t], {"k": t}, Inner(t, "n"), "hi", {"x": 1})
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=kind)
    assert type(decoded) is dict and decoded["a"] == t and decoded["b"] is None and decoded["many"] == [t, t]
    assert decoded["by_key"] == {"k": t} and decoded["inner"] == {"t": t, "name": "n"} and decoded["text"] == "hi"
    assert generic_type(json_schema(msgspec.defstruct("NoTensors", [("x", int)]))) is Any
    assert generic_type(None) is Any and generic_type({"$ref": "#/$defs/Missing"}) is Any


def test_a_recursive_schema_stays_generic() -> None:
    kind = generic_type(json_schema(Node))
    node = Node(Tensor((1,), bytes(4)), [Node(Tensor((1,), bytes(4)))])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(node), type=kind)
    assert isinstance(decoded["t"], Tensor) and isinstance(decoded["children"], list)


@pytest.mark.parametrize("spec", ["tinyplug.env:CountEnv", "count"])
def test_rollout_eval_takes_a_module_path_or_a_registered_name(spec: str, plugins: Path, tmp_path: Path) -> None:
    import json
    import os

    done = subprocess.run(
        [
            Path(sys.executable).parent / "rollout", "eval", "--env", spec, "--options", '{"limit": 4}', "--policy", "tinyplug.env:add_one",
            "--episodes", "10", "--n", "2", "--servers", "1", "--out", tmp_path / "runs.jsonl", "--summary-json", "-",
        ],
        capture_output=True, text=True, timeout=120, env={**os.environ, **pythonpath_with(plugins)},
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert summary["episodes"] == 10 and summary["mean_return"] == 4.0 and summary["env"] == spec


async def test_a_pool_of_a_missing_module_fails_at_start_with_the_servers_reason() -> None:
    from rollout import FleetError

    with pytest.raises(FleetError) as info:
        async with EnvPool(n=2, env="no_such_module_xyz:Env", backend="local", servers=1):
            pass
    assert "no module named 'no_such_module_xyz'" in str(info.value)
