"""Soak in CI: 12 s of steady load at n=256; memory, file descriptors and tasks stay flat.

The full run (30 minutes for the record) is ``loadtests/soak.py``.
"""

from __future__ import annotations

import pytest

from loadtests.soak import run_soak


@pytest.mark.slow
async def test_steady_load_leaks_nothing() -> None:
    report = await run_soak(seconds=12.0, warmup=4.0, n=256, servers=2, sample_every=1.0)
    assert report.failures == []
    assert report.episodes > 0 and report.replacements == 0
    assert report.client_rss_mb_end <= report.client_rss_mb_start * 1.10
    for start, end in zip(report.server_rss_mb_start, report.server_rss_mb_end):
        assert end <= start * 1.10
    assert report.client_fds_end <= report.client_fds_start + 2
    assert report.tasks_end <= report.tasks_start
