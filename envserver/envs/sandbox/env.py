"""The Python sandbox: an agent sends code, a persistent interpreter runs it, the observation says what happened.

Each session owns one interpreter in a child process (``interpreter.py``), so
variables survive between steps like notebook cells; ``reset`` replaces it. Limits per
step (wall clock, output size) and per interpreter (CPU seconds, memory, file size,
processes) are reported in the observation: a timeout, crash or CPU exhaustion costs the
interpreter (``state_lost``), never the session or the server.

Isolation (``isolation.py``): where bubblewrap and user namespaces are available
every interpreter and every grading process runs in namespaces of its own (private tmpfs,
no network, its own pids, no view of the server's files); otherwise, or with the
operator option ``isolation="process"``, as a plain child process, and a warning is
logged. ``reset``'s info says which (``info["isolation"]``).

Task mode: ``reset(options={"task": name})`` (or ``"random"``, picked by the seed) loads
one of ``tasks.TASKS``. After each step the grader (``grader.py``) replays
the cells of the current interpreter (those that finished; a lost interpreter's cells are
gone with it) in a fresh grading process (``grading_process.py``, started while
the agent thinks and used once), calls the agent's function on the hidden inputs there
and compares the results with the reference solution's on the server; the step's
``info["grading_seconds"]`` says how long that took. The reward
is the fraction of tests passing when every test reported, else 0; the episode
terminates when all pass and is truncated after ``max_steps`` steps. Without a task the
reward is 0 and the episode only ends on reset or close.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from typing import Any

import msgspec

from ...env import Environment
from ...errors import ServerError
from ...executor import run_in_background
from ...protocol import ErrorCode, StepResult
from .grader import Grade, grade
from .grading_process import GradingLimits, GradingProcess
from .interpreter import Interpreter, Outcome, SandboxLimits, StartError
from .isolation import POLICIES, Isolation, detect
from .tasks import TASKS, Task
from .types import PythonAction, PythonObservation, PythonState



class SandboxConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Session options (``--env-options``); a reset may choose only ``task`` and ``max_steps``."""

    timeout: float = 10.0  # wall-clock seconds per step
    cpu_seconds: int = 120  # per interpreter
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024  # per stream and step
    max_processes: int = 32
    max_file_mb: int = 64
    disk_mb: int = 256  # private tmpfs per sandbox (namespace isolation)
    test_timeout: float = 2.0  # per hidden test
    startup_timeout: float = 20.0
    isolation: str = "auto"  # "auto" (namespaces when available), "namespaces" (required) or "process"
    task: str | None = None
    max_steps: int = 20

    def limits(self) -> SandboxLimits:
        return SandboxLimits(
            cpu_seconds=self.cpu_seconds,
            memory_mb=self.memory_mb,
            max_output_bytes=self.max_output_bytes,
            max_processes=self.max_processes,
            max_file_mb=self.max_file_mb,
            disk_mb=self.disk_mb,
        )

    def grading_limits(self) -> GradingLimits:
        return GradingLimits(
            memory_mb=self.memory_mb,
            max_file_mb=self.max_file_mb,
            disk_mb=self.disk_mb,
            cpu_seconds=self.cpu_seconds,
            replay_timeout=self.timeout,
            test_timeout=self.test_timeout,
        )


class _EpisodeOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    task: str | None = None
    max_steps: int | None = None


