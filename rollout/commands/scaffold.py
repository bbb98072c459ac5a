"""``rollout env new NAME``: write a small installable environment package that passes its own tests.

The package holds a ``pyproject.toml`` registering the environment in the ``envfleet.envs``
entry-point group, an env module with typed Action/Observation/State (a number-guessing game
to replace with your own), a README, and a test that runs ``envserver.testing.check_environment``.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


class ScaffoldError(ValueError):
    """The name or the target directory cannot be used."""


def new_environment(name: str, directory: str | Path | None = None) -> list[Path]:
    """Write the package for environment ``name`` into ``directory`` (default ``./NAME``); return the files written."""
    if not _NAME.match(name) or len(name) > 64:
        raise ScaffoldError(f"bad environment name {name!r}: use lowercase letters, digits, '-' or '_', starting with a letter")
    module = name.replace("-", "_")
    if keyword.iskeyword(module) or module in sys.stdlib_module_names or importlib.util.find_spec(module) is not None:
        raise ScaffoldError(f"bad environment name {name!r}: a module named {module!r} already exists; pick another name")
    target = Path(directory if directory is not None else name)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} already exists and is not an empty directory")
    words = dict(name=name, module=module, cls="".join(part.capitalize() for part in module.split("_")))
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{module}/__init__.py": INIT,
        f"{module}/env.py": ENV,
        "tests/test_env.py": TEST,
    }
    written = []
    for relative, template in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**words))
        written.append(path)
    return written


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "The {name} environment for envfleet."
requires-python = ">=3.11"
dependencies = ["envfleet"]

# `envserver --env {module}` and `EnvPool(env="{module}")` find the environment by this name.
[project.entry-points."envfleet.envs"]
{module} = "{module}.env:{cls}Env"

[tool.setuptools]
packages = ["{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''\
# {name}

An envfleet environment. Edit `{module}/env.py`: its types are the wire contract, its
methods the game. Then:

```
pip install -e .                      # registers "{module}" in the envfleet.envs entry points
python -m pytest                      # the conformance checker and your own tests
envserver --env {module} --port 8000  # serve it (OpenEnv HTTP/WS and the envfleet mux)
rollout eval --env {module} --policy {module}.env:bisect --episodes 100 --out runs.jsonl
```
'''

INIT = '''\
"""The {name} environment for envfleet."""

from .env import {cls}Action, {cls}Env, {cls}Observation, {cls}State

__all__ = ["{cls}Action", "{cls}Env", "{cls}Observation", "{cls}State"]
'''

ENV = '''\
"""{cls}Env: guess a hidden number between 1 and 100; each wrong guess is answered higher or lower."""

from __future__ import annotations

import random
import uuid
from typing import Annotated, Any, Literal

import msgspec

from envserver.env import Environment
from envserver.errors import ServerError
from envserver.protocol import ErrorCode, StepResult

LOW, HIGH = 1, 100


class {cls}Action(msgspec.Struct, forbid_unknown_fields=True):
    """What the agent sends: ``{{"guess": 50}}``."""

    guess: Annotated[int, msgspec.Meta(ge=LOW, le=HIGH)]


class {cls}Observation(msgspec.Struct):
    """What the agent sees after each reset and step."""

    text: str
    hint: Literal["higher", "lower", "correct"] | None = None
    low: int = LOW  # the hidden number is known to lie in [low, high]
    high: int = HIGH
    guesses_left: int = 0


class {cls}State(msgspec.Struct):
    """The episode's bookkeeping (``GET /state``)."""

    episode_id: str | None
    step_count: int
    seed: int | None = None


class {cls}Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Session options (``--env-options``, ``EnvPool(options=...)``)."""

    max_guesses: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class {cls}Env(Environment[{cls}Action, {cls}Observation, {cls}State]):
    name = "{module}"
    description = "Guess a number between 1 and 100 from higher/lower hints."
    Action = {cls}Action
    Observation = {cls}Observation
    State = {cls}State

    def __init__(self, **options: Any) -> None:
        try:
            self.config = msgspec.convert(options, {cls}Config)
        except msgspec.ValidationError as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad options: {{exc}}") from None
        self._secret = 0
        self._low, self._high = LOW, HIGH
        self._steps = 0
        self._seed: int | None = None
        self._episode_id: str | None = None
        self._over = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[{cls}Observation]:
        self._secret = random.Random(seed).randint(LOW, HIGH)  # the same seed, the same number
        self._low, self._high, self._steps, self._seed = LOW, HIGH, 0, seed
        self._episode_id, self._over = str(uuid.uuid4()), False
        return StepResult(self._observe(None, f"Guess a number from {{LOW}} to {{HIGH}}."))

    def step(self, action: {cls}Action) -> StepResult[{cls}Observation]:
        if self._over:
            raise ServerError(ErrorCode.EPISODE_OVER, "the episode is over: call reset")
        self._steps += 1
        if action.guess == self._secret:
            self._over = True
            return StepResult(self._observe("correct", "Correct!"), reward=1.0, terminated=True)
        if action.guess < self._secret:
            hint: Literal["higher", "lower"] = "higher"
            self._low = max(self._low, action.guess + 1)
        else:
            hint = "lower"
            self._high = min(self._high, action.guess - 1)
        truncated = self._steps >= self.config.max_guesses
        self._over = truncated
        return StepResult(self._observe(hint, f"{{action.guess}}: go {{hint}}."), truncated=truncated)

    def state(self) -> {cls}State:
        return {cls}State(self._episode_id, self._steps, self._seed)

    def _observe(self, hint: Literal["higher", "lower", "correct"] | None, text: str) -> {cls}Observation:
        return {cls}Observation(text, hint, self._low, self._high, self.config.max_guesses - self._steps)


def bisect(observation: Any) -> dict[str, int]:
    """A policy for ``rollout eval --policy {module}.env:bisect``: guess the middle of what is left."""
    low, high = (observation["low"], observation["high"]) if isinstance(observation, dict) else (observation.low, observation.high)
    return {{"guess": (low + high) // 2}}
'''

TEST = '''\
"""{cls}Env passes envfleet's conformance checker and plays as documented."""

from __future__ import annotations

from envserver.testing import check_environment
from {module}.env import {cls}Action, {cls}Env, bisect


def test_conforms() -> None:
    report = check_environment({cls}Env, sample_action=bisect, bad_actions=[{{"guess": 0}}, {{"guess": 101}}, {{"guess": "50"}}])
    assert report.episode_ended


def test_bisect_finds_the_number() -> None:
    env = {cls}Env()
    result = env.reset(seed=7)
    while not (result.terminated or result.truncated):
        result = env.step({cls}Action(**bisect(result.observation)))
    assert result.terminated and result.reward == 1.0
'''
