"""A server serves what its operator named, with the operator's limits, to whom the operator allows.

Each attack is a real client against a real envserver subprocess: opening an environment the
server was not started with, setting limits from the client, driving the server from a
foreign web page (a forged ``Origin``), and starting it exposed without a token. Every
refusal is a coded error; the server stays up and opens no session (counted on /metrics)
and starts no process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from envserver.protocol import ErrorCode
from tests.conftest import ServerProcess

SANDBOX_LIMITS = '{"timeout": 5, "memory_mb": 256}'
FORGED = "http://evil.example"
PR_CAPBSET_DROP = 24  # linux/prctl.h


def sessions(server: ServerProcess, token: str | None = None) -> tuple[float, float]:
    """(active, opened in all) sessions of ``server``, from /metrics."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    values = _metrics(server, headers)
    return values["envserver_sessions_active"], values["envserver_sessions_opened_total"]


def _metrics(server: ServerProcess, headers: dict[str, str]) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(server.url + "/metrics", headers=headers), timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values


def children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


@pytest.fixture(scope="module")
def sandbox_server(shared_server):
    """A python_sandbox server whose operator set the limits."""
    return shared_server("--env", "python_sandbox", "--env-options", SANDBOX_LIMITS)


@pytest.fixture(scope="module")
def two_env_server(shared_server):
    return shared_server("--env", "openspiel", "--game", "catch", "--env", "echo")


# -- 1. a server serves what its operator named


async def test_openspiel_server_refuses_a_python_sandbox_open_on_every_surface(catch_server, http, mux_connect) -> None:
    before = sessions(catch_server)
    mux = await mux_connect(catch_server)
    (reply,) = await mux.call(mux.req("open", 1, "python_sandbox", {}))
    assert not reply.ok and reply.body["code"] == ErrorCode.FORBIDDEN
    assert "'python_sandbox'" in reply.body["message"] and "serves openspiel" in reply.body["message"]
    (reply,) = await mux.call(mux.req("reset", 1, 0))  # the refused sid names no session
    assert not reply.ok and reply.body["code"] == ErrorCode.UNKNOWN_SESSION

    async with http.ws_connect(catch_server.ws_url + "/ws?env=python_sandbox") as ws:
        frame = await ws.receive_json(timeout=10)
        assert frame["type"] == "error" and frame["data"]["code"] == "FORBIDDEN" and "python_sandbox" in frame["data"]["message"]
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE

    for method, path in (("POST", "/reset"), ("POST", "/step"), ("GET", "/state")):
        body = {"action": {"code": "print(1)"}} if path == "/step" else {}
        async with http.request(method, f"{catch_server.url}{path}?env=python_sandbox", json=body) as r:
            assert r.status == 403, path
            answer = await r.json()
            assert answer["code"] == "FORBIDDEN" and "python_sandbox" in answer["detail"]
    headers = {"X-Session-Id": "refused-1"}
    async with http.post(f"{catch_server.url}/reset?env=python_sandbox", json={}, headers=headers) as r:
        assert r.status == 403
    async with http.get(f"{catch_server.url}/state", headers=headers) as r:  # the key was not taken
        assert r.status == 404 and (await r.json())["code"] == "UNKNOWN_SESSION"

    await mux.ping()
    assert sessions(catch_server) == before
    assert children(catch_server.proc.pid) == []  # no interpreter was started
    assert catch_server.proc.poll() is None


