"""Batch evaluation jobs: play a policy for many episodes, one JSONL line each, resumable.

    summary = await rollout.evaluate("random", 10_000, out="runs/ttt.jsonl", game="tic_tac_toe")

Policies are ``"random"`` (uniform over legal actions, seeded from each episode's seed, so a
run is reproducible), ``"first-legal"``, a ``"module:function"`` to import, or a callable;
custom ones are ``policy(observation) -> action``, sync or async, as for ``EnvPool.run``, or batched
``policy(obs_batch, mask_batch) -> actions`` marked with ``rollout.vector.vectorized``, which play
through ``VectorPool`` (numpy arrays, one columnar request per server per step).
Re-running with the same ``out`` appends only the episodes not recorded yet (see
``rollout.results`` for the file and how a killed job's last line is repaired).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, TYPE_CHECKING, Any

from .errors import EnvError, EvalError, InvalidAction, PolicyFailed, UnencodableAction
from .policies import first_legal, random_legal
from .pool import EnvPool, EpisodeRecord
from .results import EpisodeLine, Header, Outcome, ResultsFile
from .summary import EvalSummary, summarize

if TYPE_CHECKING:
    from .telemetry import Telemetry

PolicyFactory = Callable[[int], Callable[[Any], Any]]  # episode seed -> observation -> action


BUILTIN_POLICIES: dict[str, PolicyFactory] = {
    "random": random_legal,
    "first-legal": lambda seed: first_legal,
}


def load_policy(policy: str | Callable[[Any], Any]) -> tuple[str, PolicyFactory]:
    """The name and per-episode factory of a built-in name, a ``module:function`` or a callable."""
    if callable(policy):
        fn = policy
        name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        return name, lambda seed: fn
    name = policy.replace("_", "-") if policy.replace("_", "-") in BUILTIN_POLICIES else policy
    if name in BUILTIN_POLICIES:
        return name, BUILTIN_POLICIES[name]
    module_name, colon, attr = policy.partition(":")
    if not colon or not module_name or not attr:
        raise EvalError(f"unknown policy {policy!r}: use {', '.join(BUILTIN_POLICIES)} or module:function")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise EvalError(f"cannot load policy {policy!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise EvalError(f"policy {policy!r} is a {type(target).__name__}, not a callable")
    return policy, lambda seed: target


def outcome(record: EpisodeRecord) -> Outcome | None:
    """Win/draw/loss from the agent's return when the game is 2-player zero-sum, else ``None``.

    The client cannot ask the game for its utility type, so an episode counts as zero-sum
    when it ended with exactly two players' returns summing to zero.
    """
    returns = record.info.get("returns")
    if returns is None or len(returns) != 2 or abs(returns[0] + returns[1]) > 1e-9:
        return None
    return "win" if record.reward > 0 else "loss" if record.reward < 0 else "draw"


class Progress:
    """Episodes done / total, episodes/s and ETA: a redrawn bar on a TTY, a line every ``interval`` s otherwise."""

    def __init__(self, stream: IO[str] | None, total: int, done: int, interval: float = 5.0) -> None:
        self.stream = stream
        self.total = total
        self.start_done = self.done = done
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = 0.2 if self.tty else interval
        self.started = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.started = time.perf_counter()
        if self.stream is not None:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _clock(left / rate) if rate > 0 else "?"
        share = self.done / self.total if self.total else 1.0
        if self.tty:
            width = 20
            fill = int(share * width)
            bar = "█" * fill + "░" * (width - fill)
            return f"\r[{bar}] {self.done:,}/{self.total:,} {share:6.1%}  {rate:,.0f} episodes/s  ETA {eta}  "
        return f"eval: {self.done:,}/{self.total:,} episodes ({share:.1%}), {rate:,.0f} episodes/s, ETA {eta}\n"

    def draw(self) -> None:
        if self.stream is not None:
            self.stream.write(self.line())
            self.stream.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            self.draw()
            if self.tty and self.stream is not None:
                self.stream.write("\n")


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _say(stream: IO[str] | None, message: str) -> None:
    if stream is not None:
        stream.write(f"eval: {message}\n")
        stream.flush()


def _policy_error(exc: Exception, policy: str, out: str, kept: int) -> PolicyFailed:
    episode = getattr(exc, "episode", None)
    where = f"in episode {episode}" if episode is not None else "during the run"
    if isinstance(exc, InvalidAction | UnencodableAction):
        what = f"policy {policy} chose an {'illegal' if isinstance(exc, InvalidAction) else 'unencodable'} action {where}: {exc.message}"
    else:
        what = f"policy {policy} raised {type(exc).__name__}: {exc} {where}"
    return PolicyFailed(f"{what}; {kept:,} episodes are recorded in {out}; fix the policy and re-run to resume", episode=episode)


async def evaluate(
    policy: str | Callable[[Any], Any],
    episodes: int,
    *,
    out: str,
    seed: int = 0,
    n: int = 256,
    env: str = "openspiel",
    game: str | None = None,
    options: dict[str, Any] | None = None,
    backend: str = "local",
    servers: int | None = None,
    progress: IO[str] | None = sys.stderr,
    progress_interval: float = 5.0,
    fsync_interval: float = 1.0,
    telemetry: Telemetry | None = None,
    **pool_kwargs: Any,
) -> EvalSummary:
    """Play ``episodes`` episodes of ``policy``, appending one line each to ``out``; resume if it exists.

    ``pool_kwargs`` go to ``EnvPool`` (endpoints, image, token, max_sessions, ...). Raises
    ``EvalError`` when ``out`` belongs to another job, and ``PolicyFailed`` (naming the
    episode) when the policy raises or picks an illegal action; the file stays valid.
    ``telemetry`` (see ``rollout.dashboard``) is told the pool and every finished episode.
    """
    if episodes < 0:
        raise ValueError("episodes must be >= 0")
    name, factory = load_policy(policy)
    env_options = dict(options or {})
    if game is not None:
        env_options["game"] = game
    header = Header(env=env, options=env_options, seed=seed, policy=name, episodes=episodes, created=time.time())
    results = ResultsFile.open(out, header, fsync_interval=fsync_interval)
    try:
        contents = results.contents
        if contents.dropped:
            _say(progress, f"{out}: removed a half-written last line ({contents.dropped} bytes; the job was killed mid-write)")
        lines = [line for line in contents.episodes if line.episode < episodes]
        resumed = len(lines)
        if resumed:
            _say(progress, f"{out}: resuming, {resumed:,} of {episodes:,} episodes already recorded")
        todo = episodes - resumed
        seconds = 0.0
        if todo:
            played, seconds = await _play(
                results, factory, name, episodes, seed, todo, {line.episode for line in lines}, progress, progress_interval,
                telemetry, n=min(n, todo), env=env, backend=backend, servers=servers, options=env_options, **pool_kwargs,
            )
            lines += played
    finally:
        await results.close()
    lines.sort(key=lambda line: line.episode)
    return summarize(
        lines, contents.header or header, out, resumed=resumed, played=todo, seconds=seconds,
        episodes_per_s=todo / seconds if todo and seconds > 0 else None, truncated_bytes=contents.dropped,
    )


async def _play(
    results: ResultsFile, factory: PolicyFactory, name: str, episodes: int, seed: int, todo: int, skip: set[int],
    progress: IO[str] | None, progress_interval: float, telemetry: Telemetry | None, **pool_kwargs: Any,
) -> tuple[list[EpisodeLine], float]:
    """Play the episodes not in ``skip``; return their lines and the seconds it took (fleet start not counted)."""
    played: list[EpisodeLine] = []
    bar = Progress(progress, episodes, episodes - todo, progress_interval)
    async with EnvPool(**pool_kwargs) as pool:
        if telemetry is not None:
            telemetry.attach(pool)
            telemetry.start_eval(episodes, episodes - todo)
        bar.start()  # also starts the clock
        try:
            async for record in _records(pool, factory, episodes, seed, skip):
                info = record.info
                line = EpisodeLine(
                    episode=record.episode, seed=record.seed, ret=record.reward, length=record.length,
                    outcome=outcome(record), wall_time=round(info["wall_time"], 6), server=info["server"], time=round(time.time(), 3),
                )
                results.append(line)
                played.append(line)
                bar.done += 1
                if telemetry is not None:
                    telemetry.episode(record)
        except Exception as exc:
            if telemetry is not None:
                telemetry.error(exc)
            # The policy's fault: it raised, or chose an illegal or unencodable action. A server,
            # fleet or connection failure (any other EnvError) is reported as itself.
            policy_fault = isinstance(exc, InvalidAction | UnencodableAction) or (
                not isinstance(exc, EnvError) and getattr(exc, "episode", None) is not None
            )
            if policy_fault:
                raise _policy_error(exc, name, results.path, len(skip) + len(played)) from exc
            raise
        finally:
            await bar.stop()
        seconds = time.perf_counter() - bar.started
    return played, seconds


def _records(pool: EnvPool, factory: PolicyFactory, episodes: int, seed: int, skip: set[int]) -> AsyncIterator[EpisodeRecord]:
    """The pool's episode records: through ``VectorPool`` when the policy is batched (``rollout.vector.vectorized``)."""
    policy = factory(seed)
    if getattr(policy, "vectorized", False):
        from .vector import play_episodes

        return play_episodes(pool.vector("disabled"), policy, episodes, seed, skip=skip)
    return pool.run(factory, episodes, seed, skip=skip, per_episode=True)
