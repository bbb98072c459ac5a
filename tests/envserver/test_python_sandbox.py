"""The Python sandbox against real child processes: persistence, every bad-input case, task mode, a real server.

Each test that ends an interpreter checks, by scanning /proc, that none of its processes
(bubblewrap, the namespace's init, the interpreter and its children) is left running and
that the test process holds no zombie child. The tests run in the isolation the machine
offers (namespaces where bubblewrap works, as in CI); a few run in process mode too.
The attacks on the grader are in ``test_sandbox_redteam.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from envserver.envs.sandbox.env import PythonSandboxEnv
from envserver.envs.sandbox.isolation import descendants, detect
from envserver.envs.sandbox.tasks import TASKS
from envserver.envs.sandbox.types import PythonAction, PythonObservation
from envserver.envs.sandbox.worker import proc_stat
from envserver.errors import ServerError
from envserver.protocol import ErrorCode
from tests.conftest import skip_or_fail

from .sandbox_support import running, ws_step

# --------------------------------------------------------------------------- /proc helpers


def _processes() -> dict[int, list[bytes]]:
    return {int(p): fields for p in os.listdir("/proc") if p.isdigit() and (fields := proc_stat(p))}


def zombie_children() -> list[int]:
    me = os.getpid()
    return [pid for pid, fields in _processes().items() if int(fields[1]) == me and fields[0] == b"Z"]


def assert_gone(pids: list[int], timeout: float = 3.0) -> None:
    """None of these processes runs any more, and we left no zombie."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if running(p)] + zombie_children()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not left, f"left behind: {left}"


def pid_of(env: PythonSandboxEnv) -> int:
    interpreter = env._interpreter
    assert interpreter is not None and interpreter.pid is not None
    return interpreter.pid


def sandbox_pids(env: PythonSandboxEnv) -> list[int]:
    """The interpreter's sandbox: its first process and every live descendant, seen from outside."""
    pid = pid_of(env)
    return [pid, *(p for p in descendants(pid) if running(p))]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def make_env() -> Iterator[Any]:
    """``make_env(**options)`` returns a reset sandbox; every one is closed and checked for leftovers."""
    made: list[tuple[PythonSandboxEnv, list[int]]] = []

    def make(**options: Any) -> PythonSandboxEnv:
        env = PythonSandboxEnv(**{"timeout": 5.0, **options})
        env.reset()
        made.append((env, sandbox_pids(env)))
        return env

    try:
        yield make
    finally:
        for env, pids in made:
            if env._interpreter is not None:
                pids += sandbox_pids(env)
            env.close()
        for _, pids in made:
            assert_gone(pids)


def run(env: PythonSandboxEnv, code: str) -> PythonObservation:
    result = env.step(PythonAction(code))
    observation: PythonObservation = result.observation
    return observation


# --------------------------------------------------------------------------- the notebook


def test_variables_persist_between_steps_like_cells(make_env: Any) -> None:
    env = make_env()
    assert run(env, "x = 41\ndef inc(v):\n    return v + 1").stdout == ""
    obs = run(env, "print('x is', x)\ninc(x)")
    assert obs.stdout == "x is 41\n42\n"
    assert (obs.exception_type, obs.exit_code, obs.timed_out, obs.state_lost) == (None, None, False, False)
    assert obs.execution_count == 2 and env.state().execution_count == 2
    assert run(env, "import sys; print('to stderr', file=sys.stderr)").stderr == "to stderr\n"


def test_exception_is_reported_with_a_traceback_of_user_frames_only(make_env: Any) -> None:
    env = make_env()
    obs = run(env, "def f():\n    return 1 / 0\nf()")
    assert obs.exception_type == "ZeroDivisionError" and obs.exception_message == "division by zero"
    assert 'File "<cell 1>", line 2, in f' in obs.stderr and "<sandbox>" not in obs.stderr
    obs = run(env, "def broken(:")
    assert obs.exception_type == "SyntaxError"
    obs = run(env, "raise SystemExit(3)")  # like a notebook: the interpreter lives on
    assert (obs.exception_type, obs.exception_message, obs.exit_code) == ("SystemExit", "3", None)
    assert run(env, "print(f.__name__)").stdout == "f\n"


