"""The grading process's side of the Python sandbox grader, and the value encoding both sides share.

Trust boundary: this file runs twice. Its source is passed to a fresh, isolated process
(``python -I -S -c``; see ``grader.py``) that replays the agent's cells, calls the
agent's function on each hidden input and writes each result, encoded, to a private pipe.
The server imports the same file for ``encode_value``/``canonical`` to encode the expected
results it computed itself, and compares encodings byte for byte. Nothing here ever
decides whether a test passed: the grading process only reports values.

The encoding is tagged and exact: ``None``, ``bool`` and ``str`` as JSON, an ``int`` as a
JSON number (or ``["int", hex]`` beyond 2**53), a ``float`` as ``["float", repr]`` and
every container as ``[type name, items]`` (dicts and sets in a canonical order). Only
values whose type is exactly one of these builtins encode: a subclass of ``list``, ``str``
or ``int``, or any object that merely compares equal, is ``unencodable`` and fails its test.

Only the standard library is imported here: in the grading process nothing else is on
the path until the agent's cells run, and they run after this module has bound the
builtins it uses.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys

TYPE_CHECKING = False  # the grading process starts faster without importing typing
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 64  # nesting of an encoded value
MAX_RESULT = 4 << 20  # bytes of one encoded result
HEADER = 4  # little-endian length of a result frame
_SAFE_INT = 1 << 53
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False, check_circular=False)


class Unencodable(Exception):
    """The value is not plain data of an exactly-known type."""


def encode_value(value: Any, depth: int = 0) -> Any:
    """Turn plain data into its tagged JSON form; raise ``Unencodable`` for anything else."""
    kind = type(value)
    if kind is str or kind is bool or value is None:  # identity: no metaclass __eq__ takes part
        return value
    if depth >= MAX_DEPTH:
        raise Unencodable(f"nested deeper than {MAX_DEPTH}")
    if kind is int:
        return value if -_SAFE_INT < value < _SAFE_INT else ["int", format(value, "x")]
    if kind is float:
        return ["float", float.__repr__(value)]
    if kind is list or kind is tuple:
        items = [
            item if (t := type(item)) is str or (t is int and -_SAFE_INT < item < _SAFE_INT) else encode_value(item, depth + 1)
            for item in value
        ]  # the common flat cases without a call per item
        return [kind.__name__, items]
    if kind is dict:
        pairs = [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in dict.items(value)]
        pairs.sort(key=lambda pair: _ENCODER.encode(pair[0]))
        return ["dict", pairs]
    if kind is set or kind is frozenset:
        items = sorted((encode_value(item, depth + 1) for item in value), key=_ENCODER.encode)
        return [kind.__name__, items]
    if kind is bytes:
        return ["bytes", bytes.hex(value)]
    raise Unencodable(f"{kind.__module__}.{kind.__qualname__} is not plain data")


def canonical(value: Any) -> bytes:
    """The bytes two equal values of exactly the same types share."""
    return _ENCODER.encode(encode_value(value)).encode()


_CONTAINERS: dict[str, Any] = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def decode_value(data: Any, depth: int = 0) -> Any:
    """Inverse of ``encode_value`` over parsed JSON; ``ValueError`` for anything it would not produce."""
    kind = type(data)
    if kind is str or kind is bool or data is None:
        return data
    if kind is int:
        if not -_SAFE_INT < data < _SAFE_INT:
            raise ValueError("a large int must be tagged")
        return data
    if kind is not list or len(data) != 2 or type(data[0]) is not str or depth >= MAX_DEPTH:
        raise ValueError("not a tagged value")
    tag, body = data
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "float" and type(body) is str:
        return float(body)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"bad body for {tag!r}")
    if tag == "dict":
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("a dict item must be a pair")
            out[decode_value(pair[0], depth + 1)] = decode_value(pair[1], depth + 1)
        return out
    container = _CONTAINERS.get(tag)
    if container is None:
        raise ValueError(f"unknown tag {tag!r}")
    items = [
        item if (t := type(item)) is str or (t is int and -_SAFE_INT < item < _SAFE_INT) else decode_value(item, depth + 1)
        for item in body
    ]
    return items if container is list else container(items)


# --------------------------------------------------------------------------- the grading process


class _Timeout(BaseException):
    pass


_BUILTIN_EXCEPTIONS = {cls: name for name, cls in vars(builtins).items() if isinstance(cls, type) and issubclass(cls, BaseException)}


def _outcome(error: BaseException) -> tuple[str, str]:
    """How a test that raised is reported: ``raised`` for an ordinary exception, ``abort`` for an exit."""
    kind = type(error)
    name = _BUILTIN_EXCEPTIONS.get(kind) or f"custom:{kind.__qualname__}"
    skipped = any(cls.__name__ == "SkipTest" for cls in kind.__mro__)
    return ("raised" if isinstance(error, Exception) and not skipped else "abort"), name


def _apply_limits(config: dict[str, Any]) -> None:
    import resource

    for kind, value in (
        (resource.RLIMIT_AS, config["memory_bytes"]),
        (resource.RLIMIT_FSIZE, config["file_bytes"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, config["cpu_seconds"]),
    ):
        resource.setrlimit(kind, (value, value))


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    os.close(fd)
    return b"".join(parts)


def _call(entry: Any, test: dict[str, Any]) -> Any:
    args = decode_value(test["args"])
    if "calls" not in test:
        return entry(*args)
    instance = entry(*args)
    return [getattr(instance, method)(*decode_value(call_args)) for method, call_args in test["calls"]]


def _grade(job: dict[str, Any], timeout: float, send: Any) -> None:
    """Replay the cells, then report one result per test, in order."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    me = os.getpid()
    for number, cell in enumerate(job["cells"], 1):
        try:
            exec(compile(cell, f"<cell {number}>", "exec"), namespace)
        except BaseException:  # noqa: B036 - a cell that raised or exited in the notebook did so there too
            pass
        if os.getpid() != me:  # a fork the cell made must not grade
            os._exit(0)
    entry = namespace.get(job["entry"])

    def alarm(signum: int, frame: Any) -> None:
        raise _Timeout

    for index, test in enumerate(job["tests"]):
        if not callable(entry):
            send(index, "missing", job["entry"])
            continue
        try:
            try:
                signal.signal(signal.SIGALRM, alarm)
                signal.setitimer(signal.ITIMER_REAL, timeout)
                value = _call(entry, test)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            status, payload = "value", encode_value(value)
        except _Timeout:
            status, payload = "timeout", None
        except Unencodable as exc:
            status, payload = "unencodable", str(exc)[:200]
        except BaseException as exc:  # noqa: B036 - reported by class name
            status, payload = _outcome(exc)
        if os.getpid() != me:
            os._exit(0)
        send(index, status, payload)


