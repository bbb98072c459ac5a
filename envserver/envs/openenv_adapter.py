"""Serve an OpenEnv environment (``openenv.core.env_server.Environment``) as an envserver one.

    envserver --env openenv:my_package.server.my_env:MyEnvironment

``adapt("package.module:Class")`` returns an envserver ``Environment`` class that wraps
the OpenEnv class unchanged, so it gets envserver's sessions, the mux fast path, seeds
(where its ``reset`` takes them) and the fleet backends:

* actions are validated by OpenEnv's own ``deserialize_action`` into the pydantic action
  class (MCP ``list_tools``/``call_tool`` actions included, as OpenEnv routes them); a
  bare integer means ``{"action_id": n}`` when the action class has that field;
* observations and states become JSON-native data (``model_dump(mode="json")``, about
  2 us for a catch observation); ``reward`` and ``done`` are lifted out as OpenEnv does;
* ``reset`` gets ``seed`` and the reset options as keyword arguments, filtered to what
  the environment's ``reset`` accepts (OpenEnv's rule);
* MCP tools of an ``MCPEnvironment`` are served on envserver's ``/mcp`` and ``mcp`` frames;
* ``SUPPORTS_CONCURRENT_SESSIONS = False`` limits a server to one live session.

Plain environments run inline on the event loop, as envserver's own cheap ones do; MCP
environments and those that override ``step_async``/``reset_async`` run in worker threads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
import typing
from typing import Annotated, Any, cast

import msgspec

from ..env import Environment
from ..errors import ServerError
from ..protocol import ErrorCode, StepResult

_LIFTED = {"reward", "done", "metadata"}  # OpenEnv sends these beside the observation, not in it


def _import_class(target: str) -> type:
    module_name, colon, attr = target.partition(":")
    if not colon or not module_name or not attr:
        raise ServerError(ErrorCode.NOT_FOUND, f"bad OpenEnv target {target!r}: expected openenv:package.module:Class")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as exc:
        raise ServerError(ErrorCode.NOT_FOUND, f"cannot import {module_name!r} for {target!r}: {exc}") from None
    except AttributeError:
        raise ServerError(ErrorCode.NOT_FOUND, f"module {module_name!r} has no {attr!r}") from None
    except Exception as exc:  # the module raised while importing
        raise ServerError(ErrorCode.NOT_FOUND, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    return obj  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    """The fallback for values pydantic cannot serialize (numpy arrays, odd objects)."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else repr(value)


def _wire_types(env_class: type[Any]) -> tuple[type, type, type]:
    """The pydantic Action, Observation and State classes of ``env_class``.

    From its ``Environment[A, O, S]`` parameters, else from the annotations of ``step``,
    ``reset`` and ``state``, else OpenEnv's base classes (as for MCP environments).
    """
    from openenv.core.env_server import Action, Observation, State

    found: list[Any] = [None, None, None]
    for klass in env_class.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if len(args) == 3 and all(isinstance(a, type) for a in args):
                found = [f or a for f, a in zip(found, args)]
    hints = [
        (env_class.step, "action"),
        (env_class.reset, "return"),
        (getattr(env_class.state, "fget", None), "return"),
    ]
    for index, (func, key) in enumerate(hints):
        if found[index] is None and func is not None:
            try:
                hint = typing.get_type_hints(func).get(key)
            except Exception:  # unresolvable forward references: fall back to the base class
                hint = None
            if isinstance(hint, type):
                found[index] = hint
    bases = (Action, Observation, State)
    return tuple(f if isinstance(f, type) and issubclass(f, b) else b for f, b in zip(found, bases))  # type: ignore[return-value]


def _schema_type(model: type) -> Any:
    """A type whose envserver JSON Schema is the pydantic model's own."""
    return Annotated[Any, msgspec.Meta(extra_json_schema=model.model_json_schema())]  # type: ignore[attr-defined]


def _discover_tools(env_class: type) -> dict[str, str]:
    """The MCP tools an instance of ``env_class`` offers: name -> description."""
    try:
        from openenv.core.env_server import MCPEnvironment
    except ImportError:  # fastmcp missing: no MCP environments exist
        return {}
    if MCPEnvironment is None or not issubclass(env_class, MCPEnvironment):
        return {}
    from openenv.core.env_server.mcp_environment import get_server_tools

    try:
        probe = env_class()
    except Exception as exc:
        raise ServerError(ErrorCode.FACTORY_ERROR, f"cannot create {env_class.__qualname__}: {type(exc).__name__}: {exc}") from None
    try:
        return {name: tool.description or "" for name, tool in get_server_tools(probe.mcp_server).items()}
    finally:
        probe.close()


def _overrides_async(env_class: type) -> bool:
    from openenv.core.env_server import Environment as OpenEnvEnvironment

    return any(getattr(env_class, name) is not getattr(OpenEnvEnvironment, name) for name in ("step_async", "reset_async"))


