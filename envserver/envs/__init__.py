"""Registered environments, imported on first use so a server loads only what it serves."""

from __future__ import annotations

import importlib

from ..env import Environment
from ..errors import ServerError
from ..protocol import ErrorCode

_REGISTRY = {
    "openspiel": "envserver.envs.openspiel:OpenSpielEnv",
    "echo": "envserver.envs.echo:EchoEnv",
    "python_sandbox": "envserver.envs.python_sandbox:PythonSandboxEnv",
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def load(name: str) -> type[Environment]:  # type: ignore[type-arg]
    """The environment class registered as ``name``, or ``openenv:package.module:Class`` adapted."""
    if name.startswith("openenv:"):  # an OpenEnv environment, served through the adapter
        from .openenv_adapter import adapt

        return adapt(name.removeprefix("openenv:"))
    if ":" in name and name not in _REGISTRY:  # package.module:Class (stand-in until the plugins loader lands)
        module_name, _, attr = name.partition(":")
        try:
            env_class = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ServerError(ErrorCode.NOT_FOUND, f"cannot load environment {name!r}: {exc}") from None
        if not (isinstance(env_class, type) and issubclass(env_class, Environment)):
            raise ServerError(ErrorCode.NOT_FOUND, f"{name!r} is not an envserver Environment subclass")
        return env_class
    try:
        module_name, _, attr = _REGISTRY[name].partition(":")
    except KeyError:
        raise ServerError(ErrorCode.NOT_FOUND, f"unknown environment {name!r}; known: {', '.join(names())}") from None
    env_class: type[Environment] = getattr(importlib.import_module(module_name), attr)  # type: ignore[type-arg]
    return env_class
