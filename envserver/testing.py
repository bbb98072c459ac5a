"""``check_environment``: what every envserver environment must do, checked like Gymnasium's ``check_env``.

Run it from an environment's own tests::

    from envserver.testing import check_environment
    check_environment(MyEnv, difficulty=1)  # keyword arguments are the environment's options

It collects every failure and raises one ``ConformanceError`` listing them all.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from . import envs
from .env import Environment
from .errors import ServerError
from .protocol import ErrorCode, StepResult, json_decoder, json_encoder, json_schema, msgpack_decoder, msgpack_encoder

# Payloads no environment's Action can be: each must be refused with a coded error.
WRONG_TYPED_ACTIONS: tuple[Any, ...] = ("not an action", [1, 2, 3], None, 3.5, {"no_such_field_in_any_action": 1})
REFUSAL_CODES = (ErrorCode.VALIDATION_ERROR, ErrorCode.INVALID_ACTION)
_FAILED: Any = object()  # what a call that failed (and was reported) returns


class ConformanceError(AssertionError):
    """An environment broke the contract; ``failures`` lists every broken rule in words."""

    def __init__(self, env_name: str, failures: list[str]) -> None:
        self.failures = failures
        listing = "\n".join(f"  - {failure}" for failure in failures)
        super().__init__(f"{env_name} fails {len(failures)} conformance check(s):\n{listing}")


class CheckReport(msgspec.Struct):
    """What ``check_environment`` verified, and what it could not (with why)."""

    env: str
    steps: int  # steps played per trajectory
    episode_ended: bool  # whether an episode ended within ``step_limit`` (needed for the step-after-end check)
    skipped: list[str] = []


def check_environment(
    env_class: type[Environment],  # type: ignore[type-arg]
    *,
    sample_action: Callable[[Any], Any] | None = None,
    bad_actions: Iterable[Any] = (),
    seed: int = 1234,
    step_limit: int = 200,
    volatile: Iterable[str] = (),
    **options: Any,
) -> CheckReport:
    """Check ``env_class`` created with ``options``; raise ``ConformanceError`` listing every failure.

    ``sample_action(observation)`` gives a valid raw (wire-form) action; by default the Action's
    defaults. ``bad_actions`` are extra raw actions that must be refused (e.g. illegal moves).
    ``volatile`` names observation fields that may differ between equal runs (e.g. wall time).
    """
    checker = _Checker(env_class, options, sample_action, list(bad_actions), seed, step_limit, frozenset(volatile))
    report = checker.run()
    if checker.failures:
        raise ConformanceError(getattr(env_class, "name", env_class.__name__), checker.failures)
    return report


class _Checker:
    def __init__(
        self,
        env_class: type[Environment],  # type: ignore[type-arg]
        options: dict[str, Any],
        sample_action: Callable[[Any], Any] | None,
        bad_actions: list[Any],
        seed: int,
        step_limit: int,
        volatile: frozenset[str],
    ) -> None:
        self.env_class = env_class
        self.options = options
        self.sample = sample_action or self._default_action
        self.bad_actions = [*WRONG_TYPED_ACTIONS, *bad_actions]
        self.seed = seed
        self.step_limit = step_limit
        self.volatile = volatile
        self.failures: list[str] = []
        self.skipped: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def run(self) -> CheckReport:
        name = getattr(self.env_class, "name", self.env_class.__name__)
        if not self.check_declarations():
            return CheckReport(str(name), 0, False, self.skipped)
        self.check_served()
        before = _holdings()
        first = self.trajectory(probe=False)
        second = self.trajectory(probe=True)  # bad actions between the steps must change nothing
        steps = len(first[0]) - 1 if first else 0
        if first and second:
            for index, (a, b) in enumerate(zip(first[0], second[0])):
                if a != b:
                    what = "the reset" if index == 0 else f"step {index}"
                    self.fail(f"same seed, same actions, different {what}: {_short(a)} != {_short(b)} (if a field is timing, pass volatile=)")
                    break
        after = _holdings()
        for kind, count in before.items():
            if after[kind] > count:
                self.fail(f"close() does not release what the environment holds: {after[kind] - count} more {kind} after closing it")
        ended = bool(first and first[1])
        if not ended:
            self.skipped.append(f"step after the end: no episode ended within step_limit={self.step_limit}")
        return CheckReport(str(name), steps, ended, self.skipped)

    # -- the checks

    def check_declarations(self) -> bool:
        cls = self.env_class
        for attr in ("name", "description"):
            value = getattr(cls, attr, None)
            if not isinstance(value, str) or not value.strip():
                self.fail(f"{attr} must be a non-empty string, not {value!r}")
        types_ok = True
        for attr in ("Action", "Observation", "State"):
            kind = getattr(cls, attr, None)
            if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
                self.fail(f"{attr} must be a msgspec.Struct subclass, not {kind!r}")
                types_ok = False
                continue
            try:
                json_encoder.encode(json_schema(kind))
            except Exception as exc:
                self.fail(f"{attr} has no JSON Schema: {type(exc).__name__}: {exc}")
                types_ok = False
        return types_ok

    def check_served(self) -> None:
        """Serve the class in-process and read its schema, metadata and one reset over HTTP."""
        from .app import create_app
        from .config import ServerConfig

        key = f"conformance-check-{id(self)}"
        envs.register(key, self.env_class)
        try:
            app = create_app(ServerConfig(env=key, env_options=self.options, web=False))
        except ServerError as exc:
            self.fail(f"a server cannot serve it: {exc.code}: {exc.message}")
            return
        finally:
            envs.unregister(key)
        calls = [("GET", "/schema", b""), ("GET", "/metadata", b""), ("POST", "/reset", b'{"seed": 1}')]
        try:
            replies = _run_apart(_asgi_calls(app, calls))
        finally:
            app.state.server.sessions.close_all()
        (schema_status, schema), (meta_status, meta), (reset_status, reset) = replies
        expected = {kind: json_schema(getattr(self.env_class, attr)) for kind, attr in (("action", "Action"), ("observation", "Observation"), ("state", "State"))}
        if schema_status != 200 or msgspec.json.decode(schema) != expected:
            self.fail(f"GET /schema does not serve the schemas of Action, Observation and State (status {schema_status})")
        if meta_status != 200 or msgspec.json.decode(meta).get("name") != self.env_class.name:
            self.fail(f"GET /metadata does not name the environment (status {meta_status}: {meta[:200]!r})")
        if reset_status != 200:
            self.fail(f"POST /reset failed over HTTP: status {reset_status}: {reset[:300]!r}")
            return
        self.check_schemas_validate(expected, msgspec.json.decode(reset).get("observation"))

    def check_schemas_validate(self, schemas: dict[str, Any], observation: Any) -> None:
        """Every schema is a valid JSON Schema, and the observation ``/reset`` sent matches its own."""
        try:
            import jsonschema
        except ImportError:
            self.skipped.append("the JSON Schemas themselves: jsonschema is not installed")
            return
        for kind, schema in schemas.items():
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as exc:
                self.fail(f"the {kind} JSON Schema is invalid: {exc.message}")
                return
        try:
            jsonschema.validate(observation, schemas["observation"])
        except jsonschema.ValidationError as exc:
            self.fail(f"the observation /reset sends does not match its own JSON Schema: {exc.message}")

    def trajectory(self, probe: bool) -> tuple[list[bytes], bool] | None:
        """Play one seeded episode; with ``probe``, also send refused actions and step after the end."""
        try:
            env = self.env_class(**self.options)
        except Exception as exc:
            self.fail(f"creating it with options {self.options!r} raised {type(exc).__name__}: {exc}")
            return None
        record: list[bytes] = []
        try:
            result = self.call(f"reset(seed={self.seed})", lambda: env.reset(seed=self.seed))
            if not self.check_result("reset", result, env):
                return None
            if result.terminated or result.truncated:
                self.fail("reset returned an episode that is already over")
            record.append(self.fingerprint(result))
            while not (result.terminated or result.truncated) and len(record) <= self.step_limit:
                if probe:
                    self.check_refusals(env, len(record) - 1)
                raw = self.call("sample_action", lambda: self.sample(result.observation))
                action = _FAILED if raw is _FAILED else self.call(f"parse_action({_short(raw)})", lambda: env.parse_action(raw))
                if action is _FAILED:
                    return None
                result = self.call("step", lambda: env.step(action))
                if not self.check_result(f"step {len(record)}", result, env):
                    return None
                record.append(self.fingerprint(result))
            ended = result.terminated or result.truncated
            if probe and ended and len(record) > 1:
                self.check_step_after_end(env, raw)  # the last action, valid a moment ago
            return record, ended
        finally:
            try:
                env.close()
            except Exception as exc:
                self.fail(f"close() raised {type(exc).__name__}: {exc}")

    def check_result(self, where: str, result: Any, env: Environment) -> bool:  # type: ignore[type-arg]
        if result is _FAILED:
            return False
        if not isinstance(result, StepResult):
            self.fail(f"{where} returned {type(result).__name__}, not a StepResult")
            return False
        ok = True
        if not isinstance(result.observation, self.env_class.Observation):
            self.fail(f"{where}: the observation is a {type(result.observation).__name__}, not {self.env_class.Observation.__name__}")
            ok = False
        if type(result.reward) is not float:
            self.fail(f"{where}: reward must be a float, not {type(result.reward).__name__}")
        if type(result.terminated) is not bool or type(result.truncated) is not bool:
            self.fail(f"{where}: terminated and truncated must be bools")
        if not isinstance(result.info, dict):
            self.fail(f"{where}: info must be a dict")
        self.check_codecs(where, result)
        state = self.call(f"state() after {where}", env.state)
        if state is not _FAILED and not isinstance(state, self.env_class.State):
            self.fail(f"state() after {where} is a {type(state).__name__}, not {self.env_class.State.__name__}")
        elif state is not _FAILED:
            self.check_codecs(f"state() after {where}", state, self.env_class.State)
        try:
            json_encoder.encode(env.openenv_observation(result.observation))
        except Exception as exc:
            self.fail(f"{where}: the OpenEnv form of the observation is not JSON: {type(exc).__name__}: {exc}")
        return ok

    def check_codecs(self, where: str, value: Any, kind: Any = None) -> None:
        """``value`` comes back equal through msgpack (the mux) and through JSON."""
        kind = kind or StepResult[self.env_class.Observation]  # type: ignore[name-defined]
        for codec, encode, decoder in (("msgpack", msgpack_encoder.encode, msgpack_decoder(kind)), ("JSON", json_encoder.encode, json_decoder(kind))):
            try:
                back = decoder.decode(encode(value))
            except Exception as exc:
                self.fail(f"{where}: does not round-trip through {codec}: {type(exc).__name__}: {exc}")
                continue
            if encode(back) != encode(value):
                self.fail(f"{where}: comes back different through {codec} (NaN or infinite floats? non-string dict keys?)")

    def check_refusals(self, env: Environment, step: int) -> None:  # type: ignore[type-arg]
        """Every bad action is refused with a coded error and leaves the episode as it was."""
        before = self.call("state()", env.state)
        for raw in self.bad_actions:
            try:
                env.step(env.parse_action(raw))
            except ServerError as exc:
                if exc.code not in REFUSAL_CODES:
                    self.fail(f"the bad action {_short(raw)} is refused with {exc.code}, not VALIDATION_ERROR or INVALID_ACTION")
            except Exception as exc:
                self.fail(f"the bad action {_short(raw)} raised {type(exc).__name__}: {exc} instead of a coded error")
            else:
                self.fail(f"the bad action {_short(raw)} was accepted at step {step}")
        after = self.call("state()", env.state)
        if before is not _FAILED and after is not _FAILED and self.strip(before) != self.strip(after):
            self.fail(f"refused actions changed the state at step {step}: {_short(before)} -> {_short(after)}")

    def check_step_after_end(self, env: Environment, raw: Any) -> None:  # type: ignore[type-arg]
        try:
            env.step(env.parse_action(raw))
        except ServerError as exc:
            if exc.code != ErrorCode.EPISODE_OVER:
                self.fail(f"a step after the end is refused with {exc.code}, not EPISODE_OVER")
        except Exception as exc:
            self.fail(f"a step after the end raised {type(exc).__name__}: {exc} instead of EPISODE_OVER")
        else:
            self.fail("a step after the end was accepted; it must raise ServerError(EPISODE_OVER)")

    # -- helpers

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            self.fail(f"{what} raised {type(exc).__name__}: {exc}")
            return _FAILED

    def fingerprint(self, result: StepResult[Any]) -> bytes:
        """The result's bytes on the mux, without the fields named volatile."""
        return msgpack_encoder.encode(self.strip(result))

    def strip(self, value: Any) -> Any:
        data = msgspec.to_builtins(value)
        if self.volatile:
            for holder in (data, data.get("observation") if isinstance(data, dict) else None):
                if isinstance(holder, dict):
                    for name in self.volatile:
                        holder.pop(name, None)
        return data

    def _default_action(self, observation: Any) -> Any:
        try:
            return msgspec.to_builtins(self.env_class.Action())
        except TypeError:
            raise TypeError(f"{self.env_class.Action.__name__} has required fields: pass sample_action=") from None


async def _asgi_calls(app: Any, calls: list[tuple[str, str, bytes]]) -> list[tuple[int, bytes]]:
    """Send plain HTTP requests straight to an ASGI app (no socket) and collect the replies."""
    replies = []
    for method, path, body in calls:
        sent: list[dict[str, Any]] = []
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if received:
                await asyncio.Event().wait()  # the client stays connected
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"check"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("check", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), 60)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        replies.append((status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")))
    return replies


def _run_apart(coro: Any) -> Any:
    """Run ``coro`` to the end on its own event loop (in a thread when the caller's loop is running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(coro)), name="check_environment")
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("serving the environment in-process failed (see the thread's traceback)")
    return box[0]


def _holdings() -> dict[str, int]:
    """Threads, child processes and open file descriptors of this process, after a garbage collection."""
    gc.collect()
    counts = {"threads": threading.active_count()}
    try:
        counts["file descriptors"] = len(os.listdir("/proc/self/fd"))
        children = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as listing:
                children += len(listing.read().split())
        counts["child processes"] = children
    except OSError:  # not Linux: threads only
        pass
    return counts


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
