"""``rollout``: benchmark, evaluate and manage envfleet pools from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import msgspec

from .errors import EnvError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DASHBOARD_PORT = 8765


def _fleet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="openspiel", help="registered name, package.module:Class or openenv:package.module:Class (default: openspiel)")
    parser.add_argument("--game", default="catch", help="OpenSpiel game (default: catch)")
    parser.add_argument("--options", type=json.loads, default={}, help="JSON object of environment options")
    parser.add_argument("--n", type=int, default=256, help="concurrent env sessions (default: 256)")
    parser.add_argument("--backend", default="local", choices=["local", "endpoints", "docker", "swarm", "ray"], help="where servers run")
    parser.add_argument("--servers", type=int, help="number of servers (default: one per core)")
    parser.add_argument("--endpoint", action="append", default=[], help="server URL or dns://name:port (backend endpoints)")
    parser.add_argument("--image", default="envfleet:latest", help="image of the docker and swarm backends")
    parser.add_argument("--network", choices=["published", "isolated"], help="docker: isolated = no route out (default for python_sandbox)")
    parser.add_argument("--max-sessions", type=int, help="session cap per server")
    parser.add_argument("--token", help="bearer token of the servers")
    parser.add_argument("--ray-address", help="backend ray: 'auto', host:port or ray://host:port (default: this job's or a local cluster)")


def _dashboard_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dashboard",
        nargs="?",
        const=DASHBOARD_PORT,
        type=int,
        metavar="PORT",
        help=f"serve a live dashboard on 127.0.0.1:PORT while the command runs (default port {DASHBOARD_PORT}; 0: a free one)",
    )


def _pool_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.options)
    if args.env == "openspiel":
        options.setdefault("game", args.game)
    kwargs: dict[str, Any] = {
        "n": args.n,
        "env": args.env,
        "backend": args.backend,
        "servers": args.servers,
        "options": options,
        "endpoints": tuple(args.endpoint),
        "image": args.image,
        "network": args.network,
        "token": args.token,
        "ray_address": args.ray_address,
    }
    if args.max_sessions is not None:
        kwargs["max_sessions"] = args.max_sessions
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollout", description="Drive envfleet environment pools.")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="measure steps/s, episodes/s and step latency of a pool")
    _fleet_args(bench)
    _dashboard_arg(bench)
    bench.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode (default: 10)")
    bench.add_argument("--mode", choices=["per-env", "batched", "vector", "both", "all"], default="both", help="both: per-env and batched; all: also vector (numpy batches, auto-reset in the servers)")
    bench.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write results as JSON to PATH (or stdout)")
    bench.add_argument("--keep-going", action="store_true", help="count failed calls (by class) and go on instead of stopping at the first")
    bench.add_argument("--policy", help="module:function choosing each action (default: a random legal action)")
    bench.set_defaults(handler=_bench)

    ev = commands.add_parser("eval", help="play a policy for many episodes into a resumable JSONL file")
    _fleet_args(ev)
    _dashboard_arg(ev)
    ev.add_argument("--policy", default="random", help="random, first-legal or module:function; a function marked rollout.vector.vectorized plays batched (default: random)")
    ev.add_argument("--episodes", type=int, default=1000, help="episodes to play (default: 1000)")
    ev.add_argument("--seed", type=int, default=0, help="run seed; episode i is seeded from it and i (default: 0)")
    ev.add_argument("--out", required=True, help="results JSONL; re-running with the same file resumes")
    ev.add_argument("--summary-json", metavar="PATH", help="also write the summary as JSON to PATH ('-': stdout)")
    ev.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines when not on a terminal")
    ev.set_defaults(handler=_eval)

    rep = commands.add_parser("report", help="summarize an eval results file; optionally plot it")
    rep.add_argument("file", help="results JSONL written by rollout eval")
    rep.add_argument("--plot", metavar="PNG", help="draw the return histogram and the running mean (needs matplotlib)")
    rep.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the summary as JSON to PATH (or stdout)")
    rep.set_defaults(handler=_report)

    _fleet_parser(commands)

    env = commands.add_parser("env", help="write environment packages")
    env_sub = env.add_subparsers(dest="env_command", required=True)
    new = env_sub.add_parser("new", help="write an installable environment package that passes its own tests")
    new.add_argument("name", help="environment name: lowercase letters, digits, '-' or '_'")
    new.add_argument("--dir", help="where to write it (default: ./NAME; must not exist or be empty)")
    new.set_defaults(handler=_env_new)

    image = commands.add_parser("image", help="build the envserver container image (offline: never pulls)")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build the base image if missing, the wheelhouse, then the image")
    build.add_argument("--base", help="base image (default: a Debian image built locally with debootstrap)")
    build.add_argument("--tag", default="envfleet:latest", help="tag of the image (default: envfleet:latest)")
    build.add_argument(
        "--with", dest="with_packages", action="append", default=[], metavar="PATH",
        help="also install this package directory or wheel, with its dependencies (repeatable)",
    )
    build.set_defaults(handler=_image_build)
    return parser


def _fleet_parser(commands: Any) -> None:
    fleet = commands.add_parser("fleet", help="deploy and manage fleets of servers")
    sub = fleet.add_subparsers(dest="fleet_command", required=True)
    ls = sub.add_parser("ls", help="list envfleet containers (yours; --all: every user's)")
    ls.add_argument("--all", action="store_true", help="every user's containers")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _fleet_backend_args(ls)
    ls.set_defaults(handler=_fleet_ls)
    reap = sub.add_parser("reap", help="remove expired and orphaned envfleet containers and swarm services (--all: all of yours)")
    reap.add_argument("--all", action="store_true", help="remove all of your envfleet containers, not only leftovers")
    _fleet_backend_args(reap)
    reap.set_defaults(handler=_fleet_reap)
    k8s = sub.add_parser("k8s-manifest", help="print Kubernetes manifests of a fleet (Deployment, headless Service, ...)")
    k8s.add_argument("--replicas", type=int, default=2, help="pods (default: 2)")
    k8s.add_argument("--image", default="envfleet:latest", help="server image (default: envfleet:latest)")
    k8s.add_argument("--token", help="also emit a Secret holding this bearer token (default: no Secret; create it with kubectl, see the README)")
    k8s.add_argument("--name", default="envfleet", help="name of the Deployment and Service (default: envfleet)")
    k8s.add_argument("--env", default="openspiel", help="environment name (default: openspiel)")
    k8s.add_argument("--game", default="catch", help="OpenSpiel game (default: catch)")
    k8s.add_argument("--options", type=json.loads, default={}, help="JSON object of environment options")
    k8s.add_argument("--max-sessions", type=int, help="session cap per server")
    k8s.add_argument("--out", metavar="DIR", help="write one file per manifest and a kustomization.yaml into DIR")
    k8s.set_defaults(handler=_k8s_manifest)


def _fleet_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["docker", "ray"], default="docker",
                        help="docker (containers and swarm services) or ray (actors)")
    parser.add_argument("--ray-address", help="backend ray: the cluster (default: 'auto', the one this machine is part of)")


async def _fleet_ls(args: argparse.Namespace) -> int:
    if args.backend == "ray":
        return await _ray_ls(args)
    from .fleet.docker import list_containers

    rows = await list_containers(all_users=args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'NAME':<28} {'POOL':<14} {'STATE':<9} {'EXPIRED':<8} {'ORPHANED':<9} URL")
    for row in rows:
        print(f"{row['name']:<28} {row['pool']:<14} {row['state']:<9} {str(row['expired']):<8} {str(row['orphaned']):<9} {row['url'] or '-'}")
    return EXIT_OK


async def _fleet_reap(args: argparse.Namespace) -> int:
    if args.backend == "ray":
        return await _ray_reap(args)
    from .fleet.docker import reap
    from .fleet.swarm import reap_services

    services = await reap_services(expired_only=not args.all)  # first: the swarm would restart their containers
    if services:
        print(f"removed {len(services)} swarm service(s): {', '.join(services)}")
    removed = await reap(expired_only=not args.all)
    print(f"removed {len(removed)} container(s){': ' + ', '.join(removed) if removed else ''}")
    return EXIT_OK


async def _ray_ls(args: argparse.Namespace) -> int:
    from .fleet.ray import list_actors

    rows = await asyncio.to_thread(list_actors, args.ray_address or "auto")
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'NAME':<28} {'POOL':<14} {'STATE':<12} {'ORPHANED':<9} URL")
    for row in rows:
        print(f"{row['name']:<28} {row['pool']:<14} {row['state']:<12} {str(row['orphaned']):<9} {row.get('url') or '-'}")
    return EXIT_OK


async def _ray_reap(args: argparse.Namespace) -> int:
    from .fleet.ray import reap

    removed = await asyncio.to_thread(reap, args.ray_address or "auto", everything=args.all)
    print(f"removed {len(removed)} ray actor(s){': ' + ', '.join(removed) if removed else ''}")
    return EXIT_OK


async def _env_new(args: argparse.Namespace) -> int:
    from .commands.scaffold import new_environment

    for path in new_environment(args.name, args.dir):
        print(f"rollout: wrote {path}", file=sys.stderr)
    return EXIT_OK


async def _image_build(args: argparse.Namespace) -> int:
    from .commands.image import build_image

    await asyncio.to_thread(build_image, args.base, args.tag, lambda line: print(line, flush=True), args.with_packages)
    return EXIT_OK


async def _k8s_manifest(args: argparse.Namespace) -> int:
    from .commands.k8s import K8sOptions, manifests, render, write

    options = dict(args.options)
    if args.env == "openspiel":
        options.setdefault("game", args.game)
    opts = K8sOptions(
        name=args.name, replicas=args.replicas, image=args.image, token=args.token,
        env=args.env, env_options=options, max_sessions=args.max_sessions,
    )
    if args.out:
        for path in write(args.out, opts):
            print(f"rollout: wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(render(manifests(opts)))
    return EXIT_OK


def _emit_summary(summary: Any, json_path: str | None) -> None:
    from .commands.summary import format_summary, to_json

    if json_path == "-":
        print(to_json(summary))
        return
    if json_path:
        with open(json_path, "w") as out:
            out.write(to_json(summary) + "\n")
    print(format_summary(summary))


def _allow_local_modules() -> None:
    """Let --policy name a module in the current directory."""
    import os

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


async def _eval(args: argparse.Namespace) -> int:
    from .commands.dashboard import maybe_dashboard
    from .commands.eval import evaluate

    _allow_local_modules()
    async with maybe_dashboard(args.dashboard, "eval") as telemetry:
        summary = await evaluate(
            args.policy, args.episodes, out=args.out, seed=args.seed, progress=sys.stderr,
            progress_interval=args.progress_interval, telemetry=telemetry, **_pool_kwargs(args),
        )
    _emit_summary(summary, args.summary_json)
    return EXIT_OK


async def _report(args: argparse.Namespace) -> int:
    from .commands.report import plot, report

    summary, contents = report(args.file)
    if contents.dropped:
        print(f"rollout: {args.file}: ignoring a half-written last line ({contents.dropped} bytes)", file=sys.stderr)
    if args.plot:
        what = summary.env + (f" {summary.options['game']}" if "game" in summary.options else "")
        plot(contents.episodes, args.plot, f"{what}, policy {summary.policy}, seed {summary.seed}")
        print(f"rollout: wrote {args.plot}", file=sys.stderr)
    _emit_summary(summary, args.json)
    return EXIT_OK


async def _bench(args: argparse.Namespace) -> int:
    from .commands.bench import run_bench, table
    from .commands.dashboard import maybe_dashboard

    modes = {"both": ["per-env", "batched"], "all": ["per-env", "batched", "vector"]}.get(args.mode, [args.mode])
    policy = None
    if args.policy:
        from .commands.eval import load_policy

        _allow_local_modules()
        policy = load_policy(args.policy)[1](0)
    async with maybe_dashboard(args.dashboard, "bench") as telemetry:
        report = await run_bench(_pool_kwargs(args), modes, args.seconds, telemetry=telemetry, keep_going=args.keep_going, policy=policy)
    if args.json:
        payload = msgspec.json.format(msgspec.json.encode(report), indent=2).decode()
        if args.json == "-":
            print(payload)
            return EXIT_OK
        with open(args.json, "w") as out:
            out.write(payload + "\n")
    print(f"{report.env} {json.dumps(report.options)} on backend {report.backend}:")
    print(table(report.results))
    return EXIT_OK


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available; SIGTERM cancels like Ctrl-C so pools clean up."""

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # pragma: no cover
        return asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args.handler(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("rollout: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except (EnvError, ValueError, OSError) as exc:
        print(f"rollout: error: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    sys.exit(code)


if __name__ == "__main__":
    main()
