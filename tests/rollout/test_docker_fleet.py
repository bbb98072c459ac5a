"""DockerFleet against a real Docker daemon.

These tests skip on a machine without a daemon (or without the image), unless
CI=true: there a missing daemon or image fails them. The image under test is
$ENVFLEET_TEST_IMAGE (default envfleet:latest, made by `rollout image build`);
nothing here pulls.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from typing import Any

import aiodocker
import aiohttp
import msgspec
import pytest

from rollout.config import FleetConfig
from rollout.errors import FleetError
from rollout.fleet.docker import (
    LABEL_EXPIRES,
    LABEL_OWNER,
    LABEL_POOL,
    DockerFleet,
    list_containers,
    reap,
)
from tests.conftest import skip_or_fail

from .docker_support import IMAGE, docker_unavailable

pytestmark = pytest.mark.docker

OWNER = f"{os.getpid()}@{socket.gethostname()}"


async def _labelled(label: str) -> list[dict]:
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(all="1", filters=json.dumps({"label": [label]}))
        return [await docker.containers.container(c.id).show() for c in found]


@pytest.fixture(scope="session")
def docker_daemon():
    """Skip (or, in CI, fail) when the daemon or the image is missing; at the end, check nothing is left."""
    reason = asyncio.run(docker_unavailable())
    if reason is not None:
        skip_or_fail(f"the Docker tests cannot run: {reason}")
    yield
    left = asyncio.run(_labelled(f"{LABEL_OWNER}={OWNER}"))
    assert left == [], f"containers left behind by this test session: {[c['Name'] for c in left]}"


def _config(**overrides: Any) -> FleetConfig:
    base = FleetConfig(backend="docker", image=IMAGE, servers=2, start_timeout=60.0)
    return msgspec.structs.replace(base, **overrides)


async def _assert_pool_gone(pool_id: str) -> None:
    assert await _labelled(f"{LABEL_POOL}={pool_id}") == []


async def test_start_health_hardening_labels_and_stop(docker_daemon):
    fleet = DockerFleet(_config(memory="256m", cpus=0.5, pids_limit=128))
    async with fleet:
        assert len(fleet.urls) == 2
        assert fleet.token
        async with aiohttp.ClientSession() as http:
            for url in fleet.urls:
                assert url.startswith("http://127.0.0.1:")
                headers = {"Authorization": f"Bearer {fleet.token}"}
                async with http.get(f"{url}/health", headers=headers) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"status": "healthy"}
                async with http.get(f"{url}/health") as resp:
                    assert resp.status == 401
                async with http.post(f"{url}/reset", headers=headers, json={"seed": 1}) as resp:
                    assert resp.status == 200, await resp.text()

        containers = await _labelled(f"{LABEL_POOL}={fleet.pool_id}")
        assert len(containers) == 2
        for info in containers:
            host = info["HostConfig"]
            assert host["ReadonlyRootfs"] is True
            assert "/tmp" in host["Tmpfs"]
            assert host["CapDrop"] == ["ALL"]
            assert "no-new-privileges" in host["SecurityOpt"]
            assert host["PidsLimit"] == 128
            assert host["Memory"] == 256 * 1024 * 1024
            assert host["NanoCpus"] == 500_000_000
            assert host["PortBindings"]["8000/tcp"][0]["HostIp"] == "127.0.0.1"
            assert info["Config"]["User"] == "65534:65534"
            assert info["Config"]["Cmd"][0] == "timeout"
            labels = info["Config"]["Labels"]
            assert labels[LABEL_POOL] == fleet.pool_id
            assert labels[LABEL_OWNER] == OWNER
            assert float(labels[LABEL_EXPIRES]) > 0

        rows = await list_containers()
        assert {r["url"] for r in rows if r["pool"] == fleet.pool_id} == set(fleet.urls)
    await _assert_pool_gone(fleet.pool_id)
    await fleet.stop()  # idempotent


async def test_missing_image_is_a_fleet_error(docker_daemon):
    fleet = DockerFleet(_config(image="envfleet-no-such-image:never"))
    with pytest.raises(FleetError, match="not present locally"):
        await fleet.start()
    await _assert_pool_gone(fleet.pool_id)


async def test_server_crashing_on_start_is_named(docker_daemon):
    fleet = DockerFleet(_config(env="no-such-env"))
    with pytest.raises(FleetError) as info:
        await fleet.start()
    message = str(info.value)
    assert f"envfleet-{fleet.pool_id}-" in message
    assert "exited with code" in message
    assert "unknown environment" in message
    await _assert_pool_gone(fleet.pool_id)


async def test_never_healthy_hits_the_deadline(docker_daemon):
    fleet = DockerFleet(_config(servers=1, start_timeout=0.2))
    with pytest.raises(FleetError, match="did not answer"):
        await fleet.start()
    await _assert_pool_gone(fleet.pool_id)


async def test_replace_and_death_detection(docker_daemon):
    async with DockerFleet(_config()) as fleet:
        victim, survivor = fleet.urls
        name = fleet.describe(victim)
        assert name.startswith(f"container envfleet-{fleet.pool_id}-")

        fresh = await fleet.replace(victim)
        assert sorted(fleet.urls) == sorted([survivor, fresh])
        assert len(await _labelled(f"{LABEL_POOL}={fleet.pool_id}")) == 2

        async with aiodocker.Docker() as docker:
            target = next(c for c in await _labelled(f"{LABEL_POOL}={fleet.pool_id}")
                          if c["Name"].lstrip("/") in fleet.describe(fresh))
            await docker.containers.container(target["Id"]).kill()
        dead = await asyncio.wait_for(fleet.wait_dead(), timeout=10)
        assert dead == fresh
        again = await fleet.replace(dead)
        assert again in fleet.urls and dead not in fleet.urls
    await _assert_pool_gone(fleet.pool_id)


async def test_reap_removes_expired_and_orphaned_only(docker_daemon):
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = int(time.time())
    kinds = {
        "expired": {LABEL_OWNER: OWNER, LABEL_EXPIRES: str(now - 1)},
        "orphan": {LABEL_OWNER: f"{gone.pid}@{socket.gethostname()}", LABEL_EXPIRES: str(now + 600)},
        "live": {LABEL_OWNER: OWNER, LABEL_EXPIRES: str(now + 600)},
    }
    pool = f"test-reap-{os.getpid()}"
    async with aiodocker.Docker() as docker:
        made = {}
        try:
            for kind, labels in kinds.items():
                config = {"Image": IMAGE, "Cmd": ["true"], "Labels": {LABEL_POOL: pool, **labels}}
                made[kind] = await docker.containers.create(config, name=f"{pool}-{kind}")
            removed = await reap()
            assert f"{pool}-expired" in removed and f"{pool}-orphan" in removed
            assert f"{pool}-live" not in removed
            left = await _labelled(f"{LABEL_POOL}={pool}")
            assert [c["Name"].lstrip("/") for c in left] == [f"{pool}-live"]
        finally:
            for container in made.values():
                try:
                    await container.delete(force=True)
                except aiodocker.DockerError as exc:
                    assert exc.status == 404


async def test_daemon_down_is_a_fleet_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    fleet = DockerFleet(_config())
    with pytest.raises(FleetError, match="does not answer"):
        await fleet.start()
    with pytest.raises(FleetError):
        await list_containers()


def _middle_action(observation: Any) -> int:
    legal = observation.legal_actions
    return int(legal[len(legal) // 2])


async def _play(pool: Any, episodes: int, kill_after: int | None = None) -> list[tuple[int, int, float, int]]:
    records = []
    retried = 0
    async for record in pool.run(_middle_action, episodes=episodes, seed=7):
        records.append((record.episode, record.seed, record.reward, record.length))
        retried += bool(record.info.get("retries"))
        if kill_after is not None and len(records) == kill_after:
            victim = pool.servers[0]
            async with aiodocker.Docker() as docker:
                for c in await _labelled(f"{LABEL_POOL}={pool.backend.pool_id}"):
                    if c["Name"].lstrip("/") in pool.backend.describe(victim):
                        await docker.containers.container(c["Id"]).kill()
    if kill_after is not None:
        assert victim not in pool.servers, "the killed server was not replaced"
        assert retried > 0, "no episode was replayed after the kill"
    return sorted(records)


async def test_pool_plays_the_same_seeded_episodes_as_local_and_survives_a_kill(docker_daemon):
    from rollout import EnvPool

    async with EnvPool(n=4, game="catch", backend="local", servers=1) as local:
        expected = await _play(local, episodes=200)
    async with EnvPool(n=4, game="catch", backend="docker", servers=2, image=IMAGE) as pool:
        assert await _play(pool, episodes=200) == expected
        assert await _play(pool, episodes=200, kill_after=1) == expected
        pool_id = pool.backend.pool_id
    await _assert_pool_gone(pool_id)


async def _exit_code(container_id: str, code: str) -> int:
    async with aiodocker.Docker() as docker:
        run = await docker.containers.container(container_id).exec(["python", "-c", code])
        async with run.start(detach=False) as stream:
            while await stream.read_out() is not None:
                pass
        return int((await run.inspect())["ExitCode"])


async def test_isolated_network_blocks_egress_and_neighbours(docker_daemon):
    probe = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(2)\n"
        "sys.exit(1 if s.connect_ex(('{}', {})) == 0 else 0)\n"
    )
    async with DockerFleet(_config(), network="isolated") as fleet:
        first, second = fleet.urls
        assert not first.startswith("http://127.0.0.1")
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {fleet.token}"}
            async with http.get(f"{first}/health", headers=headers) as resp:
                assert resp.status == 200
        rows = {r["url"]: r for r in await list_containers() if r["pool"] == fleet.pool_id}
        assert set(rows) == {first, second}
        neighbour = second.removeprefix("http://").split(":")[0]
        source = rows[first]["id"]
        assert await _exit_code(source, probe.format(neighbour, 8000)) == 0, "reached a neighbour container"
        # Egress is checked without sending a packet off this machine: the network is internal and
        # the daemon's firewall drops everything from its bridge to any address outside its subnet.
        async with aiodocker.Docker() as docker:
            network = await (await docker.networks.get("envfleet-isolated")).show()
        assert network["Internal"] is True
        subnet = network["IPAM"]["Config"][0]["Subnet"]
        bridge = "br-" + network["Id"][:12]
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
        assert f"! -d {subnet} -i {bridge} -j DROP" in rules, "no rule drops traffic leaving the isolated network"
        info = (await _labelled(f"{LABEL_POOL}={fleet.pool_id}"))[0]
        assert info["HostConfig"]["PortBindings"] in (None, {})
    await _assert_pool_gone(fleet.pool_id)


@pytest.mark.parametrize("delay", [0.02, 0.3])
async def test_cancelled_start_leaves_nothing(docker_daemon, delay):
    fleet = DockerFleet(_config(servers=4))
    start = asyncio.create_task(fleet.start())
    await asyncio.sleep(delay)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await _assert_pool_gone(fleet.pool_id)