def test_reset_replaces_the_interpreter(make_env: Any) -> None:
    env = make_env()
    run(env, "x = 1")
    old = sandbox_pids(env)
    env.reset()
    assert pid_of(env) not in old
    assert_gone(old)
    assert run(env, "x").exception_type == "NameError"
    assert env.state().execution_count == 1


def test_same_seed_same_random_draws(make_env: Any) -> None:
    env = make_env()
    draws = []
    for _ in range(2):
        env.reset(seed=7)
        draws.append(run(env, "import random; random.random()").stdout)
    assert draws[0] == draws[1] != ""


def test_step_before_reset_and_bad_options_are_coded_errors() -> None:
    env = PythonSandboxEnv()
    try:
        with pytest.raises(ServerError) as info:
            env.step(PythonAction("1"))
        assert info.value.code is ErrorCode.EPISODE_OVER
        with pytest.raises(ServerError) as info:
            env.reset(options={"task": "no_such_task"})
        assert info.value.code is ErrorCode.VALIDATION_ERROR and "fizzbuzz" in info.value.message
        with pytest.raises(ServerError) as info:
            env.reset(options={"timeout": 1000})  # limits are the operator's, not the client's
        assert info.value.code is ErrorCode.VALIDATION_ERROR
        with pytest.raises(ServerError):
            PythonSandboxEnv(timeout="soon")
    finally:
        env.close()


# --------------------------------------------------------------------------- bad input


def test_infinite_loop_times_out_and_the_interpreter_restarts_cleanly(make_env: Any) -> None:
    env = make_env(timeout=1.0)
    run(env, "x = 1")
    old = sandbox_pids(env)
    obs = run(env, "print('before', flush=True)\nwhile True:\n    pass")
    assert obs.timed_out and obs.state_lost and obs.stdout == "before\n"
    assert 1.0 <= obs.wall_time < 2.0 and "timed out after 1 s" in obs.notice and "lost" in obs.notice
    assert_gone(old)
    obs = run(env, "x")
    assert obs.exception_type == "NameError" and not obs.state_lost
    assert env.state().restarts == 1


def test_fork_bomb_hits_the_process_limit_and_leaves_nothing_running(make_env: Any) -> None:
    env = make_env(max_processes=16)
    run(env, "import os\nkeep = 5")
    before = set(sandbox_pids(env))
    obs = run(env, "while True:\n    os.fork()")
    assert obs.exception_type == "BlockingIOError" and "process limit" in (obs.exception_message or "")
    assert "At most 16 processes" in obs.notice and not obs.state_lost
    assert set(sandbox_pids(env)) == before  # the bomb's processes are gone
    assert run(env, "print(keep)").stdout == "5\n"  # and the interpreter carries on


def test_subprocesses_work_and_escaped_ones_die_with_the_session(make_env: Any) -> None:
    env = make_env()
    obs = run(env, "import subprocess\nprint(subprocess.run(['echo', 'hi'], capture_output=True, text=True).stdout)")
    assert obs.stdout == "hi\n\n"
    before = set(sandbox_pids(env))
    run(env, "p = subprocess.Popen(['sleep', '60'], start_new_session=True)")
    pids = sandbox_pids(env)
    assert len(set(pids) - before) == 1  # the sleep, in a session of its own
    env.close()
    assert_gone(pids)


def test_allocating_10_gb_is_a_memory_error_and_the_session_survives(make_env: Any) -> None:
    env = make_env(memory_mb=512)
    run(env, "small = [1, 2, 3]")
    obs = run(env, "big = bytearray(10 * 1024 ** 3)")
    assert obs.exception_type == "MemoryError" and "512 MB" in obs.notice and not obs.state_lost
    assert run(env, "print(len(small))").stdout == "3\n"


def test_writing_1_gb_to_stdout_is_truncated_quickly(make_env: Any) -> None:
    env = make_env(max_output_bytes=4096)
    obs = run(env, "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\nprint('done', file=sys.stderr)")
    assert obs.stdout_truncated and not obs.stderr_truncated and obs.stderr == "done\n"
    assert obs.stdout == "x" * 4096 and "1073741824 bytes written" in obs.notice
    assert obs.wall_time < 4.0
    # Raw writes to fd 1 bypass sys.stdout: the parent caps and drains them.
    obs = run(env, "import os\nfor _ in range(128):\n    os.write(1, b'y' * (1 << 20))")
    assert obs.stdout_truncated and obs.stdout == "y" * 4096 and not obs.timed_out
    assert run(env, "print('ok')").stdout == "ok\n"


