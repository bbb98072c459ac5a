"""One grading process: a fresh sandbox running the harness, started ahead of need, used for one job, then killed.

The process is spawned (``sandbox_isolation.spawn``) while the agent thinks, so the
sandbox and interpreter start-up are off the step's path: it imports the harness's
modules, applies its limits and blocks on its ``go`` pipe. Nothing of the agent's has
run in it yet, so it is as fresh as one started on demand. ``run`` writes the job into
the process's memfd, sends ``go`` and reads exactly one result frame per test from the
private result pipe, until the deadline; then the sandbox is killed, whatever it left
behind (forks, files in its tmpfs) with it.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import sys
import threading
import time
from pathlib import Path

import msgspec

from .sandbox_harness import HEADER, MAX_RESULT
from .sandbox_isolation import Isolation, exit_status, kill_tree, site_dirs, spawn

HARNESS_SOURCE = Path(__file__).with_name("sandbox_harness.py").read_text()
BOOTSTRAP = "import sys; exec(compile(sys.argv[1], '<grader>', 'exec'))"
STATUSES = frozenset({"value", "raised", "timeout", "abort", "missing", "unencodable"})
GRACE = 5.0  # seconds for a slow start, on top of the replay and test budgets
_frame = msgspec.json.Decoder(tuple[int, str, msgspec.Raw])
_READ = select.POLLIN | select.POLLHUP | select.POLLERR

Results = tuple[list[tuple[str, bytes]], str | None]


class GradingLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one grading process may use."""

    memory_mb: int
    max_file_mb: int
    disk_mb: int
    cpu_seconds: int
    replay_timeout: float  # wall clock for replaying the cells
    test_timeout: float  # soft wall clock per test


class GradingProcess:
    """A started, idle grading sandbox; ``run`` once, ``close`` always (``kill`` from any thread)."""

    def __init__(self, limits: GradingLimits, isolation: Isolation) -> None:
        self.limits = limits
        self.isolation = isolation
        self._lock = threading.Lock()
        self._reaped = False
        self._closed = False
        self._fds: list[int] = []
        self._job = os.memfd_create("envfleet-grading-job")
        self._fds.append(self._job)
        go_read, self._go = os.pipe()
        result_read, result_write = os.pipe()
        self._fds += [self._go, result_read]
        self._results = result_read
        config = {
            "job_fd": self._job,
            "go_fd": go_read,
            "result_fd": result_write,
            "timeout": limits.test_timeout,
            "memory_bytes": limits.memory_mb << 20,
            "file_bytes": limits.max_file_mb << 20,
            "cpu_seconds": limits.cpu_seconds,
            "paths": site_dirs(),
        }
        try:
            spawned = spawn(
                [sys.executable, "-I", "-S", "-c", BOOTSTRAP, HARNESS_SOURCE, json.dumps(config)],
                isolation,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                stdout=_devnull(),
                stderr=_devnull(),
                pass_fds=(self._job, go_read, result_write),
                disk_mb=limits.disk_mb,
            )
        except BaseException:
            self._close_fds()
            raise
        finally:
            os.close(go_read)
            os.close(result_write)
        self.proc, self._workdir = spawned.proc, spawned.workdir
        self._pidfd = os.pidfd_open(self.proc.pid)
        self._fds.append(self._pidfd)

    def run(self, job: bytes, count: int) -> Results:
        """Grade ``job``: the ``count`` results ``(status, payload)`` in order, or why there are not exactly that many."""
        limits = self.limits
        deadline = time.monotonic() + limits.replay_timeout + limits.test_timeout * count + GRACE
        try:
            os.pwrite(self._job, job, 0)  # at offset 0, leaving the shared file offset where the harness reads
            os.write(self._go, b"g")
        except OSError as exc:
            return [], f"the grading process could not be started: {exc.strerror or exc}"
        return self._collect(count, deadline)

    def _collect(self, count: int, deadline: float) -> Results:
        fd = self._results
        poll = select.poll()
        poll.register(fd, _READ)
        poll.register(self._pidfd, _READ)
        inbox = bytearray()
        results: list[tuple[str, bytes]] = []
        exited = False
        while True:
            while len(inbox) >= HEADER and len(results) < count:
                size = int.from_bytes(inbox[:HEADER], "little")
                if size > MAX_RESULT + 256:
                    return results, f"the grading process wrote a {size}-byte frame"
                if len(inbox) < HEADER + size:
                    break
                body = bytes(inbox[HEADER : HEADER + size])
                del inbox[: HEADER + size]
                try:
                    index, status, payload = _frame.decode(body)
                except msgspec.DecodeError:
                    return results, "the grading process wrote a malformed frame"
                if index != len(results) or status not in STATUSES:
                    return results, f"the grading process wrote an unexpected frame (test {index}, {status!r})"
                results.append((status, bytes(payload)))
            if len(results) == count:
                if inbox or _read_now(fd):
                    return results, "the grading process wrote more than one result per test"
                return results, None
            if exited:
                code = exit_status(self._wait(), self.isolation)
                return results, f"the grading process ended after {len(results)} of {count} results (exit status {code})"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return results, f"the grading ran out of time after {len(results)} of {count} results"
            for ready, _ in poll.poll(math.ceil(remaining * 1000)):
                if ready == fd:
                    chunk = os.read(fd, 1 << 20)
                    if chunk:
                        inbox += chunk
                    else:
                        poll.unregister(fd)
                else:  # it exited: what it wrote before is all there will be
                    exited = True
                    poll.unregister(self._pidfd)
                    inbox += _read_now(fd)

    def kill(self) -> None:
        """SIGKILL the sandbox (safe from any thread, until it is reaped)."""
        with self._lock:
            if not self._reaped:
                kill_tree(self.proc, self.isolation, strays=True)

    def _wait(self) -> int:
        code = self.proc.wait()
        with self._lock:
            self._reaped = True
        return code

    def close(self) -> None:
        """Kill the sandbox, reap it and free its descriptors and directory; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.kill()
        self._wait()
        self._close_fds()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _read_now(fd: int) -> bytes:
    """What the pipe holds right now, without waiting."""
    os.set_blocking(fd, False)
    parts = []
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        parts.append(chunk)
    os.set_blocking(fd, True)
    return b"".join(parts)


_null: int | None = None


def _devnull() -> int:
    global _null
    if _null is None:
        _null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _null
