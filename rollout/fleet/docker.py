"""Fleet backend that runs each envserver in its own hardened Docker container.

The containers are created through aiodocker and never pulled: a missing image
is a ``FleetError``. Each one is published on 127.0.0.1 with an ephemeral port,
runs non-root on a read-only root fs with a tmpfs ``/tmp``, no capabilities,
no-new-privileges and pids/memory/CPU limits, and carries the labels

- ``envfleet.pool``    the id of the pool (fleet) that owns it,
- ``envfleet.owner``   ``<pid>@<host>`` of the process that created it,
- ``envfleet.user``    the login name of that process's user,
- ``envfleet.expires`` the unix time after which anyone may remove it.

The command is wrapped in ``timeout`` so a container also ends by itself
after ``FleetConfig.lifetime`` seconds, even if nobody reaps it.

The servers require a bearer token (random per pool unless the config names one).
It reaches each server through the container's standard input, attached once
(``--token-file -``, ``StdinOnce``): not in the container's environment or
command, which ``docker inspect`` and code inside the container could read.

Networking: by default each server is published on 127.0.0.1 and the
container sits on Docker's default bridge, so code inside it can reach other
hosts. With ``network="isolated"`` the containers join an internal bridge
network (``envfleet-isolated``: no route out, no traffic between containers)
and are reached at their bridge address, which only this host can route to;
use it for environments that run untrusted code (the Python sandbox). It
needs the host to reach container addresses directly (native Linux Docker).
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import json
import os
import re
import secrets
import socket
import time
from typing import Any

import aiodocker
import aiohttp

from rollout.config import FleetConfig
from rollout.errors import FleetError
from rollout.fleet.base import FleetBackend, FleetState, pool_token
from rollout.fleet.health import wait_healthy
from rollout.fleet.sandbox_security import sandbox_host_config

__all__ = ["DockerFleet", "list_containers", "reap"]

LABEL_POOL = "envfleet.pool"
LABEL_OWNER = "envfleet.owner"
LABEL_USER = "envfleet.user"
LABEL_EXPIRES = "envfleet.expires"
ISOLATED_NETWORK = "envfleet-isolated"
SERVER_PORT = 8000
_PORT_KEY = f"{SERVER_PORT}/tcp"
# Probes of a starting container back off from 20 ms to 250 ms: at K=64, fixed
# 50 ms HTTP polls cost the client ~4 CPU-s, taken from the starting servers.
_INSPECT_INTERVAL = 5.0  # seconds between state checks, in case a "die" event was missed
_DAEMON_GRACE = 10.0  # seconds past the start deadline before a hung daemon call is given up
_EVENTS_READY_WAIT = 2.0  # seconds to wait for the events stream before creating containers
_KILL_GRACE = 10  # seconds between the lifetime's SIGTERM and SIGKILL


def owner_id() -> str:
    """The ``envfleet.owner`` label value of this process: ``<pid>@<host>``."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid, e.g. in a container
        return str(os.getuid())


def parse_memory(text: str) -> int:
    """Bytes of a Docker-style memory size: ``"512m"``, ``"1g"``, ``"65536"``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmg]?)b?\s*", text.lower())
    if match is None:
        raise FleetError(f"bad memory size {text!r}; use e.g. 512m or 2g")
    scale = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]
    return int(float(match.group(1)) * scale)


async def _connect() -> aiodocker.Docker:
    """A client of the local Docker daemon, checked to answer; FleetError if it does not."""
    try:
        docker = aiodocker.Docker()
    except (AssertionError, ValueError) as exc:  # aiodocker asserts when no socket is found
        raise FleetError("no Docker daemon: no socket found and DOCKER_HOST is not set") from exc
    try:
        await docker.version()
    except BaseException as exc:  # cancelled included: never leak the client's session
        await docker.close()
        if isinstance(exc, (aiodocker.DockerError, aiohttp.ClientError, OSError)):
            raise FleetError(f"the Docker daemon at {docker.docker_host} does not answer: {exc}") from exc
        raise
    return docker


async def inspect_image(docker: aiodocker.Docker, image: str, where: str = "") -> dict[str, Any]:
    """The local image's details; FleetError if it is missing (envfleet never pulls) or cannot be read."""
    try:
        info: dict[str, Any] = await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise FleetError(
                f"image {image!r} is not present locally and envfleet never pulls; build it with `rollout image build`{where}"
            ) from exc
        raise FleetError(f"cannot inspect image {image!r}: {exc.message}") from exc
    return info


