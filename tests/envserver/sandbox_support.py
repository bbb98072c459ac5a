"""What the Python sandbox tests share: whether a process still runs, one step over OpenEnv's /ws."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from envserver.envs.sandbox.worker import proc_stat


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != b"Z"


async def ws_step(ws: aiohttp.ClientWebSocketResponse, code: str, timeout: float = 20.0) -> dict[str, Any]:
    """Run ``code`` as one step of the socket's session; the reply's ``data`` (it must be an observation)."""
    await ws.send_str(json.dumps({"type": "step", "data": {"code": code}}))
    reply = json.loads(await ws.receive_str(timeout=timeout))
    assert reply["type"] == "observation", reply
    data: dict[str, Any] = reply["data"]
    return data
