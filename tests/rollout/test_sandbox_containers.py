"""The Python sandbox in containers: the seccomp profile and options (docker), one session per container (swarm).

The Docker test runs a real python_sandbox server in a container of the docker backend
and checks, from inside, that its sandboxes get namespaces of their own: two sessions on
that one server cannot see each other's files or processes, the tasks module is not
there, and grading still works. It needs the image $ENVFLEET_TEST_IMAGE with bubblewrap
(``deploy/build-base-image.sh`` installs it); it skips without Docker, and fails under CI=true.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import msgspec
import pytest

from envserver.envs.sandbox.tasks import TASKS
from rollout.config import FleetConfig
from rollout.fleet.docker import LABEL_POOL, DockerFleet
from rollout.fleet.sandbox_security import profile, profile_json, sandbox_host_config, swarm_session_args
from rollout.fleet.swarm import SwarmFleet

from .docker_support import IMAGE, require_docker

PROFILE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "seccomp-sandbox.json"


def _config(**fields: Any) -> FleetConfig:
    return msgspec.structs.replace(FleetConfig(backend="docker", image=IMAGE, servers=1, start_timeout=60.0), **fields)


def test_the_deploy_profile_is_the_one_the_backends_send() -> None:
    assert PROFILE_FILE.read_text() == profile_json()
    refused = set(profile()["syscalls"][0]["names"])
    assert {"keyctl", "bpf", "ptrace", "io_uring_setup", "setns"} <= refused
    assert not refused & {"unshare", "clone", "clone3", "mount", "umount2", "pivot_root"}  # what bubblewrap needs


def test_only_sandbox_containers_get_the_profile_and_unmasked_paths() -> None:
    host = DockerFleet(_config(env="python_sandbox"))._container_config()["HostConfig"]
    assert host["SecurityOpt"][0] == "no-new-privileges" and host["MaskedPaths"] == host["ReadonlyPaths"] == []
    assert json.loads(host["SecurityOpt"][1][len("seccomp=") :]) == profile()
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True  # the rest of the hardening stays
    plain = DockerFleet(_config(env="openspiel"))._container_config()["HostConfig"]
    assert plain["SecurityOpt"] == ["no-new-privileges"] and "MaskedPaths" not in plain
    assert sandbox_host_config("echo", {"SecurityOpt": []}) == {"SecurityOpt": []}


def test_swarm_holds_one_sandbox_session_per_container_unless_the_operator_shares() -> None:
    assert swarm_session_args("python_sandbox", None) == ["--max-sessions", "1"]
    assert swarm_session_args("python_sandbox", 8) == []  # the explicit opt-in
    assert swarm_session_args("openspiel", None) == []
    fleet = SwarmFleet(_config(backend="swarm", env="python_sandbox"))
    command = fleet._task_template("sha256:0")["ContainerSpec"]["Command"]
    assert command[-2:] == ["--max-sessions", "1"]


async def _open(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    ws = await http.ws_connect(url.replace("http", "ws", 1) + "/ws", headers=headers)
    await ws.send_str(json.dumps({"type": "reset", "data": {"options": {"task": "fizzbuzz"}}}))
    reply = json.loads(await ws.receive_str(timeout=60))
    assert reply["type"] == "observation", reply
    return ws, reply


async def _step(ws: Any, code: str) -> dict[str, Any]:
    await ws.send_str(json.dumps({"type": "step", "data": {"code": code}}))
    reply = json.loads(await ws.receive_str(timeout=60))
    assert reply["type"] == "observation", reply
    data: dict[str, Any] = reply["data"]
    return data


@pytest.mark.docker
async def test_sandboxes_in_a_docker_container_are_namespaced_and_grade_honestly() -> None:
    await require_docker()
    fleet = DockerFleet(_config(env="python_sandbox"))  # the isolated network, as for every python_sandbox fleet
    async with fleet, aiohttp.ClientSession() as http:
        (url,) = fleet.urls
        headers = {"Authorization": f"Bearer {fleet.token}"}
        a, _ = await _open(http, url, headers)
        b, _ = await _open(http, url, headers)
        try:
            info = await _step(a, "import os\nopen('secret.txt', 'w').write('mine')\nprint(os.getcwd(), *sorted(p for p in os.listdir('/proc') if p.isdigit()))")
            if info["observation"]["stdout"] != "/tmp 1 2\n":
                pytest.fail(f"the sandbox in the container has no namespaces of its own: {info['observation']}")
            seen = await _step(b, "import glob, os\nprint(glob.glob('/tmp/**/secret.txt', recursive=True), os.path.exists('/opt/venv/bin/envserver'))")
            assert seen["observation"]["stdout"] == "[] True\n"  # not A's file; the image's Python is there (read-only)
            hack = (
                "def fizzbuzz(n):\n"
                "    import envserver.envs.sandbox.tasks as t\n"
                "    space = {}\n"
                "    exec(t.TASKS['fizzbuzz'].solution, space)\n"
                "    return space['fizzbuzz'](n)\n"
            )
            result = await _step(b, hack)
            assert (result["reward"], result["observation"]["tests_passed"]) == (0.0, 0)
            honest = await _step(a, TASKS["fizzbuzz"].solution)
            assert (honest["reward"], honest["done"]) == (1.0, True)
        finally:
            await a.close()
            await b.close()
    async with aiodocker.Docker() as docker:
        left = await docker.containers.list(all="1", filters=json.dumps({"label": [f"{LABEL_POOL}={fleet.pool_id}"]}))
    assert left == []
