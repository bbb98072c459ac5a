"""``envserver`` / ``python -m envserver``: serve the environments its operator names, on Hypercorn with uvloop."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from . import __version__

log = logging.getLogger("envserver")

PR_SET_DUMPABLE = 4  # linux/prctl.h
MAX_TOKEN_BYTES = 4096
TOKEN_WAIT = 60.0  # seconds --token-file - waits for its line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="envserver", description="Serve environments over OpenEnv HTTP/WS and the envfleet mux.")
    parser.add_argument(
        "--env", action="append", metavar="SPEC",
        help="an environment to serve: a registered name (see --list-envs), package.module:Class, or "
        "openenv:package.module:Class; repeat to serve several, the first is the default (default: openspiel). "
        "Sessions of any other are refused.",
    )
    parser.add_argument("--list-envs", action="store_true", help="print the registered environments with their descriptions, then exit")
    parser.add_argument("--json", action="store_true", help="with --list-envs: print JSON")
    parser.add_argument("--game", help="OpenSpiel game to play by default (shorthand for --env-options '{\"game\": ...}')")
    parser.add_argument(
        "--env-options", action="append", type=json.loads, metavar="JSON",
        help="JSON object of operator settings (limits included) of the n-th --env; repeat once per --env",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); any other needs a token or --insecure")
    parser.add_argument("--port", default=8000, type=int, help="port to bind; 0 picks a free one (default 8000)")
    parser.add_argument("--max-sessions", default=4096, type=int, help="session cap of this server")
    parser.add_argument("--max-sessions-per-connection", default=4096, type=int, help="session cap of one mux connection")
    parser.add_argument("--max-blocking-per-connection", default=4096, type=int, help="calls of blocking envs in flight per mux connection")
    parser.add_argument("--idle-ttl", default=600.0, type=float, help="seconds before an idle session is freed")
    parser.add_argument("--max-frame-bytes", default=4 * 1024 * 1024, type=int, help="WebSocket frame / HTTP body limit")
    parser.add_argument(
        "--token-file", metavar="PATH",
        help="read the bearer token required on every route from the first line of PATH ('-': standard input)",
    )
    parser.add_argument(
        "--token", help="bearer token on the command line, for quick manual use: other local users can read it "
        "in the process list (and so can sandboxed code); prefer --token-file",
    )
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    parser.add_argument(
        "--allow-origin", action="append", default=[], metavar="ORIGIN",
        help="a browser Origin (scheme://host[:port]) allowed besides the server's own; repeatable",
    )
    parser.add_argument("--no-web", action="store_true", help="do not serve the browser play page")
    parser.add_argument("--lifetime", type=float, help="exit by itself after this many seconds")
    parser.add_argument("--exit-with-stdin", action="store_true", help="exit when standard input closes (the parent went away)")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--version", action="version", version=f"envserver {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    """The ServerConfig the arguments describe; ValueError on a contradiction (one line for the user)."""
    from .auth import is_loopback
    from .config import ServerConfig

    envs = tuple(args.env or ["openspiel"])
    options = list(args.env_options or [])
    if len(options) > len(envs):
        raise ValueError(f"{len(options)} --env-options for {len(envs)} --env; give at most one per --env, in the same order")
    for value in options:
        if not isinstance(value, dict):
            raise ValueError(f"--env-options must be a JSON object, not {value!r}")
    options += [{}] * (len(envs) - len(options))
    if args.game:
        options[0] = {**options[0], "game": args.game}
    if args.token and args.token_file:
        raise ValueError("give --token or --token-file, not both")
    token = read_token(args.token_file) if args.token_file else args.token or None
    if token is None and not args.insecure and not is_loopback(args.host):
        raise ValueError(
            f"refusing to serve {args.host} without a token: anyone who reaches it could run sessions; "
            "pass --token-file PATH (or --insecure if the network is yours alone)"
        )
    return ServerConfig(
        envs=envs,
        env_options=options[0],
        other_env_options={name: opts for name, opts in zip(envs[1:], options[1:])},
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        max_sessions_per_connection=args.max_sessions_per_connection,
        max_blocking_per_connection=args.max_blocking_per_connection,
        idle_ttl=args.idle_ttl,
        max_frame_bytes=args.max_frame_bytes,
        token=token,
        allow_origins=tuple(args.allow_origin),
        web=not args.no_web,
        lifetime=args.lifetime,
    )


def read_token(path: str, timeout: float = TOKEN_WAIT) -> str:
    """The first line of ``path`` (``-``: standard input, read without buffering past the line)."""
    if path == "-":
        raw, where = _read_line(0, timeout), "standard input"
    else:
        with open(path, "rb") as file:
            raw, where = file.read(MAX_TOKEN_BYTES + 1).partition(b"\n")[0], path
    token = raw.decode("utf-8", errors="replace").strip()
    if not token:
        raise ValueError(f"no token on the first line of {where}")
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"the token in {where} is longer than {MAX_TOKEN_BYTES} bytes")
    return token


def _read_line(fd: int, timeout: float) -> bytes:
    """Bytes up to the first newline of ``fd``, one read at a time (what follows stays unread)."""
    deadline = time.monotonic() + timeout
    line = bytearray()
    while len(line) <= MAX_TOKEN_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise ValueError(f"no token line on standard input within {timeout:g} s")
        byte = os.read(fd, 1)
        if byte in (b"", b"\n"):
            break
        line += byte
    return bytes(line)


def make_undumpable() -> None:
    """Forbid same-uid processes (sandboxed code included) to read this process's memory or environ."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


