"""Fleet backend that runs the envservers as the replicas of one Docker Swarm service.

The pool talks to a swarm *manager* (the local daemon, or ``DOCKER_HOST``); the
swarm itself is the operator's: this backend never inits, joins or leaves one,
and refuses to run on a node that is not a manager.

One service ``envfleet-<pool id>`` with ``config.servers`` replicas (default 2):

- **Published in host mode** on an ephemeral port of the node that runs each
  task (no routing mesh: it needs IPVS). Swarm has no host-IP option, so the
  port is bound on **all interfaces** of that node. Every pool therefore sets a
  random bearer token, even when the config names none. It reaches the tasks as a
  swarm secret ``envfleet-<pool id>-token``, a file under ``/run/secrets`` that
  the server reads (``--token-file``): not an environment variable or argument,
  which ``docker inspect`` and code inside the task could read. The secret is
  removed with the service.
- **Never pulled, never resolved.** The service is created through the Engine
  API without a registry-auth header, so the daemon does not pin the tag to a
  registry digest, and the task image is the local image's *ID*, which the swarm
  agent never tries to pull. Other nodes need the same image, e.g. by
  ``docker save | docker load`` (which keeps the ID).
- **Hardened** as far as swarm allows: non-root, read-only root fs with a tmpfs
  ``/tmp``, all capabilities dropped, pids/memory/CPU limits. Swarm services
  cannot set no-new-privileges nor a seccomp profile; the docker backend does.
  So the Python sandbox has no namespaces in a swarm container, and each of its
  servers holds one session unless ``max_sessions`` is set
  (``rollout/fleet/sandbox_security.py``).
- **Labelled** like the docker backend's containers (``envfleet.pool``,
  ``envfleet.owner``, ``envfleet.user``, ``envfleet.expires``) on the service
  and on each task container; ``reap_services`` removes expired and orphaned
  services, and every swarm pool start runs it.

The swarm replaces a task that dies; ``replace(url)`` waits for the new task,
health-checks it and returns its URL. After a scale-down (``scale``), no new
task comes, and ``replace`` hands out a surviving replica instead, so the pool
keeps every session.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import socket
import time
from typing import Any

import aiodocker
import aiohttp

from rollout.config import FleetConfig
from rollout.errors import FleetError
from rollout.fleet.base import FleetBackend, FleetState, pool_token
from rollout.fleet.docker import (
    LABEL_POOL,
    LABEL_USER,
    SERVER_PORT,
    _connect,
    _log_tail,
    _remove,
    _user,
    inspect_image,
    lapsed,
    ownership_labels,
    parse_memory,
)
from rollout.fleet.health import wait_healthy
from rollout.fleet.sandbox_security import swarm_session_args

__all__ = ["SwarmFleet", "check_manager", "reap_services"]

_POLL = 0.25  # seconds between task listings while waiting for tasks
_PROBE_SLICE = 2.0  # seconds one health probe of a candidate task may take in replace()
_SETTLED_POLLS = 3  # polls in a row without a new task before replace() shares a survivor
_STOP_WAIT = 60.0  # seconds stop() waits for the service's containers to go
_STOP_GRACE_NS = 5_000_000_000  # SIGTERM -> SIGKILL of a task container
_RESTART_DELAY_NS = 200_000_000  # delay before the swarm restarts a dead task
TOKEN_FILE = "/run/secrets/envfleet-token"  # where a task finds the pool's token


async def check_manager(docker: aiodocker.Docker) -> dict[str, Any]:
    """The daemon's swarm info; ``FleetError`` unless this node is an active swarm manager."""
    try:
        info = await docker.system.info()
    except aiodocker.DockerError as exc:
        raise FleetError(f"cannot read the Docker daemon's info: {exc.message}") from exc
    swarm = info.get("Swarm") or {}
    state = swarm.get("LocalNodeState", "inactive")
    if state != "active":
        raise FleetError(
            f"the Docker daemon at {docker.docker_host} is not part of a swarm (state {state!r}); "
            "the swarm backend needs a swarm manager: run `docker swarm init` (or point DOCKER_HOST at a manager)"
        )
    if not swarm.get("ControlAvailable"):
        raise FleetError(
            f"the Docker daemon at {docker.docker_host} is a swarm worker, not a manager; "
            "point DOCKER_HOST at a manager node"
        )
    return dict(swarm)


