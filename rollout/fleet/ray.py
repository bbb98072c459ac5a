"""Fleet backend that runs each envserver as the child of one Ray actor, on the cluster RL training uses.

Ray does placement, life cycle and failure detection; the data path stays the pool's own
``/v1/mux`` WebSocket to each server, never Ray's object store.

- **Connection.** ``ray_address`` None: this process's Ray connection if it has one (a trainer's
  job), else a running cluster found the way ``ray.init()`` finds one, else a local cluster
  started here (stopped by the last pool that uses it). ``"auto"`` or ``"host:port"`` or
  ``"ray://host:port"``: that cluster; it is probed with a TCP connect first so that a wrong
  address is a ``FleetError`` within ``start_timeout``, not a hang.
- **Actors.** ``envfleet-<pool id>-<i>`` in the namespace ``envfleet``, ``num_cpus=ray_cpus``
  (default 1) plus ``ray_resources``, placed by ``SPREAD`` or in ``ray_placement_group``;
  owned by the driver (they die with its job) unless ``ray_detached``.
- **Servers.** The actor starts ``envserver`` bound to its node's IP on port 0 (other nodes
  must reach it) and hands it the pool's random token on its standard input
  (``--token-file -``), never in argv or the environment. The child dies with its actor
  (``PR_SET_PDEATHSIG``) and with its standard input, so a killed actor closes the pool's
  connection at once and the pool replaces it.
- **Leftovers.** ``list_actors`` / ``reap`` find the ``envfleet`` actors of a cluster and remove
  those whose driver is gone (``rollout fleet ls|reap --backend ray``).

Ray is optional (``pip install 'envfleet[ray]'``); it is imported only when this backend runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..config import FleetConfig
from ..errors import FleetError
from .base import FleetBackend, pool_token
from .health import wait_healthy

__all__ = ["NAMESPACE", "RayFleet", "import_ray", "list_actors", "reap"]

NAMESPACE = "envfleet"
ACTOR_PREFIX = "envfleet-"
INSTALL_HINT = "pip install 'envfleet[ray]'"
_DEFAULT_GCS_PORT = 6379
_DEFAULT_CLIENT_PORT = 10001
_KILL_GRACE = 3.0  # seconds the actor gets to stop its server (it waits 2 s) before ray.kill


def import_ray() -> ModuleType:
    """The ``ray`` module, or ``FleetError`` naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise FleetError(f"the ray backend needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


# --------------------------------------------------------------------------- the connection


class _Connection:
    """This process's Ray connection, shared by pools; shut down by the last user if a pool opened it."""

    lock = threading.Lock()
    users = 0
    owned = False


def _probe(address: str, timeout: float) -> None:
    """Raise ``FleetError`` unless a TCP connection to the Ray ``address`` opens within ``timeout``."""
    if address == "auto":
        return
    client = address.startswith("ray://")
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or (_DEFAULT_CLIENT_PORT if client else _DEFAULT_GCS_PORT)
    except ValueError as exc:
        raise FleetError(f"ray_address {address!r} is not host:port, ray://host:port or 'auto'") from exc
    if not host:
        raise FleetError(f"ray_address {address!r} is not host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise FleetError(f"cannot reach the Ray cluster at {address} ({host}:{port}): {exc}") from exc


def _connect(address: str | None, cpus_wanted: float, timeout: float) -> None:
    """Join (or start) the cluster; count this user. Blocking: call in a thread."""
    ray = import_ray()
    if address is not None:
        _probe(address, timeout)
    with _Connection.lock:
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if address not in (None, "auto") and not address.startswith("ray://") and address != current:
                raise FleetError(f"this process is already connected to the Ray cluster at {current}, not {address}")
        else:
            kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "configure_logging": False}
            try:
                try:
                    ray.init(address=address or "auto", **kwargs)
                except ConnectionError:
                    if address is not None:
                        raise
                    # No cluster anywhere: start the embedded one, with room for this pool's servers
                    # (envservers are light; the local backend also starts as many as asked).
                    cpus = max(os.cpu_count() or 1, int(cpus_wanted + 0.999))
                    ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure of ray.init means: no cluster
                raise FleetError(f"cannot connect to Ray at {address or 'a local cluster'}: {exc}") from exc
            _Connection.owned = True
        _Connection.users += 1


def _disconnect() -> None:
    """Count this user out; shut Ray down if a pool started it and none uses it any more."""
    ray = import_ray()
    with _Connection.lock:
        _Connection.users = max(0, _Connection.users - 1)
        if _Connection.users == 0 and _Connection.owned:
            _Connection.owned = False
            ray.shutdown()


@contextlib.contextmanager
def _connected(address: str | None, timeout: float = 10.0) -> Iterator[ModuleType]:
    """The ``ray`` module, connected for the duration (for the ls/reap commands)."""
    _connect(address, 0, timeout)
    try:
        yield import_ray()
    finally:
        _disconnect()


# --------------------------------------------------------------------------- the actor


_remote_class: Any = None


def _actor_class() -> Any:
    """``EnvServerActor`` as a Ray actor class, shipped by value: its workers never import ``rollout``."""
    global _remote_class
    if _remote_class is None:
        ray = import_ray()
        from ray import cloudpickle

        from . import ray_actor

        cloudpickle.register_pickle_by_value(ray_actor)
        _remote_class = ray.remote(max_restarts=0)(ray_actor.EnvServerActor)  # one thread: the PDEATHSIG follows it
    return _remote_class


# --------------------------------------------------------------------------- the backend


class _Server:
    __slots__ = ("index", "name", "actor", "url", "node", "pid")

    def __init__(self, index: int, name: str, actor: Any) -> None:
        self.index, self.name, self.actor = index, name, actor
        self.url = self.node = ""
        self.pid = 0


class RayFleet(FleetBackend):
    """``config.servers`` envservers, each the child of one Ray actor on the cluster."""

    def __init__(self, config: FleetConfig, *, pool_id: str | None = None) -> None:
        self.config = config
        self.pool_id = pool_id or secrets.token_hex(6)
        #: Always set: the servers listen on their node's IP, reachable from the cluster network.
        self.token: str = pool_token(config)
        self._ray: ModuleType | None = None
        self._connected = False
        self._servers: dict[str, _Server] = {}
        self._starting: set[_Server] = set()
        self._next_index = 0

    @property
    def urls(self) -> list[str]:
        return list(self._servers)

    def describe(self, url: str) -> str:
        server = self._servers.get(url)
        if server is None:
            return url
        return f"ray actor {server.name} on {server.node} (server pid {server.pid}, {url})"

    def actor(self, url: str) -> Any:
        """The Ray actor handle serving ``url``."""
        return self._servers[url].actor

    def pid(self, url: str) -> int:
        """The process id of the server at ``url`` on its node."""
        return self._servers[url].pid

    async def start(self) -> list[str]:
        _check_resources(self.config)
        self._ray = import_ray()
        count = self.config.server_count()
        async with self._stopped_if_start_fails():
            await asyncio.wait_for(
                asyncio.to_thread(_connect, self.config.ray_address, count * self.config.ray_cpus, self.config.start_timeout),
                self.config.start_timeout,
            )
            self._connected = True
            # every spawn runs to its end (each is bounded by start_timeout), so none registers an actor after stop()
            results = await asyncio.gather(*(self._spawn() for _ in range(count)), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return self.urls

    async def replace(self, url: str) -> str:
        server = self._servers.pop(url, None)
        if server is not None:
            await self._kill(server)
        return await self._spawn()

    async def stop(self) -> None:
        servers = list(self._servers.values()) + list(self._starting)
        self._servers, self._starting = {}, set()
        try:
            await asyncio.gather(*(self._kill(s) for s in servers))
        finally:
            if self._connected:
                self._connected = False
                await asyncio.to_thread(_disconnect)

    # -- one server

    def _options(self, name: str) -> dict[str, Any]:
        config = self.config
        options: dict[str, Any] = {
            "name": name, "namespace": NAMESPACE, "num_cpus": config.ray_cpus, "resources": dict(config.ray_resources),
            "lifetime": "detached" if config.ray_detached else None,
        }
        if config.ray_placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(config.ray_placement_group)
        else:
            options["scheduling_strategy"] = "SPREAD"
        return options

    async def _spawn(self) -> str:
        assert self._ray is not None, "start() first"
        index, self._next_index = self._next_index, self._next_index + 1
        name = f"{ACTOR_PREFIX}{self.pool_id}-{index}"
        deadline = time.monotonic() + self.config.start_timeout
        try:
            actor = _actor_class().options(**self._options(name)).remote(self.pool_id, index)
        except (ValueError, TypeError) as exc:  # bad resources or placement group
            raise FleetError(f"ray actor {name}: {exc}") from exc
        server = _Server(index, name, actor)
        self._starting.add(server)
        try:
            remaining = max(0.1, deadline - time.monotonic())
            server_timeout = max(0.1, remaining - 1.0)  # the actor's own error, if its server fails, comes first
            server.url = await asyncio.wait_for(
                _ray_call(actor.start, self.config.server_args(), self.token, server_timeout, self._ray.util.get_node_ip_address()), remaining
            )
            server.pid = await asyncio.wait_for(_ray_call(actor.pid), max(0.1, deadline - time.monotonic()))
            server.node = urlsplit(server.url).hostname or ""
            async with aiohttp.ClientSession() as http:
                await wait_healthy(http, server.url, deadline, token=self.token)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            self._starting.discard(server)
            await self._kill(server)
            reason = "its server did not become healthy" if server.url else await asyncio.to_thread(self._unplaced_reason)
            message = f"ray actor {name} not ready within {self.config.start_timeout:g} s: {reason}"
            raise FleetError(message, server=server.url or None) from exc
        except (self._ray.exceptions.RayError, ConnectionError, OSError) as exc:
            self._starting.discard(server)
            await self._kill(server)
            raise FleetError(f"ray actor {name} failed to start its server: {_root_cause(exc)}", server=server.url or None) from exc
        except BaseException:
            self._starting.discard(server)
            await self._kill(server)
            raise
        self._starting.discard(server)
        self._servers[server.url] = server
        return server.url

    def _unplaced_reason(self) -> str:
        """Why an actor may not have been placed: what it asks for against what the nodes have."""
        assert self._ray is not None
        wanted = {"CPU": self.config.ray_cpus, **self.config.ray_resources}
        group = self.config.ray_placement_group
        if group is not None:
            return f"it asks for {_format(wanted)} in placement group {group.id.hex()}, which has no bundle with room left"
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        if not any(all(res.get(k, 0.0) >= v for k, v in wanted.items()) for res in nodes):
            offered = "; ".join(", ".join(f"{k}={v:g}" for k, v in sorted(r.items()) if not k.startswith("node:")) for r in nodes)
            return f"no node of the cluster has the resources it asks for ({_format(wanted)}); the nodes have: {offered or 'none'}"
        free = self._ray.available_resources()
        return f"it asks for {_format(wanted)} and the cluster has {_format({k: free.get(k, 0.0) for k in wanted})} free"

    async def _kill(self, server: _Server) -> None:
        """Ask the actor to stop its server, then kill the actor (its server dies with it anyway)."""
        assert self._ray is not None
        with contextlib.suppress(self._ray.exceptions.RayError, asyncio.TimeoutError, TimeoutError):
            if server.url:
                await asyncio.wait_for(_ray_call(server.actor.stop), _KILL_GRACE)
        with contextlib.suppress(self._ray.exceptions.RayError, ValueError):
            await asyncio.to_thread(self._ray.kill, server.actor, no_restart=True)


def _check_resources(config: FleetConfig) -> None:
    """``FleetError`` unless ``ray_cpus`` and ``ray_resources`` are non-negative numbers (Ray's own errors are cryptic)."""
    requests = {"ray_cpus": config.ray_cpus, **{f"ray_resources[{k!r}]": v for k, v in dict(config.ray_resources).items()}}
    for name, value in requests.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise FleetError(f"{name} must be a non-negative number, not {value!r}")
    for key in config.ray_resources:
        if not isinstance(key, str) or key in ("CPU", "GPU"):
            raise FleetError(f"ray_resources: {key!r} is not a custom resource name (CPUs are ray_cpus)")


async def _ray_call(method: Any, *args: Any) -> Any:
    """Await one actor method call."""
    return await method.remote(*args)


def _format(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in resources.items())


def _root_cause(exc: BaseException) -> str:
    """The first line of the error the actor raised, without Ray's wrapping."""
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


# --------------------------------------------------------------------------- leftovers


def list_actors(address: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every envfleet server actor of the cluster at ``address``, with its pool, node, URL and whether its driver is gone."""
    with _connected(address, timeout) as ray:
        return _list(ray, timeout)


def reap(address: str | None = None, *, everything: bool = False, timeout: float = 5.0) -> list[str]:
    """Kill the envfleet actors whose driver is gone (``everything``: all of them); return their names."""
    with _connected(address, timeout) as ray:
        removed = []
        for row in _list(ray, timeout, jobs=not everything):
            if everything or row["orphaned"]:
                with contextlib.suppress(ValueError, ray.exceptions.RayError):
                    ray.kill(ray.get_actor(row["name"], namespace=NAMESPACE), no_restart=True)
                    removed.append(row["name"])
        return removed


def _list(ray: ModuleType, timeout: float, *, jobs: bool = True) -> list[dict[str, Any]]:
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a.get("namespace") == NAMESPACE and a.get("name", "").startswith(ACTOR_PREFIX))
    live = _live_jobs() if jobs else set()
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "pool": name[len(ACTOR_PREFIX):].rpartition("-")[0]}
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            row.update(ray.get(actor.describe.remote(), timeout=timeout))
            row["state"] = "alive"
        except (ValueError, ray.exceptions.RayError) as exc:  # gone meanwhile, dead, or still pending
            row["state"] = "unreachable"
            row["error"] = type(exc).__name__
        row["orphaned"] = row.get("job") not in live if jobs else None
        rows.append(row)
    return rows


def _live_jobs() -> set[str]:
    """Hex ids of the cluster's live jobs (drivers).

    Read from the GCS through ``ray._private.state``: the public state API (``ray.util.state``)
    needs the dashboard, which plain ``ray`` (without ``[default]``) does not run.
    """
    try:
        from ray._private import state

        return {job["JobID"] for job in state.jobs() if not job.get("IsDead")}
    except (ImportError, AttributeError, KeyError) as exc:  # a private API: say so if a Ray release moves it
        raise FleetError(f"cannot read the cluster's jobs from this Ray version ({exc!r}); `reap --all` still works") from exc