async def serve(config: Any, *, exit_with_stdin: bool = False) -> None:
    """Bind, announce the URL on stdout, serve until SIGTERM/SIGINT (or lifetime / stdin EOF)."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from .app import create_app

    app = create_app(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(1024)
    port = sock.getsockname()[1]

    hconfig = Config()
    hconfig.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the listening socket
    hconfig.websocket_max_message_size = 2 * config.max_frame_bytes  # the app answers frames in between
    hconfig.h11_max_incomplete_size = 64 * 1024
    hconfig.graceful_timeout = 2.0
    hconfig.keep_alive_timeout = 75.0
    hconfig.websocket_ping_interval = None
    hconfig.accesslog = None
    hconfig.loglevel = logging.getLevelName(logging.getLogger().level)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_cancellation)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.lifetime:
        loop.call_later(config.lifetime, stop.set)
    if exit_with_stdin:
        await _watch_stdin(loop, stop)

    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    print(f"envserver {','.join(config.envs)} listening on http://{host}:{port}", flush=True)
    await hypercorn_serve(app, hconfig, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def _quiet_cancellation(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop the CancelledError Python 3.11's stream callback reports for connections cut at shutdown."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    class _Watcher(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()

    await loop.connect_read_pipe(_Watcher, sys.stdin)


def list_envs(as_json: bool = False) -> int:
    """Print every registered environment and its description; one that fails to load says why."""
    import msgspec

    from .envs import describe

    rows = describe()
    if as_json:
        print(msgspec.json.encode(rows).decode())
        return 0
    width = max((len(row.name) for row in rows), default=0)
    for row in rows:
        print(f"{row.name:<{width}}  {row.description if row.error is None else '(cannot load: ' + row.error + ')'}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list_envs:
        sys.exit(list_envs(args.json))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        make_undumpable()  # before the token is read: from here on no same-uid process reads our memory
        config = build_config(args)
    except (OSError, ValueError) as exc:
        print(f"envserver: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        runner = asyncio.run
    try:
        runner(serve(config, exit_with_stdin=args.exit_with_stdin))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # bad config or environment: one clear line, exit 2
        from .errors import ServerError

        if isinstance(exc, (ServerError, OSError, ValueError)):
            print(f"envserver: error: {' '.join(str(exc).split())}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