class SwarmFleet(FleetBackend):
    """``config.servers`` envservers (default 2): the replicas of one swarm service of ``config.image``."""

    def __init__(self, config: FleetConfig, *, pool_id: str | None = None) -> None:
        self.config = config
        self.pool_id = pool_id or secrets.token_hex(6)
        self.service_name = f"envfleet-{self.pool_id}"
        #: Bearer token the servers require; always set, as swarm publishes on every interface.
        self.token: str = pool_token(config)
        self.secret_name = f"envfleet-{self.pool_id}-token"
        self._secret_id: str | None = None
        self._state = FleetState.NEW
        self._docker: aiodocker.Docker | None = None
        self._http: aiohttp.ClientSession | None = None
        self._service_id: str | None = None
        self._local_node = ""
        self._node_addrs: dict[str, str] = {}
        self._tasks: dict[str, dict[str, Any]] = {}  # url -> {"task", "container", "slot"} of healthy tasks
        self._users: collections.Counter[str] = collections.Counter()  # url -> pool slots using it
        self._gone: set[str] = set()  # task ids replaced: never handed out again

    # -- FleetBackend ---------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return list(self._users)

    def describe(self, url: str) -> str:
        task = self._tasks.get(url)
        if task is None:
            return url
        return f"swarm task {self.service_name}.{task['slot']} ({url})"

    async def start(self) -> list[str]:
        if self._state is not FleetState.NEW:
            raise FleetError(f"this SwarmFleet was already {self._state.value}; make a new one")
        self._state = FleetState.STARTED
        async with self._stopped_if_start_fails():
            self._docker = await _connect()
            swarm = await check_manager(self._docker)
            self._local_node = swarm.get("NodeID", "")
            await reap_services(docker=self._docker)
            image = await self._image_id()
            self._http = aiohttp.ClientSession()
            count = self.config.servers if self.config.servers is not None else 2
            await self._create_secret()
            await self._create_service(image, count)
            await self._wait_started(count, time.monotonic() + self.config.start_timeout)
        return self.urls

    async def replace(self, url: str) -> str:
        """Return the URL of the task the swarm runs instead of ``url``'s (or a survivor after a scale-down)."""
        if self._state is not FleetState.STARTED or self._docker is None:
            raise FleetError(f"cannot replace {url}: the fleet is {self._state.value}")
        self._users[url] -= 1
        if self._users[url] <= 0:
            del self._users[url]
        old = self._tasks.get(url)
        if old is not None and url not in self._users:
            self._gone.add(old["task"])
            self._tasks.pop(url, None)
            # The connection broke; if the server lives on, kill it so the swarm starts a fresh one.
            await _remove(self._docker, old["container"])
        deadline = time.monotonic() + self.config.start_timeout
        settled = 0  # polls in a row that showed no new task coming
        while True:
            tasks = await self._list_tasks()
            for task in tasks:
                candidate = task["url"]
                if task["id"] in self._gone or candidate is None or candidate in self._users:
                    continue
                if task["state"] != "running":
                    continue
                try:
                    await self._probe(candidate, min(deadline, time.monotonic() + _PROBE_SLICE))
                except TimeoutError:
                    continue
                if candidate in self._users or self._state is not FleetState.STARTED:
                    continue  # another replace() took it meanwhile
                return self._adopt(task)
            settled = 0 if self._more_coming(tasks) else settled + 1
            if self._users and settled >= _SETTLED_POLLS:
                survivor = min(self._users, key=lambda u: self._users[u])  # scaled down: share the least used
                self._users[survivor] += 1
                return survivor
            if time.monotonic() >= deadline:
                raise FleetError(
                    f"the swarm started no healthy task instead of {self.describe(url)} within "
                    f"{self.config.start_timeout:g} s{await self._failures_note()}",
                    server=url,
                )
            await asyncio.sleep(_POLL)

    async def stop(self) -> None:
        """Remove the service and wait (bounded) until its task containers are gone."""
        self._state = FleetState.STOPPED
        docker, self._docker = self._docker, None
        if docker is None:
            return
        try:
            self._users.clear()
            self._tasks.clear()
            await self._remove_service(docker)
            await _remove_secrets(docker, self.pool_id)
        finally:
            if self._http is not None:
                await self._http.close()
                self._http = None
            await docker.close()

    # -- extras -----------------------------------------------------------------

    async def scale(self, replicas: int) -> None:
        """Set the service's replica count (the pool keeps its sessions on the survivors)."""
        if self._state is not FleetState.STARTED or self._docker is None or self._service_id is None:
            raise FleetError(f"cannot scale: the fleet is {self._state.value}")
        if replicas < 1:
            raise FleetError("a swarm pool needs at least one replica")
        try:
            service = await self._docker.services.inspect(self._service_id)
            spec = service["Spec"]
            spec["Mode"] = {"Replicated": {"Replicas": replicas}}
            await self._docker._query_json(
                f"services/{self._service_id}/update",
                method="POST",
                data=json.dumps(spec),
                params={"version": str(service["Version"]["Index"])},
            )
        except aiodocker.DockerError as exc:
            raise FleetError(f"cannot scale service {self.service_name} to {replicas}: {exc.message}") from exc

    def containers(self) -> dict[str, str]:
        """Container id of each healthy task this fleet knows, by URL."""
        return {url: task["container"] for url, task in self._tasks.items()}

    # -- internals ------------------------------------------------------------

    async def _image_id(self) -> str:
        assert self._docker is not None
        info = await inspect_image(self._docker, self.config.image, " (and load it on every swarm node)")
        return str(info["Id"])

    def _labels(self) -> dict[str, str]:
        expires_at = time.time() + max(1.0, self.config.lifetime)
        return {**ownership_labels(self.pool_id, expires_at), "envfleet.image": self.config.image}

    def _task_template(self, image: str) -> dict[str, Any]:
        cfg = self.config
        memory = parse_memory(cfg.memory)
        return {
            "ContainerSpec": {
                "Image": image,
                "Command": [
                    "envserver", "--host", "0.0.0.0", "--port", str(SERVER_PORT), "--token-file", TOKEN_FILE, *cfg.server_args(),
                    *swarm_session_args(cfg.env, cfg.max_sessions),  # no namespaces here: a container per session
                ],  # fmt: skip
                "Secrets": [
                    {
                        "SecretID": self._secret_id,
                        "SecretName": self.secret_name,
                        "File": {"Name": TOKEN_FILE.rsplit("/", 1)[1], "UID": "65534", "GID": "65534", "Mode": 0o400},
                    }
                ],
                "User": "65534:65534",
                "ReadOnly": True,
                "Mounts": [{"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": 64 << 20}}],
                "CapabilityDrop": ["ALL"],
                "Labels": self._labels(),
                "StopGracePeriod": _STOP_GRACE_NS,
            },
            "Resources": {"Limits": {"NanoCPUs": int(cfg.cpus * 1e9), "MemoryBytes": memory, "Pids": cfg.pids_limit}},
            "RestartPolicy": {"Condition": "any", "Delay": _RESTART_DELAY_NS},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "1"}},
        }

    async def _create_secret(self) -> None:
        """Store the token as this pool's swarm secret (labelled like the service, for the reaper)."""
        assert self._docker is not None
        try:
            created = await self._docker.secrets.create(self.secret_name, self.token + "\n", labels=self._labels())
        except aiodocker.DockerError as exc:
            raise FleetError(f"cannot create secret {self.secret_name}: {exc.message}") from exc
        self._secret_id = str(created["ID"])

    async def _create_service(self, image: str, replicas: int) -> None:
        assert self._docker is not None
        try:
            # No `auth`: no X-Registry-Auth header, and API >= 1.30 never resolves the image server-side.
            created = await self._docker.services.create(
                self._task_template(image),
                name=self.service_name,
                labels=self._labels(),
                mode={"Replicated": {"Replicas": replicas}},
                endpoint_spec={"Ports": [{"Protocol": "tcp", "TargetPort": SERVER_PORT, "PublishMode": "host"}]},
            )
        except aiodocker.DockerError as exc:
            raise FleetError(f"cannot create service {self.service_name}: {exc.message}") from exc
        self._service_id = str(created["ID"])

    async def _node_addr(self, node_id: str) -> str:
        """Where a node's published ports are reached: loopback for this node, else its swarm address."""
        if node_id == self._local_node:
            return "127.0.0.1"
        if node_id not in self._node_addrs:
            assert self._docker is not None
            try:
                node = await self._docker.nodes.inspect(node_id=node_id)
            except aiodocker.DockerError as exc:
                raise FleetError(f"cannot inspect swarm node {node_id[:12]}: {exc.message}") from exc
            self._node_addrs[node_id] = (node.get("Status") or {}).get("Addr") or "127.0.0.1"
        return self._node_addrs[node_id]

    async def _list_tasks(self, all_states: bool = False) -> list[dict[str, Any]]:
        """This service's tasks (desired state running unless ``all_states``), with their URLs."""
        assert self._docker is not None
        filters: dict[str, list[str]] = {"service": [self.service_name]}
        if not all_states:
            filters["desired-state"] = ["running"]
        try:
            raw = await self._docker.tasks.list(filters=filters)
        except aiodocker.DockerError as exc:
            raise FleetError(f"cannot list the tasks of service {self.service_name}: {exc.message}") from exc
        tasks = []
        for task in raw:
            status = task.get("Status") or {}
            url = None
            for port in (status.get("PortStatus") or {}).get("Ports") or ():
                if port.get("TargetPort") == SERVER_PORT and port.get("PublishedPort"):
                    url = f"http://{await self._node_addr(task.get('NodeID', ''))}:{port['PublishedPort']}"
            tasks.append({
                "id": task["ID"],
                "slot": task.get("Slot", 0),
                "state": status.get("State", ""),
                "desired": task.get("DesiredState", ""),
                "error": status.get("Err") or "",
                "container": (status.get("ContainerStatus") or {}).get("ContainerID") or "",
                "url": url,
            })
        return sorted(tasks, key=lambda t: t["slot"])

    async def _probe(self, url: str, deadline: float) -> None:
        assert self._http is not None
        await wait_healthy(self._http, url, deadline, token=self.token)

    def _adopt(self, task: dict[str, Any]) -> str:
        url: str = task["url"]
        self._tasks[url] = {"task": task["id"], "container": task["container"], "slot": task["slot"]}
        self._users[url] += 1
        return url

    async def _wait_started(self, count: int, deadline: float) -> None:
        """Wait until ``count`` tasks run and answer /health; fail early when tasks keep failing."""
        probes: dict[str, asyncio.Task[None]] = {}
        try:
            while len(self._users) < count:
                tasks = await self._list_tasks(all_states=True)
                running = {t["id"]: t for t in tasks if t["state"] == "running" and t["url"] and t["desired"] == "running"}
                for task_id, task in running.items():
                    if task_id not in probes:
                        probes[task_id] = asyncio.create_task(self._probe(task["url"], deadline))
                for task_id, probe in list(probes.items()):
                    if task_id not in running:
                        probe.cancel()  # the task died while starting; the swarm starts another
                        del probes[task_id]
                    elif probe.done() and probe.exception() is None and running[task_id]["url"] not in self._users:
                        self._adopt(running[task_id])
                failed = [t for t in tasks if t["state"] in ("failed", "rejected")]
                if len(failed) >= max(3, count // 4):
                    raise FleetError(
                        f"service {self.service_name}: {len(failed)} tasks failed while starting "
                        f"{len(self._users)}/{count} healthy{await self._failures_note(failed)}"
                    )
                if time.monotonic() >= deadline:
                    raise FleetError(
                        f"service {self.service_name}: {len(self._users)} of {count} replicas answered /health "
                        f"within {self.config.start_timeout:g} s{await self._failures_note(failed)}"
                    )
                await asyncio.sleep(_POLL)
        finally:
            for probe in probes.values():
                probe.cancel()
            await asyncio.gather(*probes.values(), return_exceptions=True)

    async def _failures_note(self, failed: list[dict[str, Any]] | None = None) -> str:
        """``": <task error>: <log tail>"`` of the latest failed task, or nothing."""
        if failed is None:
            failed = [t for t in await self._list_tasks(all_states=True) if t["state"] in ("failed", "rejected")]
        if not failed:
            return ""
        last = failed[-1]
        logs = ""
        if last["container"] and self._docker is not None:
            logs = ": " + await _log_tail(self._docker.containers.container(last["container"]))
        return f"; last failure: {last['error'] or last['state']}{logs}"

    def _more_coming(self, tasks: list[dict[str, Any]]) -> bool:
        """Whether a task may yet come that no pool slot uses (if not, the service was scaled down).

        ``tasks`` are those the swarm wants running: one no slot uses is coming up, and a
        replaced one still among them means the swarm has not noticed its death yet.
        """
        in_use = {self._tasks[url]["task"] for url in self._users if url in self._tasks}
        return any(t["id"] not in in_use for t in tasks)

    async def _remove_service(self, docker: aiodocker.Docker) -> None:
        try:
            await docker.services.delete(self.service_name)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise FleetError(f"cannot remove service {self.service_name}: {exc.message}") from exc
        await _wait_containers_gone(docker, self.pool_id)


async def _wait_containers_gone(docker: aiodocker.Docker, pool_id: str) -> None:
    """Wait until no container of the pool exists; force-remove stragglers after ``_STOP_WAIT``."""
    filters = json.dumps({"label": [f"{LABEL_POOL}={pool_id}"]})
    give_up = time.monotonic() + _STOP_WAIT
    while True:
        try:
            found = await docker.containers.list(all="1", filters=filters)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise FleetError(f"cannot list the containers of pool {pool_id}: {exc}") from exc
        if not found:
            return
        if time.monotonic() >= give_up:
            await asyncio.gather(*(_remove(docker, c.id) for c in found))
            return
        await asyncio.sleep(_POLL)


async def _remove_secrets(docker: aiodocker.Docker, pool_id: str) -> None:
    """Remove the token secret(s) of a pool whose service is gone."""
    try:
        found = await docker.secrets.list(filters={"label": [f"{LABEL_POOL}={pool_id}"]})
        for secret in found:
            await docker.secrets.delete(secret["ID"])
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise FleetError(f"cannot remove the token secret of pool {pool_id}: {exc.message}") from exc


async def _reap_secrets(docker: aiodocker.Docker, expired_only: bool, now: float, host: str, user: str) -> None:
    """Remove token secrets left without their service (say, by a crash between the two creations)."""
    try:
        found = await docker.secrets.list(filters={"label": [LABEL_POOL]})
    except aiodocker.DockerError as exc:
        raise FleetError(f"cannot list envfleet secrets: {exc.message}") from exc
    for secret in found:
        labels = (secret.get("Spec") or {}).get("Labels") or {}
        _, expired, orphaned = lapsed(labels, now, host)
        if (expired or orphaned) if expired_only else labels.get(LABEL_USER, "") in (user, ""):
            try:
                await docker.secrets.delete(secret["ID"])
            except aiodocker.DockerError as exc:
                if exc.status not in (400, 404):  # 400: a live service still uses it
                    raise FleetError(f"cannot remove secret {secret['ID'][:12]}: {exc.message}") from exc


async def reap_services(*, expired_only: bool = True, docker: aiodocker.Docker | None = None) -> list[str]:
    """Remove leftover envfleet swarm services; return their names.

    With ``expired_only`` (the default), remove any user's services past their
    ``envfleet.expires`` time and those whose owner process on this host is
    gone; otherwise remove all of this user's envfleet services. Does nothing
    on a node that is not a swarm manager.
    """
    own = docker is None
    client = await _connect() if docker is None else docker
    try:
        try:
            await check_manager(client)
        except FleetError:
            return []
        try:
            services = await client.services.list(filters={"label": [LABEL_POOL]})
        except aiodocker.DockerError as exc:
            raise FleetError(f"cannot list envfleet services: {exc.message}") from exc
        now, host, user = time.time(), socket.gethostname(), _user()
        doomed = []
        for service in services:
            spec = service.get("Spec") or {}
            labels = spec.get("Labels") or {}
            _, expired, orphaned = lapsed(labels, now, host)
            mine = labels.get(LABEL_USER, "") in (user, "")
            if (expired or orphaned) if expired_only else mine:
                doomed.append((spec.get("Name", service["ID"]), labels.get(LABEL_POOL, "")))
        for name, pool_id in doomed:
            try:
                await client.services.delete(name)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise FleetError(f"cannot remove service {name}: {exc.message}") from exc
        await asyncio.gather(*(_wait_containers_gone(client, pool_id) for _, pool_id in doomed if pool_id))
        for _, pool_id in doomed:
            if pool_id:
                await _remove_secrets(client, pool_id)
        await _reap_secrets(client, expired_only, now, host, user)
        return [name for name, _ in doomed]
    finally:
        if own:
            await client.close()