def test_closing_stdin_and_stdout_only_affects_that_step(make_env: Any) -> None:
    env = make_env()
    obs = run(env, "import sys, os\nsys.stdin.close()\nos.close(0)\nv = 'alive'")
    assert obs.exception_type is None
    assert run(env, "input()").exception_type == "EOFError"  # stdin is empty, not the control channel
    obs = run(env, "os.close(1)\nos.close(2)\nsys.stdout = None")
    assert obs.exception_type is None
    assert run(env, "print(v)").stdout == "alive\n"


def test_os_exit_reports_the_status_and_restarts(make_env: Any) -> None:
    env = make_env()
    old = sandbox_pids(env)
    obs = run(env, "import os\nos._exit(3)")
    assert obs.exit_code == 3 and obs.state_lost and "exited with status 3" in obs.notice
    assert_gone(old)
    assert run(env, "print('fresh')").stdout == "fresh\n"


def test_exit_while_a_fork_holds_the_pipes_is_seen_at_once(make_env: Any) -> None:
    env = make_env(timeout=5.0)
    run(env, "import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)")
    obs = run(env, "os._exit(4)")
    assert obs.exit_code == 4 and obs.wall_time < 2.0


def test_cpu_limit_ends_the_interpreter(make_env: Any) -> None:
    env = make_env(cpu_seconds=1, timeout=15.0)  # 1 CPU second takes longer on a loaded machine
    obs = run(env, "while True:\n    pass")
    assert not obs.timed_out and obs.exit_code is not None and obs.exit_code < 0
    assert "CPU time (1 s per interpreter)" in obs.notice and obs.state_lost


def test_file_size_limit(make_env: Any) -> None:
    env = make_env(max_file_mb=1)
    obs = run(env, "open('big.bin', 'wb').write(b'0' * (2 << 20))")
    assert obs.exception_type == "OSError" and "File too large" in (obs.exception_message or "")


def test_signals_to_processes_outside_the_sandbox_are_refused(make_env: Any) -> None:
    env = make_env()
    obs = run(env, "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)")
    assert obs.exception_type == "PermissionError"
    assert run(env, "os.kill(-1, signal.SIGKILL)").exception_type == "PermissionError"


def test_close_during_a_step_ends_it_at_once(make_env: Any) -> None:
    env = make_env(timeout=20.0)
    pids = sandbox_pids(env)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(run(env, "while True:\n    pass")))
    start = time.monotonic()
    thread.start()
    time.sleep(0.2)
    env.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - start < 3
    assert results and results[0].state_lost
    assert_gone(pids)


# --------------------------------------------------------------------------- task mode


def test_task_mode_rewards_the_fraction_of_hidden_tests_passed(make_env: Any) -> None:
    env = make_env()
    result = env.reset(options={"task": "fizzbuzz", "max_steps": 3})
    assert "fizzbuzz(n)" in (result.observation.prompt or "") and result.observation.tests_total == 4
    step = env.step(PythonAction("def fizzbuzz(n):\n    print('called with', n)\n    return []"))
    assert step.reward == 0.25 and not step.terminated and step.observation.tests_passed == 1
    assert step.observation.stdout == ""  # nothing the tests ran or printed leaks out
    step = env.step(PythonAction(TASKS["fizzbuzz"].solution))
    assert (step.reward, step.terminated, step.truncated) == (1.0, True, False)
    with pytest.raises(ServerError) as info:
        env.step(PythonAction("1"))
    assert info.value.code is ErrorCode.EPISODE_OVER


def test_task_mode_truncates_after_max_steps_and_survives_hanging_tests(make_env: Any) -> None:
    env = make_env(test_timeout=0.3)
    env.reset(options={"task": "reverse_words", "max_steps": 2})
    step = env.step(PythonAction("def reverse_words(s):\n    while True:\n        pass"))
    assert step.reward == 0.0 and not step.observation.state_lost  # each hung test was interrupted
    assert step.observation.wall_time < 1.0
    step = env.step(PythonAction("x = 1"))
    assert step.truncated and not step.terminated and env.state().max_steps == 2