def main() -> None:
    """Wait for ``go``, grade the job in ``job_fd``, write result frames to ``result_fd``, exit."""
    config = json.loads(sys.argv[2])
    sys.argv = [""]
    result_fd = config["result_fd"]
    os.set_inheritable(result_fd, False)
    _apply_limits(config)
    if os.read(config["go_fd"], 1) != b"g":  # the server let this spare go unused
        os._exit(0)
    os.close(config["go_fd"])
    job = json.loads(_read_all(config["job_fd"]))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # nothing the agent's code prints is seen by anyone
        os.dup2(devnull, fd)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    sys.path.extend(config["paths"])  # the same libraries the notebook could import
    encode = _ENCODER.encode
    write = os.write

    def send(index: int, status: str, payload: Any) -> None:
        try:
            body = encode([index, status, payload]).encode()
        except (ValueError, TypeError, RecursionError):
            body = encode([index, "unencodable", "the result could not be written"]).encode()
        if len(body) > MAX_RESULT:
            body = encode([index, "unencodable", f"the result is over {MAX_RESULT} bytes"]).encode()
        view = memoryview(len(body).to_bytes(HEADER, "little") + body)
        while view:
            view = view[write(result_fd, view) :]

    _grade(job, config["timeout"], send)
    os._exit(0)  # no atexit hook of the agent's runs after the results


if __name__ == "__main__":
    main()
