"""Docker pools under hostile conditions: hardening and the random token as a pool sets them up,
a client SIGKILLed mid-run, and the containers' hard lifetime.

Same rules as test_docker_fleet.py (whose fixture this reuses): skipped without a daemon or
image outside CI, failed under CI=true.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import aiodocker
import aiohttp
import pytest

from rollout import EnvPool
from rollout.fleet.docker import (
    LABEL_EXPIRES,
    LABEL_OWNER,
    LABEL_POOL,
    DockerFleet,
    list_containers,
    reap,
)
from tests.rollout.test_docker_fleet import IMAGE, _config, _labelled, docker_daemon  # noqa: F401 - fixture reused

pytestmark = pytest.mark.docker

# A client that starts a Docker pool, plays a little, says so, and waits to be SIGKILLed.
CLIENT = """
import asyncio, sys
from rollout import EnvPool

async def main(image):
    async with EnvPool(n=2, game="catch", backend="docker", servers=2, image=image) as pool:
        await pool.reset(seeds=[1, 2])
        print(pool.backend.pool_id, flush=True)
        await asyncio.sleep(300)

asyncio.run(main(sys.argv[1]))
"""


async def _logs(container_id: str) -> str:
    async with aiodocker.Docker() as docker:
        return "".join(await docker.containers.container(container_id).log(stdout=True, stderr=True))


async def _remove_pool(pool_id: str) -> None:
    async with aiodocker.Docker() as docker:
        for info in await _labelled(f"{LABEL_POOL}={pool_id}"):
            try:
                await docker.containers.container(info["Id"]).delete(force=True)
            except aiodocker.DockerError as exc:
                assert exc.status in (404, 409)


async def test_pool_containers_are_hardened_and_need_the_random_token(docker_daemon, caplog) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    async with EnvPool(n=2, game="catch", backend="docker", servers=1, image=IMAGE) as pool:
        backend = pool.backend
        assert isinstance(backend, DockerFleet)
        token = backend.token
        assert token and len(token) >= 32
        assert DockerFleet(backend.config).token != token  # random per pool
        (info,) = await _labelled(f"{LABEL_POOL}={backend.pool_id}")
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert set(host["Tmpfs"]["/tmp"].split(",")) >= {"noexec", "nosuid", "nodev"}
        assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["Privileged"] is False
        assert host["PidsLimit"] == backend.config.pids_limit
        assert host["Memory"] == 512 * 1024 * 1024 and host["MemorySwap"] == host["Memory"]
        assert host["NanoCpus"] == int(backend.config.cpus * 1e9)
        assert host["RestartPolicy"]["Name"] == "no"
        assert all(b["HostIp"] == "127.0.0.1" for b in host["PortBindings"]["8000/tcp"])
        assert info["Config"]["User"] == "65534:65534"
        assert info["Config"]["Cmd"][:2] == ["timeout", "-k"]

        url = pool.servers[0]
        async with aiohttp.ClientSession() as http:
            for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                    ({"Authorization": f"Bearer {token}"}, 200)):
                async with http.get(url + "/health", headers=headers) as r:
                    assert r.status == status
        await pool.reset(seeds=[1, 2])
        logs = await _logs(info["Id"])
        pool_id = backend.pool_id
    assert token not in logs
    assert token not in caplog.text
    assert await _labelled(f"{LABEL_POOL}={pool_id}") == []


async def _killed_client() -> tuple[str, int]:
    """Run CLIENT until its pool serves, SIGKILL it; return its pool id and pid."""
    pipe = asyncio.subprocess.PIPE
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, IMAGE, stdout=pipe, stderr=pipe)
    assert client.stdout is not None and client.stderr is not None
    try:
        line = await asyncio.wait_for(client.stdout.readline(), 120)
        if not line.strip():
            await client.wait()
            pytest.fail(f"the client did not start its pool: {(await client.stderr.read()).decode()}")
        client.send_signal(signal.SIGKILL)
        await client.wait()
        return line.decode().strip(), client.pid
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()


async def _assert_orphaned(pool_id: str, pid: int) -> list[str]:
    left = await _labelled(f"{LABEL_POOL}={pool_id}")
    assert len(left) == 2 and all(c["State"]["Running"] for c in left)  # nobody cleaned up
    assert {c["Config"]["Labels"][LABEL_OWNER].split("@")[0] for c in left} == {str(pid)}
    rows = [r for r in await list_containers() if r["pool"] == pool_id]
    assert len(rows) == 2 and all(r["orphaned"] for r in rows)
    return sorted(c["Name"].lstrip("/") for c in left)


async def test_killed_client_leaves_containers_that_reap_and_the_next_pool_remove(docker_daemon) -> None:  # noqa: F811
    pools: list[str] = []
    try:
        pool_id, pid = await _killed_client()
        pools.append(pool_id)
        names = await _assert_orphaned(pool_id, pid)
        assert sorted(set(await reap()) & set(names)) == names  # `rollout fleet reap`
        assert await _labelled(f"{LABEL_POOL}={pool_id}") == []

        pool_id, pid = await _killed_client()
        pools.append(pool_id)
        await _assert_orphaned(pool_id, pid)
        async with DockerFleet(_config(servers=1)):  # the next pool start reaps orphans first
            assert await _labelled(f"{LABEL_POOL}={pool_id}") == []
    finally:
        for pool_id in pools:
            await _remove_pool(pool_id)


async def test_containers_stop_by_themselves_at_their_hard_lifetime(docker_daemon) -> None:  # noqa: F811
    lifetime = 12
    fleet = DockerFleet(_config(servers=1, lifetime=float(lifetime), start_timeout=lifetime - 2))
    async with fleet:
        (url,) = fleet.urls
        started = time.time()
        (info,) = await _labelled(f"{LABEL_POOL}={fleet.pool_id}")
        expires = float(info["Config"]["Labels"][LABEL_EXPIRES])
        assert started - 5 < expires - lifetime < started + 15  # lifetime plus the kill grace
        assert await asyncio.wait_for(fleet.wait_dead(), lifetime + 20) == url
        (info,) = await _labelled(f"{LABEL_POOL}={fleet.pool_id}")
        assert info["State"]["Running"] is False
        assert info["State"]["ExitCode"] == 124  # timeout(1): the command was stopped at the lifetime
    assert await _labelled(f"{LABEL_POOL}={fleet.pool_id}") == []