async def test_a_server_serves_each_env_it_names_and_no_other(two_env_server, http, mux_connect) -> None:
    before = sessions(two_env_server)
    mux = await mux_connect(two_env_server)
    assert (await mux.one("open", 1))["env"] == "openspiel"  # the first is the default
    assert (await mux.one("open", 2, "echo"))["env"] == "echo"
    for env in ("python_sandbox", "no_such_env", "envserver.envs.python_sandbox:PythonSandboxEnv"):
        (reply,) = await mux.call(mux.req("open", 3, env))
        assert reply.body["code"] == ErrorCode.FORBIDDEN and "serves openspiel, echo" in reply.body["message"], env
    async with http.ws_connect(two_env_server.ws_url + "/ws?env=echo") as ws:
        await ws.send_json({"type": "reset"})
        assert (await ws.receive_json(timeout=10))["type"] == "observation"
        await ws.send_json({"type": "step", "data": {"message": "hi"}})
        assert (await ws.receive_json(timeout=10))["data"]["observation"]["echoed_message"] == "hi"
    async with http.post(two_env_server.url + "/step?env=echo", json={"action": {"message": "abc"}}) as r:
        assert r.status == 200 and (await r.json())["reward"] == pytest.approx(0.3)
    async with http.post(two_env_server.url + "/reset", json={"seed": 1}) as r:
        assert "legal_actions" in (await r.json())["observation"]
    await mux.one("close", 1)
    await mux.one("close", 2)
    assert sessions(two_env_server)[0] == before[0]


# -- 2. limits come from the operator only


async def test_client_set_limits_are_refused_on_every_surface(sandbox_server, http, mux_connect) -> None:
    before = sessions(sandbox_server)
    limits = {"timeout": 999, "memory_mb": 1 << 20}
    mux = await mux_connect(sandbox_server)
    (reply,) = await mux.call(mux.req("open", 1, None, limits))
    assert reply.body["code"] == ErrorCode.VALIDATION_ERROR
    assert "'timeout'" in reply.body["message"] and "'memory_mb'" in reply.body["message"]
    assert "max_steps, task" in reply.body["message"]  # and says what a client may set
    assert sessions(sandbox_server) == before and children(sandbox_server.proc.pid) == []

    await mux.one("open", 1, None, {"max_steps": 3})  # a session option is fine
    (reply,) = await mux.call(mux.req("reset", 1, 0, {"cpu_seconds": 9999}))
    assert reply.body["code"] == ErrorCode.VALIDATION_ERROR and "'cpu_seconds'" in reply.body["message"]
    (reply,) = await mux.call(mux.req("resets", [1], [0], {"max_processes": 4096}))
    results, failures = reply.body
    assert reply.ok and results == [None] and failures[0]["code"] == ErrorCode.VALIDATION_ERROR
    assert (await mux.one("reset", 1, 0, {"max_steps": 2}))["truncated"] is False
    await mux.one("close", 1)

    async with http.ws_connect(sandbox_server.ws_url + "/ws") as ws:
        await ws.send_json({"type": "reset", "data": {"options": {"timeout": 999}}})
        frame = await ws.receive_json(timeout=30)
        assert frame["type"] == "error" and frame["data"]["code"] == "VALIDATION_ERROR" and "'timeout'" in frame["data"]["message"]
    async with http.post(sandbox_server.url + "/reset", json={"options": {"max_file_mb": 10_000}}) as r:
        assert r.status == 422
        answer = await r.json()
        assert answer["code"] == "VALIDATION_ERROR" and "'max_file_mb'" in answer["detail"]
    assert sessions(sandbox_server)[0] == before[0]


async def test_inline_resets_check_options_too(echo_server, mux_connect) -> None:
    """Cheap environments reset on the mux's fast path; the check holds there as well."""
    mux = await mux_connect(echo_server)
    await mux.one("open", 1)
    await mux.one("open", 2)
    (reply,) = await mux.call(mux.req("reset", 1, 0, {"anything": 1}))
    assert reply.body["code"] == ErrorCode.VALIDATION_ERROR and "options a session may set: none" in reply.body["message"]
    (reply,) = await mux.call(mux.req("resets", [1, 2], [0, 0], {"anything": 1}))
    results, failures = reply.body
    assert results == [None, None] and {i: f["code"] for i, f in failures.items()} == {0: "VALIDATION_ERROR", 1: "VALIDATION_ERROR"}
    await mux.one("reset", 1, 0)


# -- 3. tokens and exposure


