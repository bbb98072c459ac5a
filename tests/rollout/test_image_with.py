"""``rollout image build --with PATH``: the user's package and its dependencies baked into the image, offline.

The Docker test builds ``envfleet-test-with:<pid>`` with ``tests/fixtures/tinyenv`` (a minimal
environment package depending on ``six``, which envfleet does not ship), runs it with
``EnvPool(backend="docker", env="tinyenv.env:CounterEnv")`` and removes the image in ``finally``.
Bad input is refused before any Docker build starts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rollout import EnvPool, FleetError
from rollout.commands.image import build_image

from .docker_support import require_docker

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tinyenv"


def _bad_package(tmp_path: Path, kind: str) -> Path:
    if kind == "no-metadata-dir":
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "module.py").write_text("x = 1\n")
        return tmp_path / "pkg"
    if kind == "text-file":
        (tmp_path / "notes.txt").write_text("hello\n")
        return tmp_path / "notes.txt"
    if kind == "fake-wheel":
        (tmp_path / "fake-1.0-py3-none-any.whl").write_text("not a zip\n")
        return tmp_path / "fake-1.0-py3-none-any.whl"
    if kind == "zip-without-metadata":
        with zipfile.ZipFile(tmp_path / "empty-1.0-py3-none-any.whl", "w") as z:
            z.writestr("empty.py", "")
        return tmp_path / "empty-1.0-py3-none-any.whl"
    return tmp_path / "missing"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no-metadata-dir", "not a Python package"),
        ("text-file", "not a package directory or a wheel"),
        ("fake-wheel", "not a wheel \\(not a zip archive\\)"),
        ("zip-without-metadata", "not a wheel \\(no .dist-info/METADATA"),
        ("missing", "no such file or directory"),
    ],
)
def test_paths_that_are_not_packages_are_refused_first(tmp_path: Path, kind: str, message: str) -> None:
    lines: list[str] = []
    with pytest.raises(FleetError, match=message):
        build_image(tag="envfleet-test-with:never", progress=lines.append, with_packages=[_bad_package(tmp_path, kind)])
    assert lines == []  # nothing ran: no wheelhouse, no docker


def test_cli_reports_a_bad_path_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "image", "build", "--tag", "envfleet-test-with:never", "--with", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"rollout: error: --with {tmp_path / 'nope'}: no such file or directory"]


@pytest.mark.slow
def test_unresolvable_dependencies_stop_before_docker(tmp_path: Path) -> None:
    package = tmp_path / "conflicted"
    shutil.copytree(FIXTURE, package)
    pyproject = package / "pyproject.toml"
    # envfleet ships msgspec; no version below 0.0.1 exists, and envfleet's pin excludes it anyway
    pyproject.write_text(pyproject.read_text().replace('dependencies = ["six>=1.16"]', 'dependencies = ["msgspec<0.0.1"]'))
    lines: list[str] = []
    with pytest.raises(FleetError, match="the dependencies of tinyenv-0.1.0-py3-none-any.whl cannot be resolved"):
        build_image(tag="envfleet-test-with:never", progress=lines.append, with_packages=[package])
    assert not any(line.startswith("docker build") for line in lines)


@pytest.mark.docker
@pytest.mark.slow
async def test_image_with_a_user_package_runs_it_in_containers(tmp_path: Path) -> None:
    await require_docker()
    package = tmp_path / "tinyenv"
    shutil.copytree(FIXTURE, package)  # pip builds in the source directory: not in the repo
    tag = f"envfleet-test-with:{os.getpid()}"
    lines: list[str] = []
    try:
        await asyncio.to_thread(build_image, None, tag, lines.append, [package])
        assert any(line.startswith("extra wheelhouse: 2 wheels") for line in lines), lines  # tinyenv and six
        async with EnvPool(n=2, env="tinyenv.env:CounterEnv", backend="docker", image=tag, servers=1, start_timeout=60) as pool:
            first = await pool.reset()
            assert first[0].observation == {"total": 0, "text": "0"}
            results = await pool.step([{"amount": 2}, {"amount": 3}])
            assert [r.terminated for r in results] == [False, True] and results[1].reward == 1.0
            assert results[0].observation["text"] == "2"
        # the hardening is unchanged: no pip in the image, non-root by default
        probe = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--read-only", tag, "python", "-c",
             "import importlib.util, os; print(importlib.util.find_spec('pip') is None, os.getuid())"],
            capture_output=True, text=True, timeout=60,
        )
        assert probe.stdout.split() == ["True", "65534"], probe.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=60)
