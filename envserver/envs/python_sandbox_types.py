"""The Python sandbox's wire types, apart from the environment so clients can import them on their own."""

from __future__ import annotations

import msgspec


class PythonAction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Python source to run in the session's interpreter, like one notebook cell."""

    code: str = ""


class PythonObservation(msgspec.Struct, gc=False):
    """What running one cell did; ``notice`` says in words which limit was hit and what it cost."""

    stdout: str = ""
    stderr: str = ""  # includes the traceback when the code raised
    exception_type: str | None = None
    exception_message: str | None = None
    exit_code: int | None = None  # the interpreter's exit status if it ended during the step (-N: signal N)
    wall_time: float = 0.0  # seconds
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    state_lost: bool = False  # the interpreter was replaced: earlier variables are gone
    execution_count: int = 0
    notice: str = ""
    prompt: str | None = None  # the task, on reset in task mode
    tests_passed: int | None = None  # task mode: hidden tests passing after this step
    tests_total: int | None = None


class PythonState(msgspec.Struct, gc=False):
    episode_id: str | None
    execution_count: int
    task: str | None = None
    max_steps: int | None = None
    restarts: int = 0  # interpreters replaced after a timeout, crash or limit in this episode
    seed: int | None = None
