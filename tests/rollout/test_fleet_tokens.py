"""Servers a backend starts always require a fresh random token, handed over where code cannot read it.

The token must not be in the server's environment or command line (``/proc/<pid>/environ``,
``/proc/<pid>/cmdline``, ``docker inspect``): sandboxed code runs as the server's user and
could read them.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest

from rollout import EnvPool, Unauthorized
from rollout.client import EnvClient
from rollout.config import FleetConfig
from rollout.fleet.local import LocalFleet


async def _refuses_without_token(url: str, token: str) -> None:
    """Every surface of ``url`` answers 401 without ``token`` and works with it."""
    ws_url = "ws" + url[len("http") :]
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/health"), ("GET", "/metrics"), ("POST", "/reset")):
            async with http.request(method, url + path, json={}) as r:
                assert r.status == 401 and (await r.json())["code"] == "UNAUTHORIZED", path
            async with http.request(method, url + path, json={}, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401, path
        for path in ("/ws", "/v1/mux", f"/v1/mux?token={token}"):  # a query-string token counts only on the play page
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(ws_url + path)
            assert info.value.status == 401, path
        async with http.get(url + "/health", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    with pytest.raises(Unauthorized):
        await EnvClient(url, connect_timeout=10).connect()
    async with EnvClient(url, token=token) as client:
        await client.open(client.new_sid())


async def test_local_servers_require_a_fresh_token_kept_out_of_environ_and_argv() -> None:
    first, second = LocalFleet(FleetConfig(servers=1, env="echo")), LocalFleet(FleetConfig(servers=1, env="echo"))
    async with first, second:
        assert first.token and second.token and first.token != second.token  # fresh per pool
        assert len(first.token) >= 32
        url = first.urls[0]
        await _refuses_without_token(url, first.token)
        pid = first.pid(url)
        for what in ("environ", "cmdline"):
            assert first.token.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), what
        assert b"ENVSERVER_TOKEN" not in Path(f"/proc/{pid}/environ").read_bytes()


async def test_a_pool_passes_its_options_to_the_servers_it_starts_not_in_each_open() -> None:
    """Operator settings go to the server's command line; ``open`` carries no options a server could refuse."""
    config = FleetConfig(servers=1, env="python_sandbox", env_options={"timeout": 1.0})
    assert config.open_options() == {}
    assert FleetConfig(backend="endpoints", endpoints=("http://x",), env_options={"game": "go"}).open_options() == {"game": "go"}
    async with EnvPool(n=1, fleet=config) as pool:  # an open carrying "timeout" would be refused
        pid = pool.backend.pid(pool.servers[0])  # type: ignore[union-attr]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert json.loads(argv[argv.index(b"--env-options") + 1]) == {"timeout": 1.0}
        await pool.envs[0].reset()
        result = await pool.envs[0].step({"code": "import time; time.sleep(5)"})
        assert result.observation.timed_out  # after the operator's 1 s, not the default 10 s


@pytest.mark.docker
async def test_docker_servers_require_a_token_that_is_in_no_inspect_field() -> None:
    import aiodocker

    from rollout.fleet.docker import DockerFleet

    from .docker_support import IMAGE, require_docker

    await require_docker()
    fleet = DockerFleet(FleetConfig(backend="docker", image=IMAGE, servers=1, env="echo"))
    async with fleet:
        (url,) = fleet.urls
        await _refuses_without_token(url, fleet.token)
        async with aiodocker.Docker() as docker:
            info = await docker.containers.container(fleet._ids[url]).show()
        assert fleet.token not in json.dumps(info)  # not in Env, Cmd, Labels, ...
        assert info["Config"]["OpenStdin"] is True and info["Config"]["StdinOnce"] is True


@pytest.mark.docker
async def test_the_image_default_command_needs_a_token_file(tmp_path: Path) -> None:
    """``docker run`` of the image as is refuses to serve every interface without a token; a mounted secret starts it."""
    import aiodocker

    from .docker_support import IMAGE, require_docker

    await require_docker()
    secret = tmp_path / "envfleet-token"
    secret.write_text("image-token\n")
    secret.chmod(0o444)
    base = {"Image": IMAGE, "Labels": {"envfleet.test": "token-file"}, "HostConfig": {"NetworkMode": "none"}}
    async with aiodocker.Docker() as docker:
        bare = await docker.containers.run(base, name=f"envfleet-token-bare-{os.getpid()}")
        try:
            state = await bare.wait(timeout=60)
            logs = "".join(await bare.log(stdout=True, stderr=True))
            assert state["StatusCode"] == 2 and "envfleet-token" in logs, logs
        finally:
            await bare.delete(force=True)
        mounted = {**base, "HostConfig": {**base["HostConfig"], "Binds": [f"{secret}:/run/secrets/envfleet-token:ro"]}}
        served = await docker.containers.run(mounted, name=f"envfleet-token-file-{os.getpid()}")
        try:
            for _ in range(150):
                logs = "".join(await served.log(stdout=True, stderr=True))
                if "listening on" in logs:
                    break
                await asyncio.sleep(0.2)
            assert "listening on http://0.0.0.0:8000" in logs, logs
            assert (await served.show())["State"]["Running"] is True
        finally:
            await served.delete(force=True)
