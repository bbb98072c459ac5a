"""Immutable configuration values for pools and fleets."""

from __future__ import annotations

import os
from typing import Any

import msgspec


class FleetConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how the environment servers of one pool run."""

    backend: str = "local"
    servers: int | None = None  # None: one per core (local), 2 (docker, swarm)
    env: str = "openspiel"
    env_options: dict[str, Any] = {}
    max_sessions: int | None = None  # per server; None: the server's default
    idle_ttl: float | None = None  # seconds before the servers free a session of a silent connection; None: their default
    max_frame_bytes: int | None = None  # the servers' frame limit, which clients then respect; None: the default (4 MiB)
    token: str | None = None  # bearer token the servers require; None: a fresh random one (local, docker, swarm), none (endpoints)
    start_timeout: float = 120.0  # seconds until every server must answer /health
    endpoints: tuple[str, ...] = ()  # backend "endpoints": URLs, or one DNS name as "dns://name:port"
    image: str = "envfleet:latest"  # backends "docker" and "swarm"
    memory: str = "512m"
    cpus: float = 1.0
    pids_limit: int = 256
    lifetime: float = 6 * 3600.0  # hard lifetime of a container, seconds
    max_creating: int = 8  # container creations in flight at once
    network: str | None = None  # docker: "published" (127.0.0.1 ports) or "isolated" (no route out); None: isolated for python_sandbox
    ray_address: str | None = None  # backend "ray": None (this job's or a local cluster), "auto", "host:port" or "ray://host:port"
    ray_cpus: float = 1.0  # backend "ray": num_cpus of each server actor
    ray_resources: dict[str, float] = {}  # backend "ray": custom resources of each server actor
    ray_placement_group: Any = None  # backend "ray": a ray.util.placement_group to place the actors in; None: SPREAD
    ray_detached: bool = False  # backend "ray": actors outlive the driver (then `rollout fleet reap --backend ray`)

    def docker_network(self) -> str:
        if self.network is not None:
            return self.network
        return "isolated" if self.env == "python_sandbox" else "published"

    def server_count(self) -> int:
        return self.servers if self.servers is not None else (os.cpu_count() or 1)

    def open_options(self) -> dict[str, Any]:
        """Options a pool sends in each ``open``: none where its backend configured the servers itself.

        Backends that start servers give ``env_options`` to them as operator settings (limits
        included); servers someone else runs (``endpoints``) only take per-session options.
        """
        return dict(self.env_options) if self.backend == "endpoints" else {}

    def server_args(self) -> list[str]:
        """Command-line arguments of ``envserver`` that select this fleet's environment (and its operator settings)."""
        args = ["--env", self.env]
        if self.env_options:
            args += ["--env-options", msgspec.json.encode(self.env_options).decode()]
        if self.max_sessions is not None:
            args += ["--max-sessions", str(self.max_sessions)]
        if self.idle_ttl is not None:
            args += ["--idle-ttl", repr(float(self.idle_ttl))]
        if self.max_frame_bytes is not None:
            args += ["--max-frame-bytes", str(self.max_frame_bytes)]
        return args
