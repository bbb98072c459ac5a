"""Fixtures for client-side tests: real envservers started by the local fleet backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from rollout.config import FleetConfig
from rollout.fleet.local import LocalFleet


@pytest.fixture
async def local_fleet(request: pytest.FixtureRequest) -> AsyncIterator[LocalFleet]:
    """Two local servers (override with ``@pytest.mark.parametrize("local_fleet", [FleetConfig(...)], indirect=True)``)."""
    config = getattr(request, "param", None) or FleetConfig(servers=2, env_options={"game": "catch"})
    fleet = LocalFleet(config)
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def alive() -> Callable[[int], bool]:
    """Whether a pid is a live (not zombie) process."""
    return _alive
