"""``rollout`` command line: bench output, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def rollout(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rollout.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = rollout("bench", "--n", "8", "--servers", "1", "--seconds", "0.5", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "| per-env | 8 | 1 |" in result.stdout and "| batched | 8 | 1 |" in result.stdout
    report = json.loads(out.read_text())
    assert report["env"] == "openspiel" and report["options"] == {"game": "catch"}
    for row in report["results"]:
        assert row["steps"] > 0 and row["steps_per_s"] > 0 and row["latency_p99_ms"] >= row["latency_p50_ms"] > 0


def test_bench_json_to_stdout_is_machine_readable() -> None:
    result = rollout("bench", "--env", "echo", "--n", "4", "--servers", "1", "--seconds", "0.3", "--mode", "per-env", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["env"] == "echo" and [r["mode"] for r in report["results"]] == ["per-env"]


def test_bad_input_exits_nonzero_with_one_clear_line() -> None:
    result = rollout("bench", "--game", "no_such_game", "--n", "1", "--servers", "1", "--seconds", "0.1")
    assert result.returncode == 1
    assert "rollout: error:" in result.stderr and "no_such_game" in result.stderr
    assert "Traceback" not in result.stderr
    assert rollout("bench", "--n", "many").returncode == 2  # argparse usage error