class PythonSandboxEnv(Environment[PythonAction, PythonObservation, PythonState]):
    name = "python_sandbox"
    description = (
        "Runs Python code in a persistent, resource-limited interpreter (variables survive between steps); "
        "optional coding tasks with hidden tests, reward = fraction passing."
    )
    Action = PythonAction
    Observation = PythonObservation
    State = PythonState
    blocking = True
    session_options = frozenset({"task", "max_steps"})

    def __init__(self, **options: Any) -> None:
        try:
            self.config = msgspec.convert(options, SandboxConfig)
        except msgspec.ValidationError as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad python_sandbox options: {exc}") from None
        if self.config.task is not None:
            _find_task(self.config.task, None)
        if self.config.isolation not in POLICIES:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"isolation must be one of {', '.join(POLICIES)}")
        self.isolation = Isolation("process", "not yet probed")  # set by the first reset, off the event loop
        self._limits = self.config.limits()
        self._cells: list[str] = []  # the steps the current interpreter finished, for the grader to replay
        self._spare: GradingProcess | None = None  # started ahead, for the next step's grading
        self._grading: GradingProcess | None = None  # in use by a step
        self._interpreter: Interpreter | None = None
        self._episode_id: str | None = None
        self._count = 0
        self._task: Task | None = None
        self._max_steps = self.config.max_steps
        self._over = False
        self._restarts = 0
        self._seed: int | None = None
        self._closed = False

    # -- Environment API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[PythonObservation]:
        try:
            episode = msgspec.convert(options or {}, _EpisodeOptions)
        except msgspec.ValidationError as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad reset options for python_sandbox: {exc}") from None
        task_name = episode.task if episode.task is not None else self.config.task
        task = _find_task(task_name, seed) if task_name is not None else None
        max_steps = episode.max_steps if episode.max_steps is not None else self.config.max_steps
        if max_steps < 1:
            raise ServerError(ErrorCode.VALIDATION_ERROR, "max_steps must be at least 1")
        self._discard_interpreter()
        try:
            self.isolation = detect(self.config.isolation)  # probes bubblewrap once per process
        except RuntimeError as exc:
            raise ServerError(ErrorCode.EXECUTION_ERROR, str(exc)) from None
        self._seed = seed
        self._start_interpreter()
        self._episode_id = str(uuid.uuid4())
        self._count = self._restarts = 0
        self._task, self._max_steps, self._over = task, max_steps, False
        self._prepare_grading()
        observation = PythonObservation()
        if task is not None:
            observation.prompt = task.prompt
            observation.tests_passed, observation.tests_total = 0, len(task.tests)
        info = {"isolation": self.isolation.mode, **({"task": task.name} if task else {})}
        return StepResult(observation, info=info)

    def step(self, action: PythonAction) -> StepResult[PythonObservation]:
        if self._episode_id is None or self._over:
            raise ServerError(ErrorCode.EPISODE_OVER, "no episode is running: call reset first")
        self._count += 1
        notes: list[str] = []
        interpreter = self._interpreter or self._start_interpreter()
        outcome = interpreter.execute(action.code, self.config.timeout)
        observation = self._observe(outcome, notes)
        if outcome.lost:
            self._lose_interpreter(observation, notes)
        else:
            self._cells.append(action.code)
        reward, terminated, info = 0.0, False, {}
        if self._task is not None:
            started = time.perf_counter()
            reward, terminated = self._grade(observation, notes)
            info["grading_seconds"] = round(time.perf_counter() - started, 6)
        truncated = self._task is not None and not terminated and self._count >= self._max_steps
        self._over = terminated or truncated
        self._prepare_grading()
        observation.notice = " ".join(notes)
        return StepResult(observation, reward, terminated, truncated, info)

    def state(self) -> PythonState:
        return PythonState(
            self._episode_id,
            self._count,
            self._task.name if self._task else None,
            self._max_steps if self._task else None,
            self._restarts,
            self._seed,
        )

    def close(self) -> None:
        """Kill the interpreter and grading processes now; reap them off the event loop when there is one."""
        self._closed = True
        if self._grading is not None:
            self._grading.kill()  # the step using it frees it
        for process in (self._interpreter, self._spare):
            if process is not None:
                process.kill()
                run_in_background(process.close)  # reaping may wait: not on the event loop
        self._interpreter = self._spare = None

    # -- internals

    def _start_interpreter(self) -> Interpreter:
        if self._closed:
            raise ServerError(ErrorCode.UNKNOWN_SESSION, "the session is closed")
        interpreter = Interpreter(self._limits, self.isolation, self._seed)
        try:
            interpreter.start(self.config.startup_timeout)
        except StartError as exc:
            code = ErrorCode.CAPACITY_REACHED if exc.errno is not None else ErrorCode.EXECUTION_ERROR
            raise ServerError(code, str(exc)) from None
        self._interpreter, self._cells = interpreter, []
        if self._closed:  # closed while starting: do not leave it running
            self._discard_interpreter()
            raise ServerError(ErrorCode.UNKNOWN_SESSION, "the session is closed")
        return interpreter

    def _prepare_grading(self) -> None:
        """Have a fresh grading process waiting when the episode will grade again, and none otherwise."""
        wanted = self._task is not None and not self._over and not self._closed
        if wanted and self._spare is None:
            try:
                self._spare = GradingProcess(self.config.grading_limits(), self.isolation)
            except OSError:
                return  # the next grading starts one itself, or says why it cannot
            if self._closed:
                self._spare.close()
                self._spare = None
        elif not wanted and self._spare is not None:
            spare, self._spare = self._spare, None
            spare.close()

    def _discard_interpreter(self) -> None:
        interpreter, self._interpreter = self._interpreter, None
        if interpreter is not None:
            interpreter.close()

    def _lose_interpreter(self, observation: PythonObservation, notes: list[str]) -> None:
        self._discard_interpreter()
        self._restarts += 1
        observation.state_lost = True
        notes.append("Its variables, imports and files are lost; the next step starts a fresh interpreter.")

    def _observe(self, outcome: Outcome, notes: list[str]) -> PythonObservation:
        reply, limit = outcome.reply, self.config.max_output_bytes
        observation = PythonObservation(
            stdout=outcome.stdout.text(),
            stderr=outcome.stderr.text(),
            wall_time=round(outcome.wall_time, 6),
            timed_out=outcome.timed_out,
            exit_code=outcome.exit_code if reply is None else None,
            execution_count=self._count,
        )
        if reply is not None:
            observation.exception_type = reply.exception_type
            observation.exception_message = reply.exception_message
        for stream, capture, sent in (
            ("stdout", outcome.stdout, reply.stdout_bytes if reply else 0),
            ("stderr", outcome.stderr, reply.stderr_bytes if reply else 0),
        ):
            total = max(capture.seen, sent)
            if total > limit:
                setattr(observation, f"{stream}_truncated", True)
                notes.append(f"{stream} truncated: {total} bytes written, the first {limit} kept.")
        if outcome.timed_out:
            notes.append(f"The step timed out after {self.config.timeout:g} s and the interpreter was killed.")
        elif reply is None:
            notes.append(self._describe_exit(outcome))
        elif reply.exception_type == "MemoryError":
            notes.append(f"The memory limit is {self.config.memory_mb} MB of address space.")
        elif reply.exception_type == "BlockingIOError" and "process limit" in (reply.exception_message or ""):
            notes.append(f"At most {self.config.max_processes} processes may run in the sandbox.")
        return observation

    def _describe_exit(self, outcome: Outcome) -> str:
        code = outcome.exit_code
        if code is None:
            return f"The interpreter stopped answering ({outcome.broken}) and was killed."
        if code >= 0:
            return f"The interpreter exited with status {code} (os._exit, or a crash)."
        sig = -code
        if sig == signal.SIGXCPU:
            return f"The interpreter used up its CPU time ({self.config.cpu_seconds} s per interpreter) and was killed."
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if outcome.broken and sig == signal.SIGKILL:
            return f"The interpreter was killed: {outcome.broken}."
        return f"The interpreter was killed by {name}."

    def _grade(self, observation: PythonObservation, notes: list[str]) -> tuple[float, bool]:
        assert self._task is not None
        observation.tests_total = len(self._task.tests)
        observation.tests_passed = 0
        if self._interpreter is None:  # the state is gone: nothing the tests could find
            return 0.0, False
        verdict = self._run_grading(self._task)
        if verdict.problem:
            notes.append(f"Grading failed: {verdict.problem}.")
        observation.tests_passed = sum(verdict.passed)
        return verdict.reward, verdict.complete and all(verdict.passed)


    def _run_grading(self, task: Task) -> Grade:
        process, self._spare = self._spare, None
        if process is not None and process.proc.poll() is not None:  # the spare died idle (OOM, an operator's kill)
            process.close()
            process = None
        try:
            process = process or GradingProcess(self.config.grading_limits(), self.isolation)
        except OSError as exc:
            return Grade([False] * len(task.tests), complete=False, problem=f"the grading process could not start: {exc.strerror or exc}")
        self._grading = process
        try:
            if self._closed:
                return Grade([False] * len(task.tests), complete=False, problem="the session was closed")
            return grade(task, self._cells, process)
        finally:
            self._grading = None
            process.close()


def _find_task(name: str, seed: int | None) -> Task:
    if name == "random":
        return random.Random(seed).choice(list(TASKS.values()))
    task = TASKS.get(name)
    if task is None:
        raise ServerError(ErrorCode.VALIDATION_ERROR, f"unknown task {name!r}; tasks: random, {', '.join(sorted(TASKS))}")
    return task
