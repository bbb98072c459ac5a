"""The child side of the Python sandbox: one persistent interpreter driven over two pipes.

The parent (``sandbox_interpreter.py``) runs this file's source with ``python -s -c`` in
a fresh sandbox (``sandbox_isolation.py``: its own namespaces when the kernel allows), in its own session, with the user's stdout/stderr on pipes the parent
reads and a separate pair of control pipes for length-prefixed msgpack frames. Only
the standard library and msgspec are imported here, before the limits are applied.

What this side enforces (the parent enforces the wall clock and kills):

* rlimits: address space, CPU seconds for the life of the interpreter, file size,
  processes (RLIMIT_NPROC, which the kernel ignores for root), no core files;
* a cap on live processes in the sandbox's session, checked by an audit hook before
  every fork/spawn (so it holds when running as root too), and no signals to
  processes outside the session;
* per-step output caps on ``sys.stdout``/``sys.stderr`` (the parent also caps raw fd
  writes);
* fd 0/1/2 restored before every step, so closing stdin or stdout only affects the
  step that did it.

The audit hook is a guard against runaway code, not a security boundary: isolation
from the host and from other sessions is the namespaces' job (``sandbox_isolation.py``),
or the container's. This interpreter never grades: its namespace is the agent's, so the
hidden tests run elsewhere (``sandbox_grader.py``).
"""

from __future__ import annotations

import ast
import io
import linecache
import mmap
import os
import signal
import sys
import time
import traceback
import types
from typing import Any

import msgspec

# --------------------------------------------------------------------------- messages (shared with the parent)


class Exec(msgspec.Struct, tag="exec", array_like=True):
    seq: int
    code: str


class Hello(msgspec.Struct, tag="hello", array_like=True):
    pid: int


class ExecDone(msgspec.Struct, tag="done", array_like=True):
    seq: int
    exception_type: str | None
    exception_message: str | None
    stdout_bytes: int  # what the code wrote through sys.stdout, kept or not
    stderr_bytes: int
    spawned: bool  # the interpreter has started a process at some point


Request = Exec
Reply = Hello | ExecDone

WORKER_FILENAME = "<sandbox>"  # the name this source runs under in the child
BOOTSTRAP = f"import sys; exec(compile(sys.argv[1], {WORKER_FILENAME!r}, 'exec'))"
HEADER = 4  # little-endian frame length
MAX_MESSAGE = 512
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)


def frame(message: Any) -> bytes:
    body = _encoder.encode(message)
    return len(body).to_bytes(HEADER, "little") + body


def proc_stat(pid: int | str) -> list[bytes]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...; [] if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rindex(b")") + 2 :].split()


# --------------------------------------------------------------------------- output streams


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _CappedBytes:
    """``sys.stdout.buffer``: bytes go to the fd until the per-step cap, then are only counted."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.kept = 0
        self.total = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = memoryview(data).nbytes
        self.total += size
        room = self.limit - self.kept
        if room > 0:
            chunk = bytes(data[:room])
            write_all(self.fd, chunk)
            self.kept += len(chunk)
        return size

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


class CappedText(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the sandbox: written through to the fd, capped per step."""

    def __init__(self, fd: int, limit: int, name: str) -> None:
        super().__init__()
        self.buffer = _CappedBytes(fd, limit)
        self._name = name

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        buffer = self.buffer
        if buffer.kept >= buffer.limit:  # over the cap: only count (cheaply, for floods)
            buffer.total += len(s) if s.isascii() else len(s.encode("utf-8", "backslashreplace"))
        else:
            buffer.write(s.encode("utf-8", "backslashreplace"))
        return len(s)

    def fileno(self) -> int:
        return self.buffer.fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def start_step(self) -> None:
        self.buffer.kept = self.buffer.total = 0


