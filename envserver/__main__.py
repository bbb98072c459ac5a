"""``envserver`` / ``python -m envserver``: serve one environment on Hypercorn with uvloop."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from . import __version__

log = logging.getLogger("envserver")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="envserver", description="Serve an environment over OpenEnv HTTP/WS and the envfleet mux.")
    parser.add_argument("--env", default="openspiel", help="environment name (openspiel, echo, ...)")
    parser.add_argument("--game", help="OpenSpiel game to play by default (shorthand for --env-options '{\"game\": ...}')")
    parser.add_argument("--env-options", default="{}", type=json.loads, help="JSON object of environment defaults")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", default=8000, type=int, help="port to bind; 0 picks a free one (default 8000)")
    parser.add_argument("--max-sessions", default=4096, type=int, help="session cap of this server")
    parser.add_argument("--max-sessions-per-connection", default=4096, type=int, help="session cap of one mux connection")
    parser.add_argument("--idle-ttl", default=600.0, type=float, help="seconds before an idle session is freed")
    parser.add_argument("--max-frame-bytes", default=4 * 1024 * 1024, type=int, help="WebSocket frame / HTTP body limit")
    parser.add_argument("--token", default=os.environ.get("ENVSERVER_TOKEN"), help="bearer token required on every route (default $ENVSERVER_TOKEN)")
    parser.add_argument("--token-file", help="read the bearer token from the first line of this file ('-': standard input)")
    parser.add_argument("--no-web", action="store_true", help="do not serve the browser play page")
    parser.add_argument("--lifetime", type=float, help="exit by itself after this many seconds")
    parser.add_argument("--exit-with-stdin", action="store_true", help="exit when standard input closes (the parent went away)")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--version", action="version", version=f"envserver {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    from .config import ServerConfig

    options = dict(args.env_options)
    if args.token_file:
        args.token = _read_token(args.token_file)
    if args.game:
        options["game"] = args.game
    return ServerConfig(
        env=args.env,
        env_options=options,
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        max_sessions_per_connection=args.max_sessions_per_connection,
        idle_ttl=args.idle_ttl,
        max_frame_bytes=args.max_frame_bytes,
        token=args.token or None,
        web=not args.no_web,
        lifetime=args.lifetime,
    )


def _read_token(path: str) -> str:
    """The first line of ``path`` ('-': standard input, which stays open for ``--exit-with-stdin``)."""
    if path == "-":
        line = sys.stdin.buffer.readline()
    else:
        with open(path, "rb") as file:
            line = file.readline()
    token = line.decode().strip()
    if not token:
        raise ValueError(f"--token-file {path}: no token on its first line")
    return token


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
    print(f"envserver {config.env} listening on http://{host}:{port}", flush=True)
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
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
            print(f"envserver: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
