"""SwarmFleet against a real single-node Docker Swarm, made and left by these tests.

Like the docker backend's tests they skip on a machine without a daemon (or
without the image) unless CI=true, where that fails them. The module's swarm
fixture inits a swarm on 127.0.0.1 (unless the node already is in one, which it
then leaves alone), and on the way out leaves it, removes the networks a swarm
leaves behind and asserts that no service, no swarm and no such network remain.
Nothing here pulls: the services run the local image by its ID.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any

import aiodocker
import aiohttp
import msgspec
import pytest

from rollout import EnvPool
from rollout.config import FleetConfig
from rollout.errors import EnvCrashed, FleetError
from rollout.fleet.docker import LABEL_EXPIRES, LABEL_OWNER, LABEL_POOL
from rollout.fleet.swarm import SwarmFleet, reap_services
from tests.conftest import skip_or_fail

from .docker_support import IMAGE, docker_unavailable, require_docker

pytestmark = pytest.mark.docker

SWARM_NETWORKS = ("docker_gwbridge", "ingress")


async def _swarm_state() -> str:
    async with aiodocker.Docker() as docker:
        return str((await docker.system.info())["Swarm"]["LocalNodeState"])


async def _init_swarm() -> None:
    async with aiodocker.Docker() as docker:
        await docker.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")


async def _leave_swarm() -> list[str]:
    """Leave (forced), remove the swarm's leftover networks; return what is still there."""
    left = []
    async with aiodocker.Docker() as docker:
        try:
            for service in await docker.services.list():
                await docker.services.delete(service["ID"])
        except aiodocker.DockerError:
            pass  # not a manager any more
        try:
            await docker.swarm.leave(force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 503:  # 503: not part of a swarm
                raise
        for name in SWARM_NETWORKS:
            for _ in range(50):  # the ingress sandbox may linger for a moment after the leave
                try:
                    await (await docker.networks.get(name)).delete()
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        break
                await asyncio.sleep(0.1)
        if (await docker.system.info())["Swarm"]["LocalNodeState"] != "inactive":
            left.append("swarm")
        names = {n["Name"] for n in await docker.networks.list()}
        left += [n for n in SWARM_NETWORKS if n in names]
        found = await docker.containers.list(all="1", filters=json.dumps({"label": [LABEL_POOL]}))
        left += [c["Names"][0] for c in found if "com.docker.swarm.service.id" in (c["Labels"] or {})]
    return left


@pytest.fixture(scope="module")
def swarm():
    """A single-node swarm on 127.0.0.1 for this module; nothing of it is left afterwards."""
    reason = asyncio.run(docker_unavailable())
    if reason is not None:
        skip_or_fail(f"the swarm tests cannot run: {reason}")
    ours = asyncio.run(_swarm_state()) == "inactive"
    try:
        if ours:
            asyncio.run(_init_swarm())
        yield
    finally:
        if ours:
            left = asyncio.run(_leave_swarm())
            assert left == [], f"left behind by the swarm tests: {left}"


def _config(**overrides: Any) -> FleetConfig:
    base = FleetConfig(backend="swarm", image=IMAGE, servers=2, start_timeout=60.0, env_options={"game": "catch"})
    return msgspec.structs.replace(base, **overrides)


async def _services(pool_id: str) -> list[Any]:
    async with aiodocker.Docker() as docker:
        return await docker.services.list(filters={"label": [f"{LABEL_POOL}={pool_id}"]})


async def _containers(pool_id: str) -> list[dict[str, Any]]:
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(all="1", filters=json.dumps({"label": [f"{LABEL_POOL}={pool_id}"]}))
        return [await docker.containers.container(c.id).show() for c in found]


async def _secrets(pool_id: str) -> list[Any]:
    async with aiodocker.Docker() as docker:
        return await docker.secrets.list(filters={"label": [f"{LABEL_POOL}={pool_id}"]})


async def _assert_gone(pool_id: str) -> None:
    assert await _services(pool_id) == []
    assert await _containers(pool_id) == []


async def test_not_a_swarm_manager_is_a_fleet_error():
    await require_docker("swarm")
    if await _swarm_state() != "inactive":
        pytest.skip("this node is in a swarm already")
    fleet = SwarmFleet(_config())
    with pytest.raises(FleetError, match="not part of a swarm"):
        await fleet.start()


async def test_service_health_hardening_labels_token_and_stop(swarm):
    fleet = SwarmFleet(_config(memory="256m", cpus=0.5, pids_limit=128))
    assert fleet.token, "a swarm pool always has a token"
    async with fleet:
        assert len(fleet.urls) == 2
        async with aiohttp.ClientSession() as http:
            for url in fleet.urls:
                assert url.startswith("http://127.0.0.1:")
                async with http.get(f"{url}/health", headers={"Authorization": f"Bearer {fleet.token}"}) as resp:
                    assert resp.status == 200
                async with http.get(f"{url}/health") as resp:
                    assert resp.status == 401
        (service,) = await _services(fleet.pool_id)
        spec = service["Spec"]
        assert spec["EndpointSpec"]["Ports"][0]["PublishMode"] == "host"
        assert spec["TaskTemplate"]["ContainerSpec"]["Image"].startswith("sha256:")  # by ID: never pulled
        assert spec["Labels"][LABEL_OWNER] == f"{os.getpid()}@{socket.gethostname()}"
        containers = await _containers(fleet.pool_id)
        assert len(containers) == 2
        for info in containers:
            host = info["HostConfig"]
            assert host["ReadonlyRootfs"] is True
            assert host["CapDrop"] == ["ALL"]
            assert host["PidsLimit"] == 128
            assert host["Memory"] == 256 << 20
            assert host["NanoCpus"] == 500_000_000
            assert any(m["Type"] == "tmpfs" and m["Target"] == "/tmp" for m in host["Mounts"])
            assert info["Config"]["User"] == "65534:65534"
            labels = info["Config"]["Labels"]
            assert labels[LABEL_POOL] == fleet.pool_id
            assert float(labels[LABEL_EXPIRES]) > time.time()
        assert set(fleet.containers().values()) == {c["Id"] for c in containers}
        # The token travels as a swarm secret file, in no field docker inspect shows.
        assert fleet.token not in json.dumps(service) and all(fleet.token not in json.dumps(c) for c in containers)
        (secret,) = spec["TaskTemplate"]["ContainerSpec"]["Secrets"]
        assert secret["SecretName"] == fleet.secret_name and secret["File"]["Mode"] == 0o400
        assert [s["Spec"]["Name"] for s in await _secrets(fleet.pool_id)] == [fleet.secret_name]
    await _assert_gone(fleet.pool_id)
    assert await _secrets(fleet.pool_id) == []
    await fleet.stop()  # idempotent


async def test_failing_server_and_missing_image_are_fleet_errors(swarm):
    fleet = SwarmFleet(_config(env="no-such-env", start_timeout=40.0))
    with pytest.raises(FleetError, match="unknown environment"):
        await fleet.start()
    await _assert_gone(fleet.pool_id)
    fleet = SwarmFleet(_config(image="envfleet-no-such-image:never"))
    with pytest.raises(FleetError, match="not present locally"):
        await fleet.start()
    await _assert_gone(fleet.pool_id)


async def test_reap_removes_expired_services(swarm):
    fleet = SwarmFleet(_config(servers=1, lifetime=1.0))
    try:
        await fleet.start()
        await asyncio.sleep(1.1)
        assert fleet.service_name in await reap_services()
        assert await _services(fleet.pool_id) == []
    finally:
        await fleet.stop()
    await _assert_gone(fleet.pool_id)


def _middle_action(observation: Any) -> int:
    legal = observation.legal_actions
    return int(legal[len(legal) // 2])


async def _records(pool: EnvPool, episodes: int, during: Any = None) -> list[tuple[int, int, float, int]]:
    """Play ``episodes``; call ``during()`` after the 20th record; every episode must come exactly once."""
    records = []
    async for record in pool.run(_middle_action, episodes=episodes, seed=7):
        records.append((record.episode, record.seed, record.reward, record.length))
        if during is not None and len(records) == 20:
            await during()
    assert len({r[0] for r in records}) == len(records) == episodes
    return sorted(records)


async def test_pool_plays_like_local_survives_a_kill_and_a_scale_down(swarm):
    async with EnvPool(n=4, game="catch", backend="local", servers=1) as local:
        expected = await _records(local, episodes=150)

    async with EnvPool(n=6, game="catch", backend="swarm", servers=3, image=IMAGE) as pool:
        fleet = pool.backend
        assert isinstance(fleet, SwarmFleet)
        assert await _records(pool, episodes=150) == expected

        # Kill a replica's container: its in-flight calls fail at once, the swarm starts another task.
        victim = pool.servers[0]
        killed_at = 0.0
        in_flight: list[asyncio.Future[Any]] = []

        async def kill() -> None:
            nonlocal killed_at
            async with aiodocker.Docker() as docker:
                killed_at = time.monotonic()
                await docker.containers.container(fleet.containers()[victim]).kill()
            in_flight.extend(asyncio.ensure_future(e.state()) for e in pool.envs if e.server == victim)

        assert await _records(pool, episodes=150, during=kill) == expected
        assert in_flight
        done, _ = await asyncio.wait(in_flight, timeout=5.0)  # far below the 60 s request timeout
        assert len(done) == len(in_flight), "calls on the killed replica did not fail fast"
        assert all(isinstance(f.exception(), EnvCrashed) for f in in_flight)
        assert victim not in pool.servers, "the killed replica was not replaced"
        lost_at = [lost for old, lost, _ in pool.replacements_log if old == victim]
        assert lost_at and lost_at[0] - killed_at < 5.0, "the dead replica was not noticed fast"
        assert len(set(pool.servers)) == 3

        # Scale 3 -> 1 under load: the pool moves its sessions to the survivor, nothing is lost.
        async def scale_down() -> None:
            await fleet.scale(1)

        assert await _records(pool, episodes=150, during=scale_down) == expected
        for _ in range(100):  # the scale-down may finish after the episodes do
            if len(set(pool.servers)) == 1 and all(slot.ready.is_set() for slot in pool._slots):
                break
            await asyncio.sleep(0.1)
        assert len(set(pool.servers)) == 1
        assert await _records(pool, episodes=60) == expected[:60]
        pool_id = fleet.pool_id
    await _assert_gone(pool_id)
