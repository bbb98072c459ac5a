"""The server side of the Python sandbox's grader: expected results, one grading process per step, strict comparison.

Trust boundary. The agent's code never judges itself. After each step, a fresh process
(``python -I -S``, in a fresh sandbox of its own: ``sandbox_isolation.py``) runs the harness
(``sandbox_harness.py``): it replays the agent's cells, calls the agent's function on each
hidden input and writes each result as tagged plain data to a private pipe. Here, on the
server, the reference solution (trusted) has computed the expected results once, encoded
by the same encoder; a test passes only when the grading process reported, for that
test, exactly the expected bytes (or, where several answers are right, when the task's
server-side checker accepts the decoded value).

Why the agent cannot fool it: whatever its code does inside the grading process (patch
builtins or the harness, walk frames or ``gc``, write forged frames into the result pipe,
exit early), it can at most change which values are sent. Passing requires sending the
correct values, and those are never in that process: the expected results and the
solution stay in the server (and, in namespace isolation, the grading process cannot see
the envserver package, the server's files or its port). A value that only pretends to be
equal, or a subclass of a builtin, does not encode. A test passes only on positive
evidence: every test must report exactly once and in order; a test that times out or
ends the process (``sys.exit``, ``os._exit``, ``SystemExit``, ``KeyboardInterrupt``,
``SkipTest``), a crash, a missing or malformed frame fails the whole task (reward 0).

Tests that once inspected the agent's objects from inside (the comparison-counting
``bsearch`` test) are plain input/output tests now: what a grader that only sees values
cannot observe, it does not check.
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
from typing import Any

import msgspec

from .sandbox_harness import HEADER, MAX_RESULT, canonical, decode_value, encode_value
from .sandbox_isolation import Isolation, exit_status, kill_tree, site_dirs, spawn
from .sandbox_tasks import Calls, Task, Test

HARNESS_SOURCE = Path(__file__).with_name("sandbox_harness.py").read_text()
BOOTSTRAP = "import sys; exec(compile(sys.argv[1], '<grader>', 'exec'))"
STATUSES = frozenset({"value", "raised", "timeout", "abort", "missing", "unencodable"})
FATAL = frozenset({"timeout", "abort"})  # the test ended the grading instead of answering
GRACE = 5.0  # seconds for starting the grading process, on top of the replay and test budgets
_frame = msgspec.json.Decoder(tuple[int, str, msgspec.Raw])
_READ = select.POLLIN | select.POLLHUP | select.POLLERR


class Expected(msgspec.Struct, frozen=True):
    """What a test must report: the status and the exact encoded payload (``value`` kept for checkers)."""

    status: str
    payload: bytes
    value: Any = None


class Grade(msgspec.Struct):
    """The verdict on one step: which tests passed, and whether every test reported."""

    passed: list[bool]
    complete: bool
    problem: str | None = None  # why the grading did not complete, in words
    wall_time: float = 0.0

    @property
    def reward(self) -> float:
        return sum(self.passed) / len(self.passed) if self.complete and self.passed else 0.0


class _Prepared(msgspec.Struct):
    expected: list[Expected]
    tests_json: bytes  # the job's "tests" array, encoded once


_prepared: dict[str, _Prepared] = {}
_prepare_lock = threading.Lock()


def _fresh_args(args: tuple[Any, ...]) -> Any:
    """A deep copy of plain-data arguments, exactly as the grading process will see them."""
    return decode_value(json.loads(canonical(args)))


def _run_reference(entry: Any, test: Test) -> Any:
    args = _fresh_args(test.args)
    if isinstance(test, Calls):
        instance = entry(*args)
        return [getattr(instance, method)(*_fresh_args(call_args)) for method, call_args in test.calls]
    return entry(*args)


def expected_results(task: Task) -> list[Expected]:
    """The reference solution's results on the task's tests, computed once per server process."""
    return _prepare(task).expected


def _prepare(task: Task) -> _Prepared:
    with _prepare_lock:
        found = _prepared.get(task.name)
        if found is not None:
            return found
        namespace: dict[str, Any] = {"__name__": f"reference_{task.name}"}
        exec(compile(task.solution, f"<solution {task.name}>", "exec"), namespace)
        entry = namespace[task.entry]
        expected = []
        for test in task.tests:
            try:
                value = _run_reference(entry, test)
            except Exception as exc:  # a test that expects the agent's code to raise
                expected.append(Expected("raised", json.dumps(type(exc).__name__).encode()))
            else:
                expected.append(Expected("value", canonical(value), value))
        tests = [
            {"args": encode_value(t.args), **({"calls": [[m, encode_value(a)] for m, a in t.calls]} if isinstance(t, Calls) else {})}
            for t in task.tests
        ]
        found = _prepared[task.name] = _Prepared(expected, json.dumps(tests, separators=(",", ":")).encode())
        return found


def _passes(task: Task, test: Test, expected: Expected, status: str, payload: bytes) -> bool:
    if status != expected.status:
        return False
    if task.checker is None or status != "value":
        return payload == expected.payload
    try:
        actual = decode_value(json.loads(payload))
    except (ValueError, RecursionError):
        return False
    return bool(task.checker(_fresh_args(test.args), expected.value, actual))


class GradingLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one grading process may use."""

    memory_mb: int
    max_file_mb: int
    disk_mb: int
    cpu_seconds: int
    replay_timeout: float  # wall clock for replaying the cells
    test_timeout: float  # soft wall clock per test