# --------------------------------------------------------------------------- the interpreter


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.pid = os.getpid()
        self.ctl_in: int = config["ctl_in"]
        self.ctl_out: int = config["ctl_out"]
        self.max_processes: int = config["max_processes"]
        self.spawned = False
        self.tripped = mmap.mmap(-1, 1)  # shared memory: set when any process of the sandbox hits the limit
        for fd in (self.ctl_in, self.ctl_out):
            os.set_inheritable(fd, False)  # the user's subprocesses must not hold the control pipes
        # Private copies of the standard fds, restored before every step.
        self.saved = {fd: os.dup(fd) for fd in (0, 1, 2)}
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.stdout = CappedText(1, config["max_output"], "<stdout>")
        self.stderr = CappedText(2, config["max_output"], "<stderr>")
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        self.namespace = main.__dict__
        self.cells = 0
        self._inbox = bytearray()
        if config.get("seed") is not None:
            import random

            random.seed(config["seed"])

    # -- guards

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn"):
            self.spawned = True
            if self.tripped[0] or len(self._session_pids()) >= self.max_processes:
                self.tripped[0] = 1  # shared with every fork: they all stop at their next attempt
                self._refuse()
        elif event in ("os.kill", "os.killpg"):
            pid = int(args[0])
            if event == "os.killpg" or pid < 0:
                if abs(pid) not in (0, self.pid) and self._session_of(abs(pid)) != self.pid:
                    raise PermissionError(1, f"the sandbox may not signal process group {abs(pid)}")
            elif pid not in (0, os.getpid()) and self._session_of(pid) != self.pid:
                raise PermissionError(1, f"the sandbox may only signal its own processes, not pid {pid}")

    def _session_of(self, pid: int) -> int | None:
        fields = proc_stat(pid)
        return int(fields[3]) if fields else None

    def _session_pids(self, zombies: bool = False) -> list[int]:
        """Processes in the sandbox's session, the interpreter included; zombies only if asked."""
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                fields = proc_stat(int(name))
                if fields and (zombies or fields[0] != b"Z") and int(fields[3]) == self.pid:
                    pids.append(int(name))
        return pids

    def _refuse(self) -> None:
        """The process limit is reached: a fork of the interpreter ends; the interpreter kills the others.

        Without this a fork bomb would keep running at the limit in the background.
        """
        if os.getpid() != self.pid:
            os._exit(1)
        for _ in range(100):
            others = [pid for pid in self._session_pids() if pid != self.pid]
            if not others:
                break
            for pid in others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        # A killed process dies a moment later (and an orphan becomes our child only then): reap until none is left.
        deadline = time.monotonic() + 2.0
        while True:
            self.reap_children()
            if self._session_pids(zombies=True) == [self.pid] or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        self.tripped[0] = 0
        raise BlockingIOError(
            11, f"sandbox process limit reached ({self.max_processes} processes): every other process of the sandbox was killed"
        )

    @staticmethod
    def reap_children() -> None:
        """Collect children that already exited (a finished fork bomb leaves many)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    # -- control channel

    def send(self, message: Any) -> None:
        write_all(self.ctl_out, frame(message))

    def receive(self) -> Request | None:
        while True:
            if len(self._inbox) >= HEADER:
                size = int.from_bytes(self._inbox[:HEADER], "little")
                if len(self._inbox) >= HEADER + size:
                    body = bytes(self._inbox[HEADER : HEADER + size])
                    del self._inbox[: HEADER + size]
                    return _request_decoder.decode(body)
            chunk = os.read(self.ctl_in, 1 << 16)
            if not chunk:
                return None
            self._inbox += chunk

    def serve(self) -> None:
        self.send(Hello(self.pid))
        while True:
            request = self.receive()
            if request is None:  # the parent closed the pipe: we are done
                return
            self.send(self.execute(request))

    # -- steps

    def _restore_stdio(self) -> None:
        if self.spawned:
            self.reap_children()
        for fd, copy in self.saved.items():
            os.dup2(copy, fd)
        self.stdout.start_step()
        self.stderr.start_step()
        sys.stdout, sys.stderr = self.stdout, self.stderr
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")

    def execute(self, request: Exec) -> ExecDone:
        self._restore_stdio()
        self.cells += 1
        filename = f"<cell {self.cells}>"
        linecache.cache[filename] = (len(request.code), None, request.code.splitlines(True), filename)
        error: BaseException | None = None
        try:
            self._run_cell(request.code, filename)
        except BaseException as exc:  # the user's exception, SystemExit included, is the observation
            error = exc
        if os.getpid() != self.pid:  # a fork of the interpreter finished the cell: it must not answer
            os._exit(1 if error else 0)
        etype = emessage = None
        if error is not None:
            etype, emessage = self._report(error)
        return ExecDone(request.seq, etype, emessage, self.stdout.buffer.total, self.stderr.buffer.total, self.spawned)

    def _run_cell(self, code: str, filename: str) -> None:
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        assert last is None or isinstance(last, ast.Expr)
        exec(compile(tree, filename, "exec"), self.namespace)
        if last is not None:  # like a REPL: show the value of a final expression
            value = eval(compile(ast.Expression(last.value), filename, "eval"), self.namespace)
            if value is not None:
                self.namespace["_"] = value
                sys.stdout.write(repr(value) + "\n")

    def _report(self, error: BaseException) -> tuple[str, str]:
        try:
            report = traceback.TracebackException.from_exception(error)
            for link in (report, report.__cause__, report.__context__):
                if link is not None:  # hide the worker's own frames
                    link.stack = traceback.StackSummary.from_list([f for f in link.stack if f.filename != WORKER_FILENAME])
            text = "".join(report.format())
            message = str(error)
        except BaseException as exc:  # a user __str__ that fails
            text, message = f"{type(error).__name__}: <unprintable: {type(exc).__name__}>\n", "<unprintable>"
        try:
            sys.stderr = self.stderr
            self.stderr.write(text)
        except OSError:
            pass
        return type(error).__name__, message[:2000]


def _apply_limits(config: dict[str, Any]) -> None:
    import resource

    limits = {
        resource.RLIMIT_AS: config["memory_bytes"],
        resource.RLIMIT_FSIZE: config["file_bytes"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: config["nproc"],
    }
    for kind, value in limits.items():
        if value is not None:
            resource.setrlimit(kind, (value, value))
    cpu = config["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit ends the interpreter


def _become_subreaper() -> None:
    """Orphans of the sandbox's processes become ours, not init's: they stay findable and get reaped."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def main() -> None:
    config = msgspec.json.decode(sys.argv[2])
    sys.argv = [""]
    if os.getsid(0) != os.getpid():  # under bubblewrap the namespace's init leads the session: lead our own
        os.setsid()
    worker = Worker(config)
    _become_subreaper()
    sys.addaudithook(worker.audit)
    _apply_limits(config)
    worker.serve()


if __name__ == "__main__":
    main()
