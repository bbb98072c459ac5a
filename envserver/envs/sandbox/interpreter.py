"""The parent side of the Python sandbox: start, drive, time out and kill one interpreter process.

The interpreter is started in a sandbox of its own (``isolation.spawn``): in
namespace mode a private tmpfs, pid and network namespace, so sessions cannot see each
other. Every call blocks (the environment is ``blocking = True``, so it runs in a worker thread)
but never past its deadline: the parent polls the control and output pipes with the
time left, and when the deadline passes it kills the interpreter's whole process group
(plus any descendant that left it) and reaps the interpreter. ``kill`` may be called
from any thread, while another one is in the middle of a step.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import math
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from .isolation import Isolation, exit_status, kill_tree, spawn
from .worker import BOOTSTRAP, HEADER, MAX_MESSAGE, Exec, ExecDone, Hello, Reply, frame, write_all

log = logging.getLogger("envserver.sandbox")

WORKER_SOURCE = Path(__file__).with_name("worker.py").read_text()
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_F_SETPIPE_SZ = 1031
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_EXIT_WAIT = 1.0  # seconds the interpreter may take to exit after closing its control pipe
_live: set[Interpreter] = set()  # not yet released; closed at exit (a cleanup still queued at shutdown)


class SandboxLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one interpreter may use."""

    cpu_seconds: int = 120  # CPU time for the life of the interpreter (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_output_bytes: int = 64 * 1024  # per stream and step; the rest is dropped and flagged
    max_processes: int = 32  # live processes in the sandbox, the interpreter included
    max_file_mb: int = 64  # largest file the code may write (RLIMIT_FSIZE)
    disk_mb: int = 256  # size of the private tmpfs working directory (namespace mode)


