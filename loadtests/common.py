"""What the standalone loadtests share: their JSON report, and what /proc says of a process.

The loadtests run as scripts (``python loadtests/soak.py``), so they import this module as
``common``; pytest puts ``loadtests/`` on ``sys.path`` for the tests that import them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec


def write_report(benchmark: str, report: Any, out: Path, *, print_without: tuple[str, ...] = ()) -> None:
    """Write ``report`` (a msgspec Struct) with what produced it and when as JSON to ``out``, and print it.

    ``print_without`` names fields (long series) left out of the printed copy only.
    """
    result = {"benchmark": benchmark, "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load_average": os.getloadavg(), **msgspec.to_builtins(report)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in print_without}, indent=2))


def proc_stat(pid: int) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), as bytes; empty if ``pid`` is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return []
    return stat.rpartition(b")")[2].split()  # the name, in parentheses, may itself hold spaces and ")"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far; 0.0 if it is gone."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc), 0.0 if it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 2)
    return 0.0