def test_grading_replays_only_the_cells_of_the_current_interpreter(make_env: Any) -> None:
    env = make_env(timeout=1.0)
    env.reset(options={"task": "reverse_words"})
    half = "def reverse_words(s):\n    return helper(s)"
    assert env.step(PythonAction(half)).reward == 0.0  # helper is not defined yet: every test raises NameError
    step = env.step(PythonAction("def helper(s):\n    return ' '.join(reversed(s.split()))"))
    assert step.reward == 1.0 and step.terminated  # cell 1 and cell 2, replayed in order
    env.reset(options={"task": "reverse_words"})
    env.step(PythonAction(TASKS["reverse_words"].solution))  # not terminated: but the next cell hangs
    env.reset(options={"task": "reverse_words"})
    env.step(PythonAction(half + "\ndef helper(s):\n    return s"))
    step = env.step(PythonAction("while True:\n    pass"))  # the interpreter is lost with its cells
    assert step.observation.state_lost and step.reward == 0.0 and step.observation.tests_passed == 0
    step = env.step(PythonAction("def helper(s):\n    return ' '.join(reversed(s.split()))"))
    assert step.reward == 0.0  # reverse_words went with the lost interpreter


def test_cells_that_change_their_process_do_not_change_how_grading_runs(make_env: Any) -> None:
    """Start-up files, environment variables, a new cwd and closed stdio in a cell: replayed after the harness started."""
    env = make_env()
    env.reset(options={"task": "reverse_words"})
    tamper = (
        "import os, sys\n"
        "open('sitecustomize.py', 'w').write('raise SystemExit')\n"
        "open('usercustomize.py', 'w').write('raise SystemExit')\n"
        "os.environ['PYTHONPATH'] = os.getcwd()\n"
        "os.environ['PYTHONSTARTUP'] = 'sitecustomize.py'\n"
        "os.makedirs('elsewhere', exist_ok=True)\n"
        "os.chdir('elsewhere')\n"
        "sys.stdout = None\n"
        "os.close(1)\n"
    )
    assert env.step(PythonAction(tamper)).observation.exception_type is None
    step = env.step(PythonAction(TASKS["reverse_words"].solution))
    assert (step.reward, step.observation.tests_passed) == (1.0, 4)


@pytest.mark.parametrize("isolation", ["auto", "process"])
def test_every_task_is_solved_by_its_solution_and_not_by_nothing(isolation: str) -> None:
    assert len(TASKS) >= 20
    env = PythonSandboxEnv(timeout=10.0, isolation=isolation)
    try:
        for name, task in TASKS.items():
            env.reset(options={"task": name})
            assert env.step(PythonAction("pass")).reward == 0.0, name
            step = env.step(PythonAction(task.solution))
            assert (step.reward, step.terminated) == (1.0, True), (name, step.observation)
            assert step.observation.tests_passed == step.observation.tests_total == len(task.tests)
    finally:
        env.close()


# --------------------------------------------------------------------------- isolation


