"""Fleet backends: where a pool's environment servers run."""

from __future__ import annotations

from ..config import FleetConfig
from ..errors import FleetError
from .base import FleetBackend

BACKENDS = ("local", "endpoints", "docker", "swarm", "ray")


def make_backend(config: FleetConfig) -> FleetBackend:
    """The backend ``config.backend`` names, configured by ``config``."""
    if config.backend == "local":
        from .local import LocalFleet

        return LocalFleet(config)
    if config.backend == "endpoints":
        from .endpoints import EndpointsFleet

        return EndpointsFleet(config)
    if config.backend == "docker":
        from .docker import DockerFleet

        return DockerFleet(config, network=config.docker_network())
    if config.backend == "swarm":
        from .swarm import SwarmFleet

        return SwarmFleet(config)
    if config.backend == "ray":
        from .ray import RayFleet

        return RayFleet(config)
    raise FleetError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "FleetBackend", "make_backend"]
