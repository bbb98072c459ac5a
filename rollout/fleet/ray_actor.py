"""The Ray actor of backend "ray": one envserver child process on the actor's node.

Kept apart and free of ``rollout`` imports: ``rollout.fleet.ray`` ships this module to the
workers by value, so starting an actor costs the import of Ray, not of envfleet's client.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import tempfile
from typing import Any

STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of the server


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """In the server child before exec: get SIGKILL when the actor process dies (Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class EnvServerActor:
    """One envserver process; its standard input carries the token, then stays open as its lifeline."""

    def __init__(self, pool: str, index: int) -> None:
        import ray

        self.pool, self.index = pool, index
        context = ray.get_runtime_context()
        self.job, self.node_id = context.get_job_id(), context.get_node_id()
        self.placement_group = context.get_placement_group_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, server_args: list[str], token: str, timeout: float, driver_ip: str = "") -> str:
        """Start envserver with ``token`` on its stdin; return its URL once listening.

        It binds to this node's IP, which the driver on another machine needs; on the driver's own
        machine (``driver_ip``) it binds to 127.0.0.1, so that nothing is exposed beyond loopback.
        """
        host = "127.0.0.1" if self.node_ip == driver_ip else self.node_ip
        argv = [sys.executable, "-m", "envserver", "--host", host, "--port", "0",
                "--exit-with-stdin", "--no-web", "--token-file", "-", *server_args]
        with tempfile.TemporaryFile() as log:
            process = self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(token.encode() + b"\n")
            process.stdin.flush()  # the pipe stays open: its end tells the server to stop
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            line = process.stdout.readline().decode(errors="replace") if ready else ""
            if not line.startswith("envserver ") or "http://" not in line:
                self.stop()
                log.seek(0)
                detail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"envserver did not start on {host}: {' | '.join(detail) or 'no output'}")
        self.url = line.split()[-1]
        return self.url

    def describe(self) -> dict[str, Any]:
        """What ``rollout fleet ls`` shows of this actor."""
        process = self.process
        return {"pool": self.pool, "index": self.index, "job": self.job, "node": self.node_ip, "node_id": self.node_id,
                "placement_group": self.placement_group,
                "pid": process.pid if process else None, "url": self.url,
                "server_alive": process is not None and process.poll() is None}

    def pid(self) -> int:
        """The server's process id."""
        if self.process is None:
            raise RuntimeError("no server running")
        return self.process.pid

    def stop(self) -> None:
        """Terminate the server (SIGKILL after ``STOP_GRACE`` s) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
