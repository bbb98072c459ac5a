"""Write small environment plugins into a directory, as installed packages would look on ``sys.path``.

``write_plugins(root)`` creates the package ``tinyplug`` (environments with a tensor in their
observations, one that raises inside ``step``) and the modules the bad-input tests need, plus a
``*.dist-info`` directory whose ``entry_points.txt`` registers names in ``envfleet.envs``:
``importlib.metadata`` finds it on ``PYTHONPATH`` exactly as it finds a pip-installed package.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

TINYPLUG = '''
from typing import Any

import msgspec

from envserver.env import Environment
from envserver.errors import ServerError
from envserver.protocol import ErrorCode, StepResult, Tensor


class CountAction(msgspec.Struct, forbid_unknown_fields=True):
    add: int = 1


class Reading(msgspec.Struct):
    label: str
    values: Tensor


class CountObservation(msgspec.Struct):
    total: int
    grid: Tensor
    maybe: Tensor | None = None
    readings: list[Reading] = []


class CountState(msgspec.Struct):
    total: int
    step_count: int


class CountEnv(Environment[CountAction, CountObservation, CountState]):
    """Counts; the observation carries tensors; ``add == 13`` raises inside step (an env bug)."""

    name = "count"
    description = "Adds numbers; observations carry tensors."
    Action = CountAction
    Observation = CountObservation
    State = CountState

    def __init__(self, **options: Any) -> None:
        self.total = self.steps = 0
        self.limit = int(options.get("limit", 3))

    def _obs(self) -> CountObservation:
        grid = Tensor((2, 2), bytes([self.total % 256] * 4), "uint8")
        reading = Reading("total", Tensor((1,), bytes(4), "float32"))
        return CountObservation(self.total, grid, grid if self.total else None, [reading])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[CountObservation]:
        self.total = self.steps = 0
        return StepResult(self._obs())

    def step(self, action: CountAction) -> StepResult[CountObservation]:
        if self.steps >= self.limit:
            raise ServerError(ErrorCode.EPISODE_OVER, "the count is done: reset")
        if action.add == 13:
            raise RuntimeError("unlucky number")
        if action.add < 0:
            raise ServerError(ErrorCode.INVALID_ACTION, "add must not be negative")
        self.total += action.add
        self.steps += 1
        return StepResult(self._obs(), reward=float(action.add), terminated=self.steps >= self.limit)

    def state(self) -> CountState:
        return CountState(self.total, self.steps)


def add_one(observation: Any) -> dict[str, int]:
    """A policy: add one (observations may be CountObservation or plain dicts)."""
    return {"add": 1}
'''

FILES = {
    "tinyplug/__init__.py": "",
    "tinyplug/env.py": TINYPLUG,
    "raises_on_import.py": "raise RuntimeError('this plugin is broken at import')\n",
    "imports_missing.py": "import no_such_dependency_xyz\n",
    "not_an_env.py": "class Thing:\n    pass\n",
}

ENTRY_POINTS = """
[envfleet.envs]
count = tinyplug.env:CountEnv
broken_plugin = raises_on_import:Env
missing_plugin = no_such_module_xyz:Env
"""


def write_plugins(root: Path) -> Path:
    """Write the plugins under ``root`` and return it (put it on ``PYTHONPATH``)."""
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    info = root / "tinyplug-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def pythonpath_with(root: Path) -> dict[str, str]:
    """Environment variables that put ``root`` first on a subprocess's ``sys.path``."""
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{root}{os.pathsep}{current}" if current else str(root)}


def install_to(package: Path, site: Path) -> Path:
    """Build and install ``package`` (not its dependencies) into ``site``, a directory to put on PYTHONPATH.

    A real pip install, but into a directory of its own: the project's virtualenv stays untouched.
    """
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(package)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install {package} failed:\n{done.stderr[-3000:]}")
    return site


def image_build_takes_packages() -> bool:
    """Whether ``rollout image build`` has ``--with`` (built on the openenv branch)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rollout.cli", "image", "build", "--help"], capture_output=True, text=True, timeout=60)
    return "--with" in done.stdout


def remove_image(tag: str) -> None:
    """Remove an image this test built (never one it did not)."""
    import subprocess

    subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, timeout=120)