@functools.cache
def adapt(target: str) -> type[Environment]:  # type: ignore[type-arg]
    """The envserver ``Environment`` class that serves the OpenEnv class ``target`` ("package.module:Class")."""
    try:
        from openenv.core.env_server import Environment as OpenEnvEnvironment
        from openenv.core.env_server import Observation as OpenEnvObservation
        from openenv.core.env_server import deserialize_action
    except ImportError as exc:
        raise ServerError(ErrorCode.NOT_FOUND, f"serving {target!r} needs openenv-core: {exc}") from None
    wrapped = _import_class(target)
    if not (isinstance(wrapped, type) and issubclass(wrapped, OpenEnvEnvironment)):
        raise ServerError(ErrorCode.NOT_FOUND, f"{target!r} is not a subclass of openenv.core.env_server.Environment")
    action_cls, observation_cls, state_cls = _wire_types(wrapped)
    tools = _discover_tools(wrapped)
    reset_params = inspect.signature(cast(Any, wrapped).reset).parameters
    reset_takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in reset_params.values())
    takes_action_id = "action_id" in action_cls.model_fields  # type: ignore[attr-defined]
    concurrent = bool(getattr(wrapped, "SUPPORTS_CONCURRENT_SESSIONS", False))
    live = [0]  # instances alive, for environments that allow one session only
    lock = threading.Lock()
    doc = (inspect.getdoc(wrapped) or f"OpenEnv environment {wrapped.__qualname__}").splitlines()[0]

    def reset_kwargs(seed: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
        kwargs = dict(options or {})
        if seed is not None:
            kwargs["seed"] = seed
        return kwargs if reset_takes_any else {k: v for k, v in kwargs.items() if k in reset_params}

    def result(observation: Any, first: bool) -> StepResult[Any]:
        if not isinstance(observation, OpenEnvObservation):
            raise ServerError(ErrorCode.EXECUTION_ERROR, f"{wrapped.__qualname__} returned a {type(observation).__name__}, not an Observation")
        done, reward = observation.done, observation.reward
        try:
            data = observation.model_dump(mode="json", exclude=_LIFTED)
        except Exception:  # values pydantic cannot serialize: convert what it can, describe the rest
            from pydantic_core import to_jsonable_python

            data = to_jsonable_python(observation, exclude=_LIFTED, fallback=_jsonable)
        return StepResult(data, 0.0 if first or reward is None else float(reward), bool(done), False, {})

    class OpenEnvAdapter(Environment):  # type: ignore[type-arg]
        name = f"openenv:{target}"
        description = doc
        Action = _schema_type(action_cls)
        Observation = _schema_type(observation_cls)
        State = _schema_type(state_cls)
        blocking = bool(tools) or _overrides_async(wrapped)

        def __init__(self, **options: Any) -> None:
            with lock:
                if not concurrent and live[0] >= 1:
                    raise ServerError(
                        ErrorCode.CAPACITY_REACHED,
                        f"{wrapped.__qualname__} does not support concurrent sessions (SUPPORTS_CONCURRENT_SESSIONS = False); one session per server",
                    )
                live[0] += 1
            try:
                self.env = wrapped(**options)
            except BaseException:
                with lock:
                    live[0] -= 1
                raise

        @classmethod
        def parse_action(cls, raw: Any) -> Any:
            if type(raw) is int and takes_action_id:  # a bare legal-action id, as envfleet's policies send it
                raw = {"action_id": raw}
            if not isinstance(raw, dict):
                raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad action for {cls.name}: expected an object, got {type(raw).__name__}")
            try:
                return deserialize_action(raw, action_cls)
            except Exception as exc:  # pydantic.ValidationError and what a validator raises
                raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad action for {cls.name}: {exc}") from None

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[Any]:
            return result(self.env.reset(**reset_kwargs(seed, options)), first=True)

        def step(self, action: Any) -> StepResult[Any]:
            return result(self.env.step(action), first=False)

        def state(self) -> Any:
            return self.env.state.model_dump(mode="json")

        def close(self) -> None:
            env, self.env = self.env, None
            if env is None:
                return
            with lock:
                live[0] -= 1
            env.close()

        def openenv_observation(self, observation: Any) -> Any:
            return observation

        async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:  # type: ignore[override]
            async with self.env.mcp_session() as client:
                outcome = await client.call_tool(name, arguments, raise_on_error=False)
            if outcome.is_error:
                text = " ".join(getattr(c, "text", "") for c in outcome.content)
                raise ServerError(ErrorCode.EXECUTION_ERROR, f"tool {name!r} failed: {text}")
            if outcome.structured_content is not None:
                return outcome.structured_content
            return {"content": [c.model_dump(mode="json") for c in outcome.content]}

    OpenEnvAdapter.tools = tools
    OpenEnvAdapter.__qualname__ = OpenEnvAdapter.__name__ = f"OpenEnv[{wrapped.__qualname__}]"
    return OpenEnvAdapter