class StartError(Exception):
    """The interpreter could not be started (``errno`` set when the OS refused)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class Capture:
    """One output stream of one call: the first ``limit`` bytes, and how many arrived."""

    __slots__ = ("limit", "parts", "kept", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.seen = 0

    def add(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        room = self.limit - self.kept
        if room > 0:
            part = chunk[:room]
            self.parts.append(part)
            self.kept += len(part)

    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8", "replace")


class Outcome(msgspec.Struct):
    """What happened during one call into the interpreter."""

    reply: Any  # ExecDone, or None when the call did not finish
    stdout: Capture
    stderr: Capture
    wall_time: float
    timed_out: bool = False
    exit_code: int | None = None  # set when the interpreter ended during the call
    broken: str | None = None  # the control channel failed (closed, corrupt)

    @property
    def lost(self) -> bool:
        return self.reply is None


class Interpreter:
    """One persistent Python interpreter in a child process, with its pipes and working directory."""

    def __init__(self, limits: SandboxLimits, isolation: Isolation, seed: int | None = None) -> None:
        self.limits = limits
        self.isolation = isolation
        self.seed = seed
        self.spawned = False  # the code started processes: kill must look for escaped ones
        self._proc: subprocess.Popen[bytes] | None = None
        self._fds: list[int] = []
        self._workdir: str | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._close_requested = False
        self._released = False
        self._seq = 0
        self._inbox = bytearray()

    # -- life cycle

    def start(self, timeout: float) -> None:
        """Spawn the interpreter and wait for its hello; raise ``StartError`` on failure."""
        _live.add(self)
        try:
            self._spawn()
        except OSError as exc:
            self.close()
            raise StartError(f"cannot start a sandbox interpreter: {exc.strerror or exc}", exc.errno) from exc
        outcome = self._wait_reply(None, time.monotonic() + timeout, Capture(0), Capture(4096))
        if not isinstance(outcome.reply, Hello):
            detail = outcome.stderr.text().strip().splitlines()
            self.close()
            why = "timed out" if outcome.timed_out else outcome.broken or f"exit status {outcome.exit_code}"
            raise StartError(f"sandbox interpreter failed to start ({why}){': ' + detail[-1] if detail else ''}")

    def _spawn(self) -> None:
        limits = self.limits
        child_fds: list[int] = []
        try:
            for _ in range(4):  # control in, control out, stdout, stderr
                read_end, write_end = os.pipe()
                self._fds.append(read_end)
                child_fds.append(write_end)
            # The parent writes requests and reads the rest: swap the request pipe's ends.
            self._fds[0], child_fds[0] = child_fds[0], self._fds[0]
            ctl_in_r, ctl_out_w, out_w, err_w = child_fds
            for fd in self._fds[2:]:
                try:
                    fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)  # fewer wake-ups when the code floods its output
                except OSError:
                    pass
            namespaced = self.isolation.mode == "namespaces"
            config = {
                "ctl_in": ctl_in_r,
                "ctl_out": ctl_out_w,
                "max_output": limits.max_output_bytes,
                "max_processes": limits.max_processes,
                "memory_bytes": limits.memory_mb << 20,
                "file_bytes": limits.max_file_mb << 20,
                "cpu_seconds": limits.cpu_seconds,
                # RLIMIT_NPROC counts every process of the uid, which all namespaced sandboxes share.
                "nproc": None if namespaced else _nproc_limit(limits.max_processes),
                "seed": self.seed,
            }
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONHASHSEED": str(self.seed % 2**32) if self.seed is not None else "random",
            }
            spawned = spawn(
                [sys.executable, "-s", "-c", BOOTSTRAP, WORKER_SOURCE, msgspec.json.encode(config).decode()],
                self.isolation,
                env=env,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(ctl_in_r, ctl_out_w),
                disk_mb=limits.disk_mb,
            )
            self._proc, self._workdir = spawned.proc, spawned.workdir
            # Readable when the interpreter exits, even if a fork of it still holds the pipes.
            self._fds.append(os.pidfd_open(self._proc.pid))
        finally:
            for fd in child_fds:
                os.close(fd)
        self._poll = select.poll()
        for fd in self._fds[1:]:
            os.set_blocking(fd, False)
            self._poll.register(fd, _READ)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL the interpreter, its process group and (if it ever forked) its descendants."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                return  # never started, or reaped: its pid may belong to someone else now
            kill_tree(proc, self.isolation, strays=self.spawned)

    def close(self) -> None:
        """Kill the interpreter and free everything; a call in progress in another thread frees it when it returns."""
        self.kill()
        with self._lock:
            if self._busy:
                self._close_requested = True
                return
        self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._reap(5.0)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        _live.discard(self)

    def _reap(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for the interpreter to exit; its exit status (None if still running)."""
        proc = self._proc
        if proc is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                code = proc.poll()
            if code is not None or time.monotonic() >= deadline:
                return exit_status(code, self.isolation)
            time.sleep(0.002)

    # -- calls

    def execute(self, code: str, timeout: float) -> Outcome:
        """Run one cell of code; kill the interpreter when ``timeout`` seconds pass."""
        self._seq += 1
        return self._call(Exec(self._seq, code), timeout)

    def _call(self, request: Exec, timeout: float) -> Outcome:
        limit = self.limits.max_output_bytes
        with self._lock:
            if self._released or self._close_requested or self._proc is None:
                return Outcome(None, Capture(0), Capture(0), 0.0, broken="the interpreter was closed")
            self._busy = True
        try:
            start = time.monotonic()
            try:
                write_all(self._fds[0], frame(request))
            except OSError:
                pass  # the interpreter is gone: the control pipe reports it below
            outcome = self._wait_reply(request.seq, start + timeout, Capture(limit), Capture(limit))
            outcome.wall_time = time.monotonic() - start
            if isinstance(outcome.reply, ExecDone):
                self.spawned = self.spawned or outcome.reply.spawned
            return outcome
        finally:
            with self._lock:
                self._busy = False
                release = self._close_requested
            if release:
                self._release()

    def _wait_reply(self, seq: int | None, deadline: float, out: Capture, err: Capture) -> Outcome:
        ctl, pidfd = self._fds[1], self._fds[4]
        sinks = {self._fds[2]: out, self._fds[3]: err}
        reply: Any = None
        broken: str | None = None
        timed_out = False
        start = time.monotonic()
        while reply is None and broken is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for fd, _ in self._poll.poll(math.ceil(remaining * 1000)):
                if fd == pidfd:  # the interpreter exited: a reply may still sit in the control pipe
                    self._poll.unregister(fd)
                    while chunk := _read(ctl):
                        self._inbox += chunk
                    try:
                        reply = self._next_reply(seq)
                    except ValueError as exc:
                        broken = str(exc)
                    if reply is None and broken is None:
                        broken = "the interpreter exited"
                    break
                chunk = _read(fd)
                if chunk is None:
                    continue
                if fd != ctl:
                    if chunk:
                        sinks[fd].add(chunk)
                    else:
                        self._poll.unregister(fd)  # EOF on an output pipe: the interpreter closed it
                    continue
                if not chunk:
                    # Under bubblewrap the pipe closes a moment before the sandbox's pid exits: wait for it.
                    if select.select([pidfd], [], [], _EXIT_WAIT)[0]:
                        self._poll.unregister(fd)
                        continue
                    broken = "the interpreter closed its control channel"
                    break
                self._inbox += chunk
                try:
                    reply = self._next_reply(seq)
                except ValueError as exc:
                    broken = str(exc)
                    break
        self._drain(sinks)
        outcome = Outcome(reply, out, err, time.monotonic() - start, timed_out=timed_out, broken=broken)
        if reply is None:
            self.kill()
            outcome.exit_code = self._reap(2.0)
            self._drain(sinks)
        return outcome

    def _next_reply(self, seq: int | None) -> Any:
        inbox = self._inbox
        if len(inbox) < HEADER:
            return None
        size = int.from_bytes(inbox[:HEADER], "little")
        if size > MAX_MESSAGE:
            raise ValueError(f"control channel corrupted: a {size}-byte frame")
        if len(inbox) < HEADER + size:
            return None
        body = bytes(inbox[HEADER : HEADER + size])
        del inbox[: HEADER + size]
        try:
            reply = _reply_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"control channel corrupted: {exc}") from None
        if (seq is None) != isinstance(reply, Hello) or (isinstance(reply, ExecDone) and reply.seq != seq):
            raise ValueError(f"control channel corrupted: unexpected {type(reply).__name__}")
        if inbox:
            raise ValueError("control channel corrupted: data after the reply")
        return reply

    def _drain(self, sinks: dict[int, Capture]) -> None:
        """Read what the output pipes already hold, without waiting."""
        for fd, sink in sinks.items():
            while True:
                chunk = _read(fd)
                if not chunk:
                    break
                sink.add(chunk)


def _read(fd: int) -> bytes | None:
    """Up to 1 MiB from a non-blocking fd: b"" at EOF, None when nothing is there."""
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.EIO):
            return b""
        raise


def _nproc_limit(max_processes: int) -> int | None:
    """RLIMIT_NPROC for a child: it counts every task of the user, so add what already runs.

    The kernel ignores it for root; the worker's audit hook caps processes in that case.
    """
    uid = os.getuid()
    if uid == 0:
        return None
    tasks = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status", "rb") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
            if int(fields.get(b"Uid", b"-1 ").split()[0]) == uid:
                tasks += int(fields.get(b"Threads", b"1"))
    return tasks + max_processes


@atexit.register
def _close_all() -> None:
    for interpreter in list(_live):
        interpreter.close()
