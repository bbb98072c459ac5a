"""Find environment classes: registered names, ``package.module:Class`` paths and OpenEnv adapters.

Names come from the ``envfleet.envs`` entry-point group (the built-in environments register
there too, in envfleet's ``pyproject.toml``). Nothing is imported until it is asked for, so a
server loads only what it serves, and a plugin that fails to import hides no other.

Spellings of a spec:

* ``echo`` - a registered name;
* ``package.module:Class`` - any ``Environment`` subclass importable on this machine;
* ``openenv:package.module:Class`` - an OpenEnv ``Environment``, served through
  ``envserver.envs.openenv_adapter.adapt``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any

import msgspec

from ..env import Environment
from ..errors import ServerError
from ..protocol import ErrorCode

GROUP = "envfleet.envs"
OPENENV_PREFIX = "openenv:"

EnvClass = type[Environment]  # type: ignore[type-arg]


_registered: dict[str, str | type] = {}  # names given to register() in this process


def register(name: str, target: str | type) -> None:
    """Register ``name`` in this process for a class or its ``package.module:Class`` (installed packages use entry points)."""
    if not name or ":" in name:
        raise ValueError(f"environment names cannot be empty or contain ':' ({name!r})")
    _registered[name] = target


def unregister(name: str) -> None:
    """Forget a name given to ``register``."""
    _registered.pop(name, None)


@functools.cache
def _installed() -> dict[str, str]:
    """``package.module:Class`` of every installed entry point, read once (a scan costs ~30 ms)."""
    found: dict[str, str] = {}
    for point in importlib.metadata.entry_points(group=GROUP):
        found.setdefault(point.name, point.value)  # the first distribution to claim a name keeps it
    return found


def _entry_points() -> dict[str, str | type]:
    """What every registered name points at: installed entry points, then ``register``'s names."""
    return {**_installed(), **_registered}


def names() -> list[str]:
    """The registered environment names, sorted."""
    return sorted(_entry_points())


def load(spec: str, *, allow_paths: bool = True) -> EnvClass:
    """The environment class that ``spec`` names (see the module docstring for the spellings).

    ``allow_paths=False`` accepts registered names only: what a remote client may ask for.
    Every failure is a ``ServerError`` with a one-line message naming the cause.
    """
    if ":" not in spec:
        target = _entry_points().get(spec)
        if target is None:
            raise ServerError(ErrorCode.NOT_FOUND, f"unknown environment {spec!r}; registered: {', '.join(names()) or 'none'}")
        if isinstance(target, str):
            target = _import(target, f"environment {spec!r} ({target})")
        return _checked(target, spec)
    if not allow_paths:
        raise ServerError(ErrorCode.NOT_FOUND, f"environment {spec!r} is not served here; ask for a registered name")
    if spec.startswith(OPENENV_PREFIX):
        return _checked(_adapt_openenv(spec.removeprefix(OPENENV_PREFIX)), spec)
    return _checked(_import(spec, spec), spec)


class Listing(msgspec.Struct, omit_defaults=True):
    """One registered environment: its description, or why it cannot be loaded."""

    name: str
    description: str = ""
    error: str | None = None
    target: str = ""  # package.module:Class


def describe() -> list[Listing]:
    """Every registered name with its description, or with why it failed to load; one broken plugin hides no other."""
    rows = []
    for name, target in sorted(_entry_points().items()):
        where = target if isinstance(target, str) else class_path(target)
        try:
            env_class = load(name)
        except ServerError as exc:
            rows.append(Listing(name, error=exc.message, target=where))
        else:
            rows.append(Listing(name, " ".join(str(getattr(env_class, "description", "")).split()), target=where))
    return rows


def class_path(obj: type) -> str:
    """``module:QualName`` of a class, as ``load`` and the client's type lookup read it."""
    return f"{obj.__module__}:{obj.__qualname__}"


def _import(path: str, what: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ServerError(ErrorCode.NOT_FOUND, f"{what}: expected package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ServerError(ErrorCode.NOT_FOUND, f"{what}: no module named {exc.name!r}") from None
        raise ServerError(ErrorCode.FACTORY_ERROR, f"{what}: importing {module_name} failed: {_one_line(exc)}") from None
    except Exception as exc:  # SyntaxError, or anything the module raises at import
        raise ServerError(ErrorCode.FACTORY_ERROR, f"{what}: importing {module_name} failed: {_one_line(exc)}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ServerError(ErrorCode.NOT_FOUND, f"{what}: module {module_name} has no attribute {attr!r}") from None
    return target


def _adapt_openenv(path: str) -> Any:
    adapter_name = __name__ + ".openenv_adapter"
    try:
        openenv_adapter = importlib.import_module(adapter_name)
    except ModuleNotFoundError as exc:
        if exc.name != adapter_name:
            raise ServerError(ErrorCode.FACTORY_ERROR, f"the OpenEnv adapter cannot be imported: {_one_line(exc)}") from None
        raise ServerError(ErrorCode.NOT_FOUND, f"serving OpenEnv environments needs {adapter_name}, which is not installed") from None
    except Exception as exc:
        raise ServerError(ErrorCode.FACTORY_ERROR, f"the OpenEnv adapter cannot be imported: {_one_line(exc)}") from None
    try:
        return openenv_adapter.adapt(path)
    except ServerError:
        raise
    except Exception as exc:
        raise ServerError(ErrorCode.FACTORY_ERROR, f"openenv:{path}: cannot adapt: {_one_line(exc)}") from None


def _checked(target: Any, spec: str) -> EnvClass:
    if not (isinstance(target, type) and issubclass(target, Environment)):
        kind = target.__name__ if isinstance(target, type) else type(target).__name__
        raise ServerError(ErrorCode.FACTORY_ERROR, f"{spec}: {kind} is not an envserver.env.Environment subclass")
    undeclared = [attr for attr in ("name", "description", "Action", "Observation", "State") if not hasattr(target, attr)]
    if undeclared:
        raise ServerError(ErrorCode.FACTORY_ERROR, f"{spec}: {target.__name__} does not declare {', '.join(undeclared)}")
    if getattr(target, "__abstractmethods__", None):
        missing = ", ".join(sorted(target.__abstractmethods__))
        raise ServerError(ErrorCode.FACTORY_ERROR, f"{spec}: {target.__name__} does not implement {missing}")
    return target


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