def _run_envserver(*args: str, stdin: bytes | None = b"", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "envserver", "--port", "0", "--lifetime", "0.5", *args],
        input=stdin.decode() if stdin is not None else None, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "stdin", "words"),
    [
        (("--host", "0.0.0.0"), b"", "refusing to serve 0.0.0.0 without a token"),
        (("--host", "::"), b"", "without a token"),
        (("--token-file", "/nonexistent/token"), b"", "/nonexistent/token"),
        (("--token-file", "-"), b"", "no token on the first line of standard input"),
        (("--token-file", "-"), b"\n", "no token on the first line"),
        (("--token-file", "-", "--token", "x"), b"t\n", "not both"),
        (("--env", "echo", "--env-options", "{}", "--env-options", "{}"), b"", "2 --env-options for 1 --env"),
        (("--env-options", "[1]"), b"", "JSON object"),
        (("--env", "no_such_env"), b"", "no_such_env"),
        (("--env", "python_sandbox", "--env-options", '{"timeout": "long"}'), b"", "timeout"),
    ],
)
def test_bad_start_is_one_line_and_exit_2(args: tuple[str, ...], stdin: bytes, words: str) -> None:
    run = _run_envserver(*args, stdin=stdin)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("envserver: error:") and words in lines[0], run.stderr