def ownership_labels(pool_id: str, expires_at: float) -> dict[str, str]:
    """The labels that say whose a container or service is and when anyone may remove it."""
    return {LABEL_POOL: pool_id, LABEL_OWNER: owner_id(), LABEL_USER: _user(), LABEL_EXPIRES: str(int(expires_at))}


def lapsed(labels: dict[str, str], now: float, host: str) -> tuple[float, bool, bool]:
    """From ownership labels: the expiry time, whether it has passed, and whether the owner on ``host`` is gone."""
    try:
        expires = float(labels.get(LABEL_EXPIRES, "0"))
    except ValueError:
        expires = 0.0
    pid, _, owner_host = labels.get(LABEL_OWNER, "").partition("@")
    orphaned = owner_host == host and pid.isdigit() and not _alive(int(pid))
    return expires, expires <= now, orphaned


async def _remove(docker: aiodocker.Docker, container_id: str) -> None:
    """Force-remove a container; one that is already gone or going counts as removed."""
    try:
        await docker.containers.container(container_id).delete(force=True)
    except aiodocker.DockerError as exc:
        if exc.status not in (404, 409):  # 409: removal already in progress
            raise FleetError(f"cannot remove container {container_id[:12]}: {exc.message}") from exc


class DockerFleet(FleetBackend):
    """``config.servers`` envservers (default 2), one per hardened container of ``config.image``."""

    def __init__(self, config: FleetConfig, *, pool_id: str | None = None, network: str = "published") -> None:
        if network not in ("published", "isolated"):
            raise FleetError(f"unknown network mode {network!r}; use 'published' or 'isolated'")
        self.config = config
        self.network = network
        self.pool_id = pool_id or secrets.token_hex(6)
        #: Bearer token the servers require; random unless the config names one.
        self.token: str = pool_token(config)
        self._state = FleetState.NEW
        self._docker: aiodocker.Docker | None = None
        self._http: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._creating: asyncio.Semaphore | None = None
        self._serial = itertools.count()
        self._ids: dict[str, str] = {}  # url -> container id
        self._names: dict[str, str] = {}  # url -> container name
        self._exit_codes: dict[str, int] = {}  # container id -> exit code, from "die" events
        self._removing: set[str] = set()  # container ids removed on purpose
        self._dead: asyncio.Queue[str] = asyncio.Queue()
        self._creates: set[asyncio.Future[Any]] = set()  # create calls the daemon may still be running

    # -- FleetBackend ---------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return list(self._ids)

    def describe(self, url: str) -> str:
        name = self._names.get(url)
        return f"container {name} ({url})" if name else url

    async def start(self) -> list[str]:
        if self._state is not FleetState.NEW:
            raise FleetError(f"this DockerFleet was already {self._state.value}; make a new one")
        self._state = FleetState.STARTED
        async with self._stopped_if_start_fails():
            self._docker = await _connect()
            await reap(expired_only=True, docker=self._docker)
            await inspect_image(self._docker, self.config.image)
            if self.network == "isolated":
                await _ensure_isolated_network(self._docker)
            self._http = aiohttp.ClientSession()
            self._creating = asyncio.Semaphore(max(1, self.config.max_creating))
            self._watch_events()
            await self._events_ready()
            count = self.config.servers if self.config.servers is not None else 2
            deadline = time.monotonic() + self.config.start_timeout
            results = await asyncio.gather(
                *(self._start_one(deadline) for _ in range(count)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise _first_error(errors, count)
        return self.urls

    async def replace(self, url: str) -> str:
        if self._state is not FleetState.STARTED or self._docker is None:
            raise FleetError(f"cannot replace {url}: the fleet is {self._state.value}")
        container_id = self._ids.pop(url, None)
        self._names.pop(url, None)
        if container_id is not None:
            self._removing.add(container_id)
            await _remove(self._docker, container_id)
        return await self._start_one(time.monotonic() + self.config.start_timeout)

    async def stop(self) -> None:
        self._state = FleetState.STOPPED
        docker, self._docker = self._docker, None
        if docker is None:
            return
        try:
            self._removing.update(self._ids.values())
            self._ids.clear()
            self._names.clear()
            if self._creates:  # interrupted creations: let them land, then sweep them too
                await asyncio.wait(self._creates, timeout=_DAEMON_GRACE)
            await self._remove_pool(docker)
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)
                self._watcher = None
            if self._http is not None:
                await self._http.close()
                self._http = None
            await docker.close()

    async def wait_dead(self) -> str:
        """Wait until a server of this fleet dies on its own; return its URL.

        A container removed by ``replace()`` or ``stop()`` does not count.
        """
        while True:
            url = await self._dead.get()
            if url in self._ids:
                return url

    # -- internals ------------------------------------------------------------

    def _container_config(self) -> dict[str, Any]:
        cfg = self.config
        memory = parse_memory(cfg.memory)
        lifetime = max(1, int(cfg.lifetime))
        command = ["envserver", "--host", "0.0.0.0", "--port", str(SERVER_PORT), "--token-file", "-", *cfg.server_args()]
        return {
            "Image": cfg.image,
            "Cmd": ["timeout", "-k", str(_KILL_GRACE), str(lifetime), *command],
            "AttachStdin": True,
            "OpenStdin": True,
            "StdinOnce": True,  # stdin closes once the token is written
            "User": "65534:65534",
            "ExposedPorts": {_PORT_KEY: {}} if self.network == "published" else {},
            "Labels": ownership_labels(self.pool_id, time.time() + lifetime + _KILL_GRACE),
            # The Python sandbox needs user namespaces inside the container (rollout/fleet/sandbox_security.py).
            "HostConfig": sandbox_host_config(cfg.env, {
                **self._network_config(),
                "ReadonlyRootfs": True,
                "Tmpfs": {"/tmp": "rw,nosuid,nodev,noexec,size=64m"},
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "PidsLimit": cfg.pids_limit,
                "Memory": memory,
                "MemorySwap": memory,  # no swap on top of the limit
                "NanoCpus": int(cfg.cpus * 1e9),
                "RestartPolicy": {"Name": "no"},
                "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
            }),
        }

    def _network_config(self) -> dict[str, Any]:
        if self.network == "isolated":
            return {"NetworkMode": ISOLATED_NETWORK}
        return {"PortBindings": {_PORT_KEY: [{"HostIp": "127.0.0.1", "HostPort": ""}]}}

    def _url_of(self, name: str, info: dict[str, Any]) -> str:
        try:
            if self.network == "isolated":
                address = info["NetworkSettings"]["Networks"][ISOLATED_NETWORK]["IPAddress"]
                if not address:
                    raise KeyError(ISOLATED_NETWORK)
                return f"http://{address}:{SERVER_PORT}"
            port = info["NetworkSettings"]["Ports"][_PORT_KEY][0]["HostPort"]
        except (KeyError, IndexError, TypeError) as exc:
            raise FleetError(f"container {name} has no address (did it exit at once?)") from exc
        return f"http://127.0.0.1:{port}"

    async def _create(self, name: str) -> aiodocker.containers.DockerContainer:
        """Create a container; if cancelled, the call still completes, for stop() to sweep it up."""
        assert self._docker is not None
        call = asyncio.ensure_future(self._docker.containers.create(self._container_config(), name=name))
        self._creates.add(call)
        call.add_done_callback(self._creates.discard)
        return await asyncio.shield(call)

    async def _start_one(self, deadline: float) -> str:
        """Create, start and health-check one container; remove it again if any step fails."""
        assert self._docker is not None and self._creating is not None
        name = f"envfleet-{self.pool_id}-{next(self._serial)}"
        container: aiodocker.containers.DockerContainer | None = None
        try:
            # The health wait has its own deadline; this one also bounds hung daemon calls.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + _DAEMON_GRACE):
                async with self._creating:
                    try:
                        container = await self._create(name)
                        await self._start_with_token(container)
                        info = await container.show()
                    except aiodocker.DockerError as exc:
                        raise FleetError(f"cannot start container {name}: {exc.message}") from exc
                url = self._url_of(name, info)
                await self._wait_healthy(container, name, url, deadline)
        except TimeoutError as exc:
            if container is not None:
                self._removing.add(container.id)
                await _remove(self._docker, container.id)
            raise FleetError(
                f"container {name} was not up within {self.config.start_timeout:g} s: the Docker daemon did not answer"
            ) from exc
        except BaseException:
            if container is not None:
                self._removing.add(container.id)
                await _remove(self._docker, container.id)
            raise
        self._ids[url] = container.id
        self._names[url] = name
        return url

    async def _start_with_token(self, container: aiodocker.containers.DockerContainer) -> None:
        """Start the container and write the token as the first line of its standard input."""
        stream = container.attach(stdin=True)
        try:
            async with stream:  # attached before the start, so no byte of stdin is lost
                await container.start()
                await stream.write_in(self.token.encode() + b"\n")
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            raise FleetError(f"cannot hand the token to container {container.id[:12]}: {exc}") from exc

    async def _wait_healthy(
        self, container: aiodocker.containers.DockerContainer, name: str, url: str, deadline: float
    ) -> None:
        assert self._http is not None
        next_inspect = time.monotonic() + _INSPECT_INTERVAL

        async def dead() -> str | None:
            nonlocal next_inspect
            exit_code = self._exit_codes.get(container.id)  # from a "die" event
            if exit_code is None and time.monotonic() >= next_inspect:  # in case the event was missed
                next_inspect = time.monotonic() + _INSPECT_INTERVAL
                state = (await container.show())["State"]
                if not state["Running"]:
                    exit_code = state["ExitCode"]
            return None if exit_code is None else f"exited with code {exit_code}: {await _log_tail(container)}"

        try:
            await wait_healthy(self._http, url, deadline, token=self.token, dead=dead)
        except ConnectionError as exc:
            raise FleetError(f"container {name}: {exc}") from exc
        except TimeoutError as exc:
            raise FleetError(f"container {name} did not answer within {self.config.start_timeout:g} s: {exc}") from exc

    def _watch_events(self) -> None:
        """Follow this pool's "die" events: fail starting containers fast, report dead servers."""
        assert self._docker is not None
        filters = {"type": ["container"], "event": ["die"], "label": [f"{LABEL_POOL}={self.pool_id}"]}
        subscriber = self._docker.events.subscribe(filters=json.dumps(filters))  # type: ignore[no-untyped-call]
        self._watcher = asyncio.create_task(self._follow(subscriber, self._docker.events.task))

    async def _events_ready(self) -> None:
        """Wait (briefly) until the events stream is open, so no early "die" is missed."""
        assert self._docker is not None
        give_up = time.monotonic() + _EVENTS_READY_WAIT
        while self._docker.events.json_stream is None and time.monotonic() < give_up:
            await asyncio.sleep(0.005)

    async def _follow(self, subscriber: Any, stream: asyncio.Task[None] | None) -> None:
        try:
            while (event := await subscriber.get()) is not None:
                actor = event.get("Actor", {})
                container_id = actor.get("ID", "")
                self._exit_codes[container_id] = int(actor.get("Attributes", {}).get("exitCode", -1))
                if container_id in self._removing:
                    continue
                for url, known in self._ids.items():
                    if known == container_id:
                        self._dead.put_nowait(url)
        finally:
            if stream is not None:
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)

    async def _remove_pool(self, docker: aiodocker.Docker) -> None:
        """Remove every container labelled with this pool, including half-created ones."""
        filters = json.dumps({"label": [f"{LABEL_POOL}={self.pool_id}"]})
        try:
            found = await docker.containers.list(all="1", filters=filters)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise FleetError(f"cannot list the containers of pool {self.pool_id}: {exc}") from exc
        self._removing.update(c.id for c in found)
        results = await asyncio.gather(*(_remove(docker, c.id) for c in found), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise FleetError(f"{len(errors)} container(s) of pool {self.pool_id} not removed: {errors[0]}")


async def _ensure_isolated_network(docker: aiodocker.Docker) -> None:
    """Create the internal, no-inter-container-traffic network once; it is shared and kept."""
    try:
        await docker.networks.get(ISOLATED_NETWORK)
        return
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise FleetError(f"cannot inspect network {ISOLATED_NETWORK}: {exc.message}") from exc
    config = {
        "Name": ISOLATED_NETWORK,
        "Driver": "bridge",
        "Internal": True,
        "CheckDuplicate": True,
        "Options": {"com.docker.network.bridge.enable_icc": "false"},
        "Labels": {"envfleet.network": "isolated"},
    }
    try:
        await docker.networks.create(config)
    except aiodocker.DockerError as exc:
        if exc.status != 409:  # 409: another pool created it meanwhile
            raise FleetError(f"cannot create network {ISOLATED_NETWORK}: {exc.message}") from exc


def _first_error(errors: list[BaseException], count: int) -> BaseException:
    first = next((e for e in errors if isinstance(e, FleetError)), errors[0])
    if not isinstance(first, FleetError):
        return first
    more = f" ({len(errors)} of {count} containers failed)" if len(errors) > 1 else ""
    return FleetError(f"{first}{more}")


async def _log_tail(container: aiodocker.containers.DockerContainer, lines: int = 5) -> str:
    try:
        out = await container.log(stdout=True, stderr=True, tail=lines)
    except aiodocker.DockerError as exc:
        return f"(no logs: {exc.message})"
    text = " | ".join(line.strip() for line in "".join(out).splitlines() if line.strip())
    return text or "(no output)"


def _describe(raw: dict[str, Any], now: float, host: str) -> dict[str, Any]:
    labels = raw.get("Labels") or {}
    expires, expired, orphaned = lapsed(labels, now, host)
    url = None
    for port in raw.get("Ports") or ():
        if port.get("PrivatePort") == SERVER_PORT and port.get("PublicPort"):
            url = f"http://{port.get('IP') or '127.0.0.1'}:{port['PublicPort']}"
            break
    isolated = ((raw.get("NetworkSettings") or {}).get("Networks") or {}).get(ISOLATED_NETWORK)
    if url is None and isolated and isolated.get("IPAddress"):
        url = f"http://{isolated['IPAddress']}:{SERVER_PORT}"
    return {
        "id": raw["Id"][:12],
        "name": (raw.get("Names") or ["?"])[0].lstrip("/"),
        "pool": labels.get(LABEL_POOL, ""),
        "owner": labels.get(LABEL_OWNER, ""),
        "user": labels.get(LABEL_USER, ""),
        "image": raw.get("Image", ""),
        "state": raw.get("State", ""),
        "status": raw.get("Status", ""),
        "url": url,
        "expires": expires,
        "expired": expired,
        "orphaned": orphaned,
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


async def _list(docker: aiodocker.Docker, all_users: bool) -> list[dict[str, Any]]:
    filters = json.dumps({"label": [LABEL_POOL]})
    try:
        found = await docker.containers.list(all="1", filters=filters)
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        raise FleetError(f"cannot list envfleet containers: {exc}") from exc
    now, host, user = time.time(), socket.gethostname(), _user()
    keys = ("Id", "Names", "Labels", "Image", "State", "Status", "Ports", "NetworkSettings")
    rows = [_describe({k: c[k] for k in keys if k in c}, now, host) for c in found]
    return [r for r in rows if all_users or r["user"] in (user, "")]


async def list_containers(*, all_users: bool = False) -> list[dict[str, Any]]:
    """Describe the envfleet containers on the local daemon (this user's unless ``all_users``).

    Each row has id, name, pool, owner, user, image, state, status, url,
    expires (unix time), expired and orphaned (its owner process is gone).
    """
    docker = await _connect()
    try:
        return await _list(docker, all_users)
    finally:
        await docker.close()


async def reap(*, expired_only: bool = True, docker: aiodocker.Docker | None = None) -> list[str]:
    """Remove leftover envfleet containers; return their names.

    With ``expired_only`` (the default), remove any user's containers past
    their ``envfleet.expires`` time and those whose owner process on this host
    is gone; otherwise remove all of this user's envfleet containers.
    """
    own = docker is None
    client = await _connect() if docker is None else docker
    try:
        rows = await _list(client, all_users=expired_only)
        doomed = [r for r in rows if not expired_only or r["expired"] or r["orphaned"]]
        await asyncio.gather(*(_remove(client, r["id"]) for r in doomed))
        return [r["name"] for r in doomed]
    finally:
        if own:
            await client.close()
