"""The endpoints backend: given URLs, and a DNS name resolved to every address."""

from __future__ import annotations

import pytest

from rollout import EnvPool, FleetError
from rollout.fleet.endpoints import resolve
from rollout.fleet.local import LocalFleet


async def test_pool_over_given_urls(local_fleet: LocalFleet) -> None:
    async with EnvPool(n=6, game="catch", backend="endpoints", endpoints=tuple(local_fleet.urls), token=local_fleet.token) as pool:
        assert sorted(pool.servers) == sorted(local_fleet.urls)
        records = [r async for r in pool.run(lambda o: o.legal_actions[1], episodes=12, seed=0)]
        assert len(records) == 12 and all(r.length == 9 for r in records)
    # the pool does not stop servers it did not start
    async with EnvPool(n=1, game="catch", backend="endpoints", endpoints=(local_fleet.urls[0],), token=local_fleet.token) as pool:
        await pool.reset()


async def test_dns_name_resolves_to_its_addresses(local_fleet: LocalFleet) -> None:
    port = int(local_fleet.urls[0].rsplit(":", 1)[1])
    assert f"http://127.0.0.1:{port}" in await resolve("localhost", port)
    async with EnvPool(n=2, game="catch", backend="endpoints", endpoints=(f"dns://localhost:{port}",), token=local_fleet.token) as pool:
        assert pool.servers == [f"http://127.0.0.1:{port}"]  # ::1, if localhost has it, is not listening
        await pool.reset()


async def test_no_reachable_endpoint_is_a_fleet_error() -> None:
    with pytest.raises(FleetError, match="no endpoint answered"):
        async with EnvPool(n=1, backend="endpoints", endpoints=("http://127.0.0.1:1",), start_timeout=1.0):
            pass
    with pytest.raises(FleetError, match="cannot resolve"):  # an invalid name: fails locally, no DNS query is sent
        async with EnvPool(n=1, backend="endpoints", endpoints=("dns://bad..name:80",)):
            pass
