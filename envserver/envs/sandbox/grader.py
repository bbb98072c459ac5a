"""The server side of the Python sandbox's grader: expected results, one grading process per step, strict comparison.

Trust boundary. The agent's code never judges itself. After each step, a fresh process
(``python -I -S``, in a fresh sandbox of its own: ``grading_process.py``) runs the harness
(``harness.py``): it replays the agent's cells, calls the agent's function on each
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
import threading
import time
from typing import Any

import msgspec

from .grading_process import GradingProcess
from .harness import canonical, decode_value, encode_value
from .tasks import Calls, Task, Test

FATAL = frozenset({"timeout", "abort"})  # the test ended the grading instead of answering


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
    return bool(task.checker(test.args, expected.value, actual))  # trusted code: no copy needed


def grade(task: Task, cells: list[str], process: GradingProcess) -> Grade:
    """Replay ``cells`` in ``process`` (fresh, started for this), run the task's tests there and judge the results here."""
    prepared = _prepare(task)
    started = time.monotonic()
    job = b'{"cells":%s,"entry":%s,"tests":%s}' % (json.dumps(cells).encode(), json.dumps(task.entry).encode(), prepared.tests_json)
    results, problem = process.run(job, len(task.tests))
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