def test_exposed_server_starts_with_a_token_or_an_explicit_insecure(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok\nignored second line\n")
    for args, stdin in ((("--insecure",), b""), (("--token-file", str(token_file)), b""), (("--token-file", "-"), b"tok\n")):
        run = _run_envserver("--host", "0.0.0.0", *args, stdin=stdin)
        assert run.returncode == 0 and "listening on http://0.0.0.0:" in run.stdout, (args, run.stderr)


async def test_token_from_stdin_leaves_the_rest_of_stdin_to_exit_with_stdin(http) -> None:
    """The local backend's route: the first line is the token, then EOF on stdin stops the server."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "envserver", "--port", "0", "--token-file", "-", "--exit-with-stdin", "--game", "catch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"line-token\nmore bytes the server never takes for a token\n")
        proc.stdin.flush()
        url = proc.stdout.readline().decode().split()[-1]
        async with http.get(url + "/health") as r:
            assert r.status == 401
        async with http.get(url + "/health", headers={"Authorization": "Bearer line-token"}) as r:
            assert r.status == 200
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _unprivileged() -> None:
    """In a child before exec: empty the capability bounding set, so even root execs with no capability.

    (Without CAP_SETPCAP, i.e. not root, the drop fails: such a process has none to drop.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def test_the_server_process_is_not_dumpable() -> None:
    """A same-uid process (what sandboxed code is) cannot read the server's environ or memory.

    Without capabilities, a process may read another's /proc/<pid>/environ only if both have
    the same uid and the target is dumpable. Server, reader and a control process run as this
    uid with no capability (even when the suite runs as root). The control did not call prctl
    and stays readable, so the test can fail.
    """
    env = {**os.environ, "ENVFLEET_CANARY": "canary-value"}
    server = subprocess.Popen(
        [sys.executable, "-m", "envserver", "--port", "0", "--env", "echo", "--lifetime", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, preexec_fn=_unprivileged,
    )
    control = subprocess.Popen(["sleep", "60"], env=env, preexec_fn=_unprivileged)
    try:
        assert server.stdout is not None
        assert "listening on" in server.stdout.readline().decode()
        reader = (
            "import sys\n"
            "for pid in sys.argv[1:]:\n"
            "    for what in ('environ', 'mem'):\n"
            "        try:\n"
            "            with open(f'/proc/{pid}/{what}', 'rb') as f: f.read(1) if what == 'environ' else None\n"
            "            print(pid, what, 'readable')\n"
            "        except OSError as exc: print(pid, what, type(exc).__name__)\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", reader, str(server.pid), str(control.pid)],
            capture_output=True, text=True, timeout=30, preexec_fn=_unprivileged,
        )
        lines = run.stdout.split("\n")
        assert f"{server.pid} environ PermissionError" in lines and f"{server.pid} mem PermissionError" in lines, run
        assert f"{control.pid} environ readable" in lines, run  # the control: same uid, dumpable
    finally:
        for proc in (server, control):
            proc.kill()
            proc.wait()
        if server.stdout is not None:
            server.stdout.close()


# -- 4. cross-site WebSocket hijacking


@pytest.fixture(scope="module")
def origin_server(shared_server):
    return shared_server("--env", "echo", "--allow-origin", "https://trainer.example:8443")


@pytest.mark.parametrize("path", ["/ws", "/v1/mux", "/web/ws"])
@pytest.mark.parametrize("origin", [FORGED, "null", "http://127.0.0.1.evil.example", "https://trainer.example"])
async def test_a_foreign_origin_is_refused_before_any_session(origin_server, http, path: str, origin: str) -> None:
    before = sessions(origin_server)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(origin_server.ws_url + path, headers={"Origin": origin})
    assert info.value.status == 403
    assert sessions(origin_server) == before and origin_server.proc.poll() is None


async def test_a_foreign_origin_is_refused_over_http_with_a_coded_error(origin_server, http) -> None:
    before = sessions(origin_server)
    async with http.post(origin_server.url + "/step", json={"action": {"message": "x"}}, headers={"Origin": FORGED}) as r:
        assert r.status == 403
        body = await r.json()
        assert body["code"] == "FORBIDDEN" and FORGED in body["detail"]
    assert sessions(origin_server) == before


@pytest.mark.parametrize("path", ["/ws", "/v1/mux", "/web/ws"])
async def test_own_and_allowed_origins_and_no_origin_pass(origin_server, http, path: str) -> None:
    own = origin_server.url  # what a browser on the play page sends
    for headers in ({"Origin": own}, {"Origin": "https://trainer.example:8443"}, {}):
        async with http.ws_connect(origin_server.ws_url + path, headers=headers) as ws:
            assert not ws.closed


async def test_forged_origin_is_refused_even_with_the_token(spawn_server, http) -> None:
    server = spawn_server("--env", "echo", "--token", "tok")
    for path in ("/ws", "/v1/mux", "/web/ws?token=tok"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(server.ws_url + path, headers={"Origin": FORGED, "Authorization": "Bearer tok"})
        assert info.value.status == 403
    assert sessions(server, "tok") == (0, 0)
    assert server.proc.poll() is None


async def test_dns_rebinding_is_refused_by_a_tokenless_loopback_server(echo_server, http) -> None:
    """A page at http://evil.example:PORT whose name resolves to 127.0.0.1 sends Host and Origin evil.example."""
    port = echo_server.url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    before = sessions(echo_server)
    async with http.post(echo_server.url + "/step", json={"action": {"message": "x"}}, headers=rebound) as r:
        assert r.status == 403
        body = await r.json()
        assert body["code"] == "FORBIDDEN" and "evil.example" in body["detail"]
    for path in ("/ws", "/v1/mux", "/web/ws"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(echo_server.ws_url + path, headers=rebound)
        assert info.value.status == 403
    assert sessions(echo_server) == before
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):  # what programs on this machine send
        async with http.get(echo_server.url + "/health", headers={"Host": host}) as r:
            assert r.status == 200, host


async def test_a_server_with_a_token_answers_to_any_host_name(spawn_server, http) -> None:
    server = spawn_server("--env", "echo", "--token", "tok")  # e.g. reached by a DNS name in a cluster
    async with http.get(server.url + "/health", headers={"Host": "envfleet.default.svc:8000", "Authorization": "Bearer tok"}) as r:
        assert r.status == 200


async def test_huge_refusals_are_answered_in_a_few_lines(echo_server, mux_connect) -> None:
    mux = await mux_connect(echo_server)
    (reply,) = await mux.call(mux.req("open", 1, "x" * 100_000))
    assert reply.body["code"] == ErrorCode.FORBIDDEN and len(reply.body["message"]) < 300
    (reply,) = await mux.call(mux.req("open", 1, None, {f"limit{i}": i for i in range(5000)}))
    assert reply.body["code"] == ErrorCode.VALIDATION_ERROR and "'limit0'" in reply.body["message"]
    assert "and 4990 more" in reply.body["message"] and len(reply.body["message"]) < 1000
    await mux.one("open", 1)
