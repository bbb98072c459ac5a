"""Counters that can be trusted: bench and telemetry count real errors, latencies stay bounded."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from rollout import EnvCrashed, EnvPool
from rollout.bench import measure
from rollout.telemetry import LatencyHistogram, Telemetry, percentile


def test_the_histogram_quantiles_match_the_exact_ones_within_a_bucket() -> None:
    rng = random.Random(5)
    values = [rng.lognormvariate(-7, 1.5) for _ in range(50_000)]
    histogram = LatencyHistogram()
    for value in values:
        histogram.observe(value)
    ordered = sorted(values)
    for q in (0.01, 0.5, 0.9, 0.99, 1.0):
        assert histogram.percentile(q) == pytest.approx(percentile(ordered, q), rel=0.011)
    assert histogram.count == 50_000 and len(histogram.counts) < 1500  # bounded, whatever the run length
    later = histogram.copy()
    later.observe(2.0, n=3)
    assert (later - histogram).count == 3 and (later - histogram).percentile(0.5) == pytest.approx(2.0, rel=0.011)
    assert LatencyHistogram().percentile(0.5) != LatencyHistogram().percentile(0.5)  # NaN when empty


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.51) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.0) == 1.0 and percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0


@pytest.mark.parametrize("mode", ["per-env", "batched"])
async def test_bench_keep_going_counts_the_errors_of_a_killed_server(mode: str) -> None:
    telemetry = Telemetry("bench")
    async with EnvPool(n=8, game="catch", servers=2) as pool:
        telemetry.attach(pool)
        victim = pool.backend.pid(pool.servers[0])  # type: ignore[union-attr]
        asyncio.get_running_loop().call_later(1.0, os.kill, victim, signal.SIGKILL)
        async with asyncio.timeout(60):
            result = await measure(pool, mode, 3.0, warmup=0.2, telemetry=telemetry, keep_going=True)
        assert result.errors > 0 and result.errors_by_class.get("EnvCrashed", 0) > 0
        assert sum(result.errors_by_class.values()) == result.errors and result.timeouts == 0
        assert result.steps > 0 and result.latency_p50_ms > 0
        assert telemetry.totals().errors >= result.errors  # the dashboard's client error count


async def test_bench_without_keep_going_stops_at_the_first_error() -> None:
    async with EnvPool(n=4, game="catch", servers=1) as pool:
        victim = pool.backend.pid(pool.servers[0])  # type: ignore[union-attr]
        asyncio.get_running_loop().call_later(0.5, os.kill, victim, signal.SIGKILL)
        async with asyncio.timeout(30):
            with pytest.raises(EnvCrashed):
                await measure(pool, "per-env", 3.0, warmup=0.1)
