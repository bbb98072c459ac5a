"""docs/authoring.md, run: every command of its ``console`` blocks, in order, on a freshly scaffolded package.

The project's virtualenv is never changed: ``pip install -e .`` is run as a real install of the
same directory into a temporary ``--target`` directory that every later command gets on
``PYTHONPATH`` (entry points are found there exactly as in site-packages). The image commands
need Docker and run in a test of their own, with a unique tag instead of ``my-env:latest``
(the daemon is shared), and the image is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "authoring.md"
BIN = Path(sys.executable).parent
IMAGE_BUILD = "rollout image build --with . --tag my-env:latest"
DOCKER_EVAL = "rollout eval --env my_env --backend docker --image my-env:latest --policy my_env.env:bisect --episodes 100 --out docker-runs.jsonl"
IMAGE_COMMANDS = {IMAGE_BUILD, DOCKER_EVAL}  # need Docker and `rollout image build --with`: the docker test below


def doc_commands() -> list[str]:
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


class Walkthrough:
    """Where the walk-through is: its directory, the install target, and the environment of every command."""

    def __init__(self, root: Path) -> None:
        self.cwd = root
        self.site = root / "site"
        self.env = {**os.environ, "PYTHONPATH": str(self.site)}
        self.image = f"envfleet-test-authoring:{os.getpid()}"

    def run(self, *argv: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(a) for a in argv], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done


def scaffold(w: Walkthrough) -> None:
    w.run(BIN / "rollout", "env", "new", "my-env")
    assert (w.cwd / "my-env" / "my_env" / "env.py").is_file()


def cd(w: Walkthrough) -> None:
    w.cwd = w.cwd / "my-env"


def install(w: Walkthrough) -> None:
    w.run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", w.site, ".", timeout=300)
    assert list(w.site.glob("my_env-*.dist-info/entry_points.txt")) or list(w.site.glob("my-env-*.dist-info"))


def own_tests(w: Walkthrough) -> None:
    done = w.run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    assert "2 passed" in done.stdout


def list_envs(w: Walkthrough) -> None:
    done = w.run(BIN / "envserver", "--list-envs")
    assert re.search(r"^my_env\s+Guess a number between 1 and 100", done.stdout, flags=re.M), done.stdout
    assert re.search(r"^echo\s+Echoes", done.stdout, flags=re.M)


def serve(w: Walkthrough) -> None:
    """The doc's port 8000 may be taken here: port 0, then the same checks over HTTP."""
    log = w.cwd / "server.out"
    with open(log, "w") as out:
        server = subprocess.Popen([BIN / "envserver", "--env", "my_env", "--port", "0"], cwd=w.cwd, env=w.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while " listening on " not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        url = log.read_text().split()[-1]
        with urllib.request.urlopen(url + "/metadata", timeout=10) as reply:
            metadata = json.loads(reply.read())
        assert metadata["name"] == "my_env" and metadata["observation_type"] == "my_env.env:MyEnvObservation"
        request = urllib.request.Request(url + "/reset", data=b'{"seed": 3}', headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["observation"]["high"] == 100
    finally:
        server.terminate()
        server.wait(10)


def evaluate(w: Walkthrough) -> None:
    done = w.run(BIN / "rollout", "eval", "--env", "my_env", "--policy", "my_env.env:bisect", "--episodes", "100", "--out", "runs.jsonl")
    lines = (w.cwd / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 101 and "100 episodes of my_env" in done.stdout
    assert "return: mean 1.0000 ± 0.0000" in done.stdout  # bisection always finds the number within 10 guesses


def bench(w: Walkthrough) -> None:
    done = w.run(BIN / "rollout", "bench", "--env", "my_env", "--policy", "my_env.env:bisect", "--n", "64", "--seconds", "2")
    assert "| per-env | 64 |" in done.stdout and "| batched | 64 |" in done.stdout


def image_build(w: Walkthrough) -> None:
    """Tagged uniquely instead of my-env:latest: the Docker daemon is shared."""
    w.run(BIN / "rollout", "image", "build", "--with", ".", "--tag", w.image, timeout=900)


def docker_eval(w: Walkthrough) -> None:
    done = w.run(
        BIN / "rollout", "eval", "--env", "my_env", "--backend", "docker", "--image", w.image, "--policy", "my_env.env:bisect",
        "--episodes", "100", "--out", "docker-runs.jsonl",
    )
    assert len((w.cwd / "docker-runs.jsonl").read_text().splitlines()) == 101
    assert "return: mean 1.0000 ± 0.0000" in done.stdout


STEPS: dict[str, Callable[[Walkthrough], None]] = {
    "rollout env new my-env": scaffold,
    "cd my-env": cd,
    "pip install -e .": install,
    "python -m pytest": own_tests,
    "envserver --list-envs": list_envs,
    "envserver --env my_env --port 8000": serve,
    "rollout eval --env my_env --policy my_env.env:bisect --episodes 100 --out runs.jsonl": evaluate,
    "rollout bench --env my_env --policy my_env.env:bisect --n 64 --seconds 2": bench,
    IMAGE_BUILD: image_build,
    DOCKER_EVAL: docker_eval,
}


def test_every_command_of_the_walkthrough_is_run_here_or_by_the_image_tests() -> None:
    commands = doc_commands()
    assert len(commands) == len(set(commands))
    assert set(commands) == set(STEPS) and IMAGE_COMMANDS <= set(commands)


@pytest.mark.slow
def test_the_walkthrough_from_scaffold_to_eval(tmp_path: Path) -> None:
    w = Walkthrough(tmp_path)
    for command in doc_commands():
        if command not in IMAGE_COMMANDS:
            STEPS[command](w)


@pytest.mark.slow
@pytest.mark.docker
def test_the_walkthrough_in_containers(tmp_path: Path) -> None:
    """Scaffold and install (the policy runs in the client), then the image commands."""
    import asyncio

    from tests.conftest import skip_or_fail

    from .plugin_support import image_build_takes_packages, remove_image
    from .rollout.docker_support import docker_unavailable

    reason = asyncio.run(docker_unavailable())
    if reason:
        skip_or_fail(reason)
    if not image_build_takes_packages():
        skip_or_fail("rollout image build has no --with here (it comes with the openenv branch)")
    w = Walkthrough(tmp_path)
    try:
        for command in ("rollout env new my-env", "cd my-env", "pip install -e .", IMAGE_BUILD, DOCKER_EVAL):
            STEPS[command](w)
    finally:
        remove_image(w.image)
