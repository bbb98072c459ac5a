"""Shared fixtures: real envserver processes on port 0, and an aiohttp client session.

``spawn_server(*args)`` starts ``python -m envserver --port 0 *args`` (or a given Python
snippet that ends up calling ``envserver.__main__.main``), waits until ``/health``
answers and returns a ``ServerProcess``; every process is terminated and waited for
in ``finally``. ``shared_server(*args)`` does the same once per test session and
argument list, for the many tests that only read from a server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest

STARTUP_TIMEOUT = 20.0
IN_CI = os.environ.get("CI") == "true"  # CI runs every test for real: what is missing fails a test instead of skipping it


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI=true, fail it instead."""
    if IN_CI:
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


class ServerProcess:
    """One envserver subprocess: its URL, its process, and its captured stderr."""

    def __init__(self, args: tuple[str, ...], script: str | None = None, env: dict[str, str] | None = None) -> None:
        self.args = args
        self._dir = tempfile.TemporaryDirectory(prefix="envserver-test-")
        self.stdout_path = Path(self._dir.name) / "stdout"
        self.stderr_path = Path(self._dir.name) / "stderr"
        command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "envserver", *args]
        if "--port" not in args:
            command += ["--port", "0"]
        self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in stop()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            env={**os.environ, **(env or {})},
        )
        self.url = ""
        self.exit_code: int | None = None

    # -- life cycle

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT, token: str | None = None) -> ServerProcess:
        """Wait for the 'listening on' line, then for /health to answer 200."""
        deadline = time.monotonic() + timeout
        while not self.url:
            first = self.stdout_path.read_text().partition("\n")
            if first[1] and " listening on " in first[0]:
                self.url = first[0].rsplit(" ", 1)[-1]
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"envserver {self.args} exited with {self.proc.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envserver {self.args} printed no URL in {timeout} s:\n{self.stderr()}")
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        while True:
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers=headers), timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"envserver {self.url} not healthy in {timeout} s:\n{self.stderr()}")
            time.sleep(0.02)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait (SIGKILL if it does not exit in ``timeout``); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def stop(self) -> None:
        try:
            self.terminate()
        finally:
            self._stdout.close()
            self._stderr.close()
            self._dir.cleanup()

    # -- observations

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :]

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """A blocking GET (for sync tests and setup); returns status and decoded body."""
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"null")

    def __repr__(self) -> str:
        return f"ServerProcess({self.url or '?'}, args={self.args})"


ServerFactory = Callable[..., ServerProcess]


def _launch(args: tuple[str, ...], script: str | None, token: str | None, env: dict[str, str] | None) -> ServerProcess:
    server = ServerProcess(args, script, env)
    try:
        return server.wait_ready(token=token)
    except BaseException:
        server.stop()
        raise


def _token_of(args: tuple[str, ...]) -> str | None:
    return args[args.index("--token") + 1] if "--token" in args else None


