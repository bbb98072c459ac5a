"""The JSONL file of an evaluation job: one header line, then one line per finished episode.

    {"envfleet_eval":1,"env":"openspiel","options":{"game":"tic_tac_toe"},"seed":0,"policy":"random","episodes":10000,"created":1717000000.0}
    {"episode":0,"seed":4128…,"return":1.0,"length":4,"outcome":"win","wall_time":0.0021,"server":"http://127.0.0.1:41873","time":1717000000.3}

The header names the job; a resume must match its env, options (game), seed and policy.
Episode lines are appended in the order episodes finish, each with one ``write`` call, and
the file is fsync'd about once a second and on close. A job killed mid-write leaves at
most one half-written last line: ``ResultsFile.open`` removes it (and says how many bytes)
before anything is appended, so every episode is in the file exactly once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Literal

import msgspec

from ..errors import EvalError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
Outcome = Literal["win", "draw", "loss"]


class Header(msgspec.Struct, kw_only=True):
    """The first line: what job wrote the file."""

    envfleet_eval: int = FORMAT_VERSION
    env: str
    options: dict[str, Any]
    seed: int
    policy: str
    episodes: int
    created: float = 0.0

    def differences(self, other: Header) -> list[str]:
        """How ``other`` is a different job from this one (empty: a resume may append)."""
        return [
            f"{name} {getattr(self, name)!r} in the file, {getattr(other, name)!r} now"
            for name in ("env", "options", "seed", "policy")
            if getattr(self, name) != getattr(other, name)
        ]


class EpisodeLine(msgspec.Struct, kw_only=True, gc=False):
    """One finished episode."""

    episode: int
    seed: int
    ret: float = msgspec.field(name="return")  # the agent's return
    length: int
    outcome: Outcome | None = None  # 2-player zero-sum games only
    wall_time: float = 0.0
    server: str = ""
    time: float = 0.0  # unix time it finished


_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(EpisodeLine).decode
_decode_header = msgspec.json.Decoder(Header).decode


class Contents(msgspec.Struct):
    """What a results file holds: its header, its episodes, and the bytes worth keeping."""

    header: Header | None
    episodes: list[EpisodeLine]
    size: int  # length of the valid part (header and complete episode lines)
    dropped: int = 0  # bytes of a half-written last line past ``size``


def parse(data: bytes, path: str) -> Contents:
    """Parse a results file; a corrupt last line is left out (``dropped``), any other is an error."""
    if not data:
        return Contents(None, [], 0)
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" when the file ends cleanly
    if not lines:  # only a half-written header: start over
        return Contents(None, [], 0, len(data))
    size, dropped = len(data) - len(tail), len(tail)
    try:
        header = _decode_header(lines[0])
    except msgspec.DecodeError:
        raise EvalError(f"{path} is not an envfleet eval file (line 1 is no header); use another --out") from None
    if header.envfleet_eval != FORMAT_VERSION:
        raise EvalError(f"{path} has format version {header.envfleet_eval}; this envfleet reads version {FORMAT_VERSION}")
    episodes: list[EpisodeLine] = []
    seen: set[int] = set()
    last = len(lines) - 1
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = _decode_line(line)
        except msgspec.DecodeError as exc:
            if number - 1 == last and not tail:  # the last line is complete but garbage (e.g. NULs after a crash)
                dropped, size = len(line) + 1, size - len(line) - 1
                break
            raise EvalError(f"{path}: line {number} is corrupt ({exc}); not touching the file") from None
        if record.episode in seen:
            raise EvalError(f"{path}: episode {record.episode} is recorded twice (line {number}); was the file written by two jobs?")
        seen.add(record.episode)
        episodes.append(record)
    return Contents(header, episodes, size, dropped)


def read(path: str | os.PathLike[str]) -> Contents:
    """Read a results file without changing it."""
    with open(path, "rb") as f:
        return parse(f.read(), os.fspath(path))


class ResultsFile:
    """A results file open for appending by one job (an exclusive lock keeps out a second one)."""

    def __init__(self, path: str, fd: int, contents: Contents, fsync_interval: float) -> None:
        self.path = path
        self.contents = contents
        self._fd = fd
        self._fsync_interval = fsync_interval
        self._last_sync = time.monotonic()
        self._syncing: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], header: Header, *, fsync_interval: float = 1.0) -> ResultsFile:
        """Open (or create) ``path`` for ``header``'s job: check it is the same job, drop a half-written tail."""
        name = os.fspath(path)
        directory = os.path.dirname(name)
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise EvalError(f"{name} is being written by another job") from None
            chunks, offset = [], 0
            while chunk := os.pread(fd, 1 << 20, offset):
                chunks.append(chunk)
                offset += len(chunk)
            contents = parse(b"".join(chunks), name)
            if contents.header is not None:
                if diffs := contents.header.differences(header):
                    raise EvalError(f"{name} was written by a different job ({'; '.join(diffs)}); use another --out")
            if contents.dropped:
                os.ftruncate(fd, contents.size)
            if contents.header is None:
                os.ftruncate(fd, 0)
                _write_all(fd, _encode(header) + b"\n")
                os.fsync(fd)
                contents.header = header
                contents.size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, contents, fsync_interval)

    def append(self, line: EpisodeLine) -> None:
        """Write one episode line now (one write call); fsync in a worker thread about once a second."""
        _write_all(self._fd, _encode(line) + b"\n")
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_interval and (self._syncing is None or self._syncing.done()):
            self._last_sync = now
            self._syncing = asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)

    async def close(self) -> None:
        """Wait for a pending fsync, fsync once more and release the file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._syncing is not None:
                await asyncio.shield(self._syncing)
            await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)
        finally:
            os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
