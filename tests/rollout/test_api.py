"""The public API: exported names, and the one-way dependency on envserver.protocol."""

from __future__ import annotations

import subprocess
import sys

import rollout


def test_exported_members() -> None:
    assert sorted(rollout.__all__) == [
        "CapacityReached",
        "Env",
        "EnvClient",
        "EnvCrashed",
        "EnvError",
        "EnvPool",
        "EpisodeOver",
        "EpisodeRecord",
        "EvalError",
        "EvalSummary",
        "FleetConfig",
        "FleetError",
        "InvalidAction",
        "PolicyFailed",
        "PoolClosed",
        "PoolConfig",
        "ProtocolError",
        "RequestTimeout",
        "RequestTooLarge",
        "ServerReplyError",
        "Unauthorized",
        "UnencodableAction",
        "UnknownSession",
        "episode_seed",
        "evaluate",
    ]
    for name in rollout.__all__:
        assert getattr(rollout, name) is not None


def test_importing_rollout_does_not_import_the_server() -> None:
    code = (
        "import sys, rollout, rollout.cli, rollout.bench, rollout.eval, rollout.report;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'hypercorn', 'pyspiel', 'open_spiel', 'numpy')"
        " or (m.startswith('envserver') and m not in ('envserver', 'envserver.protocol'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envserver_never_imports_rollout() -> None:
    code = "import sys, envserver.app, envserver.__main__; sys.exit(1 if any(m.startswith('rollout') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