@pytest.fixture
def spawn_server() -> Iterator[ServerFactory]:
    """Start envserver subprocesses for one test: ``spawn_server("--env", "echo", script=None)``."""
    started: list[ServerProcess] = []

    def spawn(*args: str, script: str | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        server = _launch(args, script, _token_of(args), env)
        started.append(server)
        return server

    try:
        yield spawn
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def shared_server() -> Iterator[ServerFactory]:
    """Like ``spawn_server`` but one process per distinct argument list for the whole run.

    For tests that leave the server as they found it (they close what they open).
    """
    started: dict[tuple[Any, ...], ServerProcess] = {}

    def spawn(*args: str, script: str | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        key = (args, script, tuple(sorted((env or {}).items())))
        server = started.get(key)
        if server is None or server.proc.poll() is not None:
            server = started[key] = _launch(args, script, _token_of(args), env)
        return server

    try:
        yield spawn
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="session")
def catch_server(shared_server: ServerFactory) -> ServerProcess:
    """One OpenSpiel server (default game catch) shared by the whole run."""
    return shared_server("--env", "openspiel", "--game", "catch")


@pytest.fixture(scope="session")
def echo_server(shared_server: ServerFactory) -> ServerProcess:
    """One echo server shared by the whole run."""
    return shared_server("--env", "echo")


# An envserver whose registry also holds two test environments: ``faulty`` (an echo whose
# step raises on the message "boom", an unexpected error) and ``slow_echo`` (a blocking echo
# run in worker threads). Defined here, run in a real subprocess.
TEST_ENVS_SCRIPT = """
import sys, time
from envserver import envs
from envserver.envs.echo import EchoEnv

class FaultyEnv(EchoEnv):
    name = "faulty"
    description = "An echo that raises RuntimeError on the message 'boom'."

    def step(self, action):
        if action.message == "boom":
            raise RuntimeError("boom went the environment")
        return super().step(action)

class SlowEchoEnv(EchoEnv):
    name = "slow_echo"
    description = "A blocking echo: each step sleeps a little in a worker thread."
    blocking = True

    def step(self, action):
        time.sleep(0.002 * (len(action.message) % 3))
        return super().step(action)

envs.register("faulty", FaultyEnv)
envs.register("slow_echo", SlowEchoEnv)
sys.argv[0] = "envserver"
from envserver.__main__ import main
main()
"""


@pytest.fixture(scope="session")
def test_envs_server(shared_server: ServerFactory) -> ServerProcess:
    """A server whose default env is ``faulty``, that also serves ``slow_echo`` (see above)."""
    return shared_server("--env", "faulty", "--env", "slow_echo", script=TEST_ENVS_SCRIPT)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session (HTTP and WebSocket), closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


# --------------------------------------------------------------------------- mux client for tests


class MuxClient:
    """A deliberately plain ``/v1/mux`` client for tests: build requests, send frames, read replies."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        from envserver import protocol

        self.ws = ws
        self._protocol = protocol
        self._ids = 0
        self._decoder = protocol.msgpack_decoder(list[protocol.Reply])

    def req(self, op: str, sid: Any, *fields: Any) -> Any:
        """A request struct with a fresh id: ``req("step", 3, 1)``, ``req("steps", [3, 4], [1, 0])``."""
        p = self._protocol
        cls = {
            "open": p.Open,
            "reset": p.Reset,
            "step": p.Step,
            "state": p.GetState,
            "close": p.Close,
            "ping": p.Ping,
            "steps": p.StepMany,  # sid: the list of sids
            "resets": p.ResetMany,
        }[op]
        self._ids += 1
        return cls(self._ids, sid, *fields)

    async def send(self, requests: list[Any]) -> None:
        await self.ws.send_bytes(self._protocol.msgpack_encoder.encode(requests))

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self, timeout: float = 10.0) -> list[Any]:
        """One reply frame, decoded untyped (tensors as ``[shape, bytes, dtype]``, errors as dicts)."""
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.BINARY:
            raise AssertionError(f"expected a binary reply frame, got {message.type!r}: {message.data!r}")
        replies: list[Any] = self._decoder.decode(message.data)
        return replies

    async def call(self, *requests: Any, timeout: float = 10.0) -> list[Any]:
        """Send ``requests`` as one frame; return their replies in request order."""
        await self.send(list(requests))
        wanted = {r.id for r in requests}
        got: dict[int, Any] = {}
        while wanted - got.keys():
            for reply in await self.recv(timeout):
                got[reply.id] = reply
        return [got[r.id] for r in requests]

    async def one(self, op: str, sid: int, *fields: Any) -> Any:
        """One request, one reply; return the reply body, raising if it is an error."""
        (reply,) = await self.call(self.req(op, sid, *fields))
        if not reply.ok:
            raise AssertionError(f"{op} on session {sid} failed: {reply.body}")
        return reply.body

    async def ping(self) -> None:
        """Prove the connection still answers."""
        (reply,) = await self.call(self.req("ping", 0))
        assert reply.ok, reply


@pytest.fixture
async def mux_connect(http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    """``await mux_connect(server, headers=...)`` opens a ``/v1/mux`` connection, closed after the test."""
    opened: list[aiohttp.ClientWebSocketResponse] = []

    async def connect(server: ServerProcess, **kwargs: Any) -> MuxClient:
        ws = await http.ws_connect(server.ws_url + "/v1/mux", max_msg_size=64 * 1024 * 1024, **kwargs)
        opened.append(ws)
        return MuxClient(ws)

    try:
        yield connect
    finally:
        for ws in opened:
            await ws.close()
