"""Backend "ray" with no address and no cluster: the pool starts a local Ray cluster and stops it.

Its own module, run before ``test_ray_fleet.py`` starts that module's shared cluster (a running
cluster on the machine would be joined instead, which is what ``ray.init()`` does too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

ROLLOUT = str(Path(sys.executable).with_name("rollout"))


def gcs_servers() -> set[int]:
    """Pids of the Ray GCS servers running on this machine, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "gcs_server":
                    found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_rollout_bench_starts_a_local_cluster_for_8_servers_and_stops_it() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        skip_or_fail("Ray is not installed (pip install -e '.[test]')")
    if gcs_servers():
        skip_or_fail("a Ray cluster already runs on this machine: the pool would join it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([ROLLOUT, "bench", "--backend", "ray", "--servers", "8", "--n", "64", "--seconds", "1",
                          "--mode", "per-env", "--json", "-"], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backend"] == "ray" and report["results"][0]["servers"] == 8 and report["results"][0]["steps"] > 0
    assert gcs_servers() == set()  # the cluster the pool started is gone with it
