"""Overload in CI: twice the servers' session capacity requested at once.

The full run (8,192 sessions against a cap of 4,096) is ``loadtests/overload.py``.
"""

from __future__ import annotations

import pytest

from loadtests.overload import run_overload


@pytest.mark.slow
async def test_excess_sessions_are_refused_promptly_and_admitted_ones_keep_going() -> None:
    report = await run_overload(servers=2, cap=256, requested=1024, active=64, seconds=2.0)
    assert report.failures == []
    assert report.admitted == 512 and report.refused == 512 and report.other_errors == []
    assert report.refusal_max_ms is not None and report.refusal_max_ms < 5000  # refused, never queued
    assert report.steps_before > 0 and report.steps_after > 0  # the admitted sessions kept stepping
    assert report.p99_before_ms is not None and report.p99_after_ms is not None
    assert report.p99_after_ms < 4 * report.p99_before_ms + 250, report  # generous: the machine is shared
    for empty, full in zip(report.server_rss_mb_empty, report.server_rss_mb_full):
        assert full - empty < 100, report  # 256 catch sessions cost a few MiB, not hundreds