def test_namespace_isolation_is_detected_and_reported(make_env: Any) -> None:
    if detect().mode != "namespaces":
        skip_or_fail(f"no namespace isolation on this machine: {detect().reason}")
    env = make_env()
    assert env.reset().info["isolation"] == "namespaces"
    obs = run(env, "import os\nprint(os.getuid(), os.getcwd(), *sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    uid, cwd, *pids = obs.stdout.split()
    assert uid != "0" and cwd == "/tmp"
    assert pids == ["1", "2"]  # its own pid namespace: the namespace's init and the interpreter, nothing else
    assert run(env, "import socket\nsocket.create_connection(('127.0.0.1', 1), 1)").exception_type == "ConnectionRefusedError"
    assert run(env, "os.path.exists('/run') or os.path.exists(os.path.expanduser('~root/.bashrc'))").stdout == "False\n"


def test_process_mode_is_reported_and_still_runs_and_grades(make_env: Any) -> None:
    env = make_env(isolation="process")
    result = env.reset(options={"task": "fizzbuzz"})
    assert result.info["isolation"] == "process"
    assert run(env, "import os\nprint(os.getcwd().startswith('/tmp/envfleet-sandbox-'))").stdout == "True\n"
    assert env.step(PythonAction(TASKS["fizzbuzz"].solution)).reward == 1.0


def test_detection_without_bubblewrap_falls_back_with_a_reason(tmp_path: Any) -> None:
    missing = detect(bwrap=str(tmp_path / "no-bwrap"))
    assert missing.mode == "process" and "could not run" in missing.reason
    refusing = tmp_path / "bwrap"
    refusing.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    refusing.chmod(0o755)
    refused = detect(bwrap=str(refusing))
    assert refused == detect(bwrap=str(refusing))  # probed once, then cached
    assert refused.mode == "process" and "No permissions to create new namespace" in refused.reason
    with pytest.raises(RuntimeError, match="required"):
        detect("namespaces", bwrap=str(refusing))
    assert detect("process").mode == "process"
    with pytest.raises(ServerError) as info:
        PythonSandboxEnv(isolation="containers")
    assert info.value.code is ErrorCode.VALIDATION_ERROR


# --------------------------------------------------------------------------- through a real server


async def test_ws_sessions_do_not_block_each_other(spawn_server: Any, http: aiohttp.ClientSession) -> None:
    server = spawn_server("--env", "python_sandbox", "--env-options", json.dumps({"timeout": 2.0}))
    slow = await http.ws_connect(server.ws_url + "/ws")
    fast = await http.ws_connect(server.ws_url + "/ws")
    try:
        for ws in (slow, fast):
            await ws.send_str(json.dumps({"type": "reset", "data": {}}))
            reply = json.loads(await ws.receive_str(timeout=15))
            assert reply["type"] == "observation" and reply["data"]["done"] is False
        looping = asyncio.create_task(ws_step(slow, "while True:\n    pass"))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        first = await ws_step(fast, "x = 1")
        for _ in range(20):
            data = await ws_step(fast, "x += 1\nprint(x)")
        assert time.monotonic() - start < 1.0 and not looping.done()
        assert first["reward"] == 0.0 and data["observation"]["stdout"] == "21\n" and data["done"] is False
        timed_out = await looping
        assert timed_out["observation"]["timed_out"] and timed_out["observation"]["state_lost"]
        assert (await ws_step(slow, "print('again')"))["observation"]["stdout"] == "again\n"
        await fast.send_str(json.dumps({"type": "state", "data": {}}))
        state = json.loads(await fast.receive_str(timeout=5))
        assert state["data"]["execution_count"] == 21
    finally:
        await slow.close()
        await fast.close()
    assert server.get_json("/health") == (200, {"status": "healthy"})
    status, schema = server.get_json("/schema")
    assert status == 200 and "code" in json.dumps(schema["action"])


# --------------------------------------------------------------------------- the grader's value encoding


def test_the_encoding_is_exact_about_types_and_canonical_about_order() -> None:
    from envserver.envs.sandbox.harness import Unencodable, canonical, decode_value, encode_value

    values = [None, True, 0, -(2**53) + 1, 2**53, -(2**70), 1.5, -0.0, float("inf"), "é\ud800", b"\x00",
              [1, "a", [True]], (1, (2,)), {"b": 1, "a": [None]}, {3, 1, 2}, frozenset({"x"})]  # fmt: skip
    for value in values:
        back = decode_value(json.loads(canonical(value)))
        assert type(back) is type(value) and canonical(back) == canonical(value), value
    assert canonical(1) != canonical(True) != canonical(1.0)
    assert canonical([1, 2]) != canonical((1, 2)) and canonical({1}) != canonical(frozenset({1}))
    assert canonical({"a": 1, "b": 2}) == canonical({"b": 2, "a": 1}) and canonical({2, 1}) == canonical({1, 2})

    class Sub(list):  # noqa: FURB189 - the point is the subclass
        pass

    class Same:
        def __eq__(self, other: object) -> bool:
            return True

    for bad in (Sub(), [Sub()], (Same(),), {1: object()}, {object()}):
        with pytest.raises(Unencodable):
            encode_value(bad)
    nested: list[Any] = []
    for _ in range(100):
        nested = [nested]
    with pytest.raises(Unencodable, match="deeper"):
        encode_value(nested)
    for forged in (["list", "x"], ["nope", []], 2**60, ["dict", [[1]]], 1.5, {"a": 1}):
        with pytest.raises(ValueError):
            decode_value(forged)
