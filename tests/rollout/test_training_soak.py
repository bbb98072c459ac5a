"""The training-loop soak, short: cycles of stepping and pauses past a 2 s TTL, bad actions, one server killed.

The recorded run (15-20 minutes, n=256) is ``loadtests/training_soak.py``.
"""

from __future__ import annotations

import pytest

from loadtests.training_soak import run_training_soak


@pytest.mark.slow
async def test_a_training_loop_loses_no_episode_and_leaks_nothing() -> None:
    report = await run_training_soak(seconds=14.0, n=256, servers=2, ttl=2.0, step_seconds=4.0, pause=3.0)
    assert report.failures == []
    assert report.cycles >= 2 and report.episodes > 0 and report.episodes_lost == 0
    assert report.injected["oversized"] > 0 and report.injected["unencodable"] > 0
    assert report.refused.get("RequestTooLarge", 0) > 0 and report.refused.get("UnencodableAction", 0) > 0
    assert report.errors == {} and report.replacements == 1
    assert report.client_rss_mb_end <= report.client_rss_mb_start * 1.10
    assert report.client_fds_end <= report.client_fds_start + 2 and report.tasks_end <= report.tasks_start