def grade(task: Task, cells: list[str], limits: GradingLimits, isolation: Isolation) -> Grade:
    """Replay ``cells`` in a fresh grading process, run the task's tests there and judge the results here."""
    prepared = _prepare(task)
    started = time.monotonic()
    results, problem = _run_grading(task, prepared, cells, limits, isolation)
    grade = Grade([False] * len(task.tests), complete=problem is None, problem=problem)
    if problem is None:
        for index, (status, payload) in enumerate(results):
            if status in FATAL:
                grade.complete = False
                what = "ran out of time" if status == "timeout" else f"ended the grading ({json.loads(payload)})"
                grade.problem = f"hidden test {index + 1} {what}; every test must report a result"
                break
            grade.passed[index] = _passes(task, task.tests[index], prepared.expected[index], status, payload)
    if not grade.complete:
        grade.passed = [False] * len(task.tests)
    grade.wall_time = time.monotonic() - started
    return grade


def _run_grading(
    task: Task, prepared: _Prepared, cells: list[str], limits: GradingLimits, isolation: Isolation
) -> tuple[list[tuple[str, bytes]], str | None]:
    """Results ``(status, payload)`` of every test in order, or why there are not exactly that many."""
    job = b'{"cells":%s,"entry":%s,"timeout":%s,"tests":%s}' % (
        json.dumps(cells).encode(),
        json.dumps(task.entry).encode(),
        repr(float(limits.test_timeout)).encode(),
        prepared.tests_json,
    )
    deadline = time.monotonic() + limits.replay_timeout + limits.test_timeout * len(task.tests) + GRACE
    job_fd = os.memfd_create("envfleet-grading-job")
    read_end, write_end = os.pipe()
    fds = [job_fd, read_end]
    spawned = None
    try:
        os.write(job_fd, job)
        os.lseek(job_fd, 0, os.SEEK_SET)
        config = {
            "job_fd": job_fd,
            "result_fd": write_end,
            "memory_bytes": limits.memory_mb << 20,
            "file_bytes": limits.max_file_mb << 20,
            "cpu_seconds": max(1, min(limits.cpu_seconds, math.ceil(deadline - time.monotonic()))),
            "paths": site_dirs(),
        }
        try:
            spawned = spawn(
                [sys.executable, "-I", "-S", "-c", BOOTSTRAP, HARNESS_SOURCE, json.dumps(config)],
                isolation,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                stdout=_devnull(),
                stderr=_devnull(),
                pass_fds=(job_fd, write_end),
                disk_mb=limits.disk_mb,
            )
        finally:
            os.close(write_end)
        fds.append(os.pidfd_open(spawned.proc.pid))
        return _collect(read_end, fds[2], len(task.tests), deadline, spawned.proc, isolation)
    except OSError as exc:
        return [], f"the grading process could not run: {exc.strerror or exc}"
    finally:
        if spawned is not None:
            kill_tree(spawned.proc, isolation, strays=True)
            spawned.proc.wait()
            if spawned.workdir:
                shutil.rmtree(spawned.workdir, ignore_errors=True)
        for fd in fds:
            os.close(fd)


def _collect(
    fd: int, pidfd: int, count: int, deadline: float, proc: Any, isolation: Isolation
) -> tuple[list[tuple[str, bytes]], str | None]:
    poll = select.poll()
    poll.register(fd, _READ)
    poll.register(pidfd, _READ)
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
            os.set_blocking(fd, False)
            try:
                extra = os.read(fd, 1)
            except BlockingIOError:
                extra = b""
            if inbox or extra:
                return results, "the grading process wrote more than one result per test"
            return results, None
        if exited:
            code = exit_status(proc.wait(), isolation)
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
            else:
                exited = True
                poll.unregister(pidfd)
                os.set_blocking(fd, False)
                while True:  # what it wrote before it exited
                    try:
                        chunk = os.read(fd, 1 << 20)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    inbox += chunk


_null: int | None = None


def _devnull() -> int:
    global _null
    if _null is None:
        _null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _null
