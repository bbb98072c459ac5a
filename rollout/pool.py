"""``EnvPool``: n environment sessions spread over a fleet of servers, one WebSocket per server.

    async with EnvPool(n=256, env="openspiel", game="catch") as pool:
        results = await pool.reset(seeds=range(256))           # one frame per server
        results = await pool.step([0] * 256)
        async for record in pool.run(policy, episodes=10_000, seed=0):
            ...
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from envserver.protocol import StepResult, episode_seed

from .client import DEFAULT_MAX_FRAME_BYTES, ClientState, EnvClient
from .config import FleetConfig
from .errors import EnvCrashed, EnvError, FleetError, PoolClosed, RequestTimeout, UnknownSession
from .fleet import FleetBackend, make_backend
from .openenv_client import OpenEnvClient, client_class

if TYPE_CHECKING:
    from .vector import VectorPool

log = logging.getLogger("rollout.pool")

Client = EnvClient | OpenEnvClient  # envserver's mux, or an unmodified OpenEnv server's /ws

Policy = Callable[[Any], Any]  # observation -> action, or an awaitable of one


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the pool talks to its servers.

    ``heartbeat``: seconds between keepalive pings of an idle connection (and WebSocket pings);
    they keep the pool's sessions alive on the servers through any pause of the caller.
    ``max_episode_retries``: how often ``run`` replays one episode (see ``RETRIED``).
    """

    n: int = 256
    request_timeout: float = 60.0
    heartbeat: float = 5.0
    max_episode_retries: int = 3


#: The errors after which ``EnvPool.run`` replays an episode from its seed: its server died
#: (``EnvCrashed``, including ``ProtocolError``), its session expired (``UnknownSession``) or
#: it got no answer in time (``RequestTimeout``). Every other error ends the run: the policy
#: raised, an action was invalid or unencodable, a request was too large, or the fleet could
#: not replace a server (``FleetError``).
RETRIED: tuple[type[EnvError], ...] = (EnvCrashed, UnknownSession, RequestTimeout)


class EpisodeRecord(msgspec.Struct, frozen=True):
    """One finished episode of ``EnvPool.run``: index, seed, the agent's total reward, length."""

    episode: int
    seed: int
    reward: float
    length: int
    info: dict[str, Any] = {}


class PoolState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class _Slot:
    """One server of the pool: its URL, its client and the envs placed on it."""

    def __init__(self, url: str, client: Client, options: dict[str, Any]) -> None:
        self.url = url
        self.client = client
        self.options = options  # the sessions' open options
        self.envs: list[Env] = []
        self.ready = asyncio.Event()
        self.ready.set()
        self.replacements = 0  # also the session generation: an episode started before a replacement is lost
        self.failure: FleetError | None = None  # why the last replacement failed (cleared when one succeeds)


class Env:
    """One environment session of a pool; Gymnasium-shaped async calls."""

    __slots__ = ("index", "sid", "_slot", "_generation")

    def __init__(self, index: int, sid: int, slot: _Slot) -> None:
        self.index = index
        self.sid = sid
        self._slot = slot
        self._generation = 0  # the slot's replacement count when this env's episode began

    @property
    def server(self) -> str:
        return self._slot.url

    async def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[Any]:
        """Start an episode; the same seed gives the same episode. A session the server expired is opened again."""
        slot = self._slot
        if slot.failure is not None:
            raise slot.failure
        self._generation = slot.replacements
        try:
            return await slot.client.reset(self.sid, seed, options, label=self.index)
        except UnknownSession:
            await slot.client.open(self.sid, None, slot.options, label=self.index)
            return await slot.client.reset(self.sid, seed, options, label=self.index)

    def step(self, action: Any) -> Awaitable[StepResult[Any]]:
        """Apply one action; gives observation, reward, terminated, truncated, info."""
        slot = self._slot
        if slot.replacements != self._generation:  # the episode died with the old server
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(self.lost_episode_error())
            return future
        return slot.client.step(self.sid, action, label=self.index)

    def lost_episode_error(self) -> EnvCrashed:
        """The error of a step in an episode that began on a server since replaced."""
        message = f"the server was replaced during this episode (now {self._slot.url}); reset to start a new one"
        return EnvCrashed(message, env=self.index, server=self._slot.url)

    def state(self) -> Awaitable[Any]:
        return self._slot.client.get_state(self.sid, label=self.index)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until this env's server is usable (after a replacement); raise ``FleetError`` if it could not be replaced."""
        slot = self._slot
        if slot.client.state is not ClientState.OPEN and slot.failure is None:
            slot.ready.clear()  # dead, and the pool's watcher may not have run yet: it sets this again
        try:
            await asyncio.wait_for(slot.ready.wait(), timeout)
        except TimeoutError:
            raise FleetError(f"server {slot.url} was not replaced within {timeout:g} s", env=self.index, server=slot.url) from None
        if slot.failure is not None:
            raise slot.failure

    def __repr__(self) -> str:
        return f"Env(index={self.index}, server={self._slot.url!r})"


class EnvPool:
    """n environment handles over a fleet of envserver processes or containers."""

    def __init__(
        self,
        n: int = 256,
        env: str = "openspiel",
        game: str | None = None,
        backend: str = "local",
        *,
        servers: int | None = None,
        options: dict[str, Any] | None = None,
        fleet: FleetConfig | None = None,
        config: PoolConfig | None = None,
        **fleet_fields: Any,
    ) -> None:
        env_options = dict(options or {})
        if game is not None:
            env_options["game"] = game
        self.fleet_config = fleet or FleetConfig(backend=backend, servers=servers, env=env, env_options=env_options, **fleet_fields)
        self.config = config or PoolConfig(n=n)
        if self.config.n < 1:
            raise ValueError("n must be at least 1")
        self.state = PoolState.NEW
        self.envs: list[Env] = []
        self.backend: FleetBackend | None = None
        self._slots: list[_Slot] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._owner: asyncio.Task[Any] | None = None
        self._sigterm_installed = False
        self._plans: dict[tuple[int, ...], list[tuple[_Slot, list[int], list[int], list[int]]]] = {}
        #: One ``(old_url, lost_at, ready_at)`` per replaced server, ``time.monotonic()`` times.
        self.replacements_log: list[tuple[str, float, float]] = []

    @property
    def n(self) -> int:
        return self.config.n

    @property
    def servers(self) -> list[str]:
        return [slot.url for slot in self._slots]

    @property
    def clients(self) -> list[Client]:
        return [slot.client for slot in self._slots]

    # -- lifecycle

    async def __aenter__(self) -> EnvPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the fleet, connect to every server and open the n sessions."""
        if self.state is not PoolState.NEW:
            raise PoolClosed(f"pool is {self.state.value}; make a new one")
        self.state = PoolState.OPEN
        self._install_sigterm()
        try:
            self.backend = make_backend(self.fleet_config)
            urls = await self.backend.start()
            clients = await asyncio.gather(*(self._connect(url) for url in urls))
            self._slots = [_Slot(url, client, self.fleet_config.env_options) for url, client in zip(urls, clients)]
            for index in range(self.config.n):
                slot = self._slots[index % len(self._slots)]
                env = Env(index, slot.client.new_sid(), slot)
                slot.envs.append(env)
                self.envs.append(env)
            await asyncio.gather(*(self._open_sessions(slot.client, slot.envs) for slot in self._slots))
            self._watchers = [asyncio.create_task(self._watch(slot)) for slot in self._slots]
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every connection and stop the fleet (idempotent)."""
        if self.state is PoolState.CLOSED:
            return
        self.state = PoolState.CLOSED
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(slot.client.close() for slot in self._slots), return_exceptions=True)
        if self.backend is not None:
            await asyncio.shield(self.backend.stop())
        self._remove_sigterm()

    def _check_open(self) -> None:
        if self.state is not PoolState.OPEN:
            raise PoolClosed(f"pool is {self.state.value}")

    async def _connect(self, url: str) -> Client:
        assert self.backend is not None
        cls = client_class(url)
        options: dict[str, Any] = {
            "env": self.fleet_config.env,
            "token": self.backend.token,
            "request_timeout": self.config.request_timeout,
            "heartbeat": self.config.heartbeat,
        }
        if cls is EnvClient:  # the frame limit is envserver's; an OpenEnv server keeps its own
            options["max_frame_bytes"] = self.fleet_config.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES
        return await cls(url, **options).connect()

    async def _open_sessions(self, client: Client, envs: list[Env]) -> None:
        options = self.fleet_config.open_options()
        await asyncio.gather(*(client.open(env.sid, None, options, label=env.index) for env in envs))

    async def _watch(self, slot: _Slot) -> None:
        """Replace the slot's server whenever its connection dies; a failure reaches the slot's callers."""
        try:
            while self.state is PoolState.OPEN:
                await slot.client.wait_broken()
                if self.state is not PoolState.OPEN:
                    return
                await self._replace(slot)
        except Exception as exc:  # a bug here must not strand the slot's callers
            log.exception("the watcher of %s failed", slot.url)
            slot.failure = FleetError(f"the pool stopped watching {slot.url}: {exc!r}", server=slot.url)
            slot.ready.set()
            raise

    async def _replace(self, slot: _Slot) -> None:
        """Start a new server for the slot and re-open its sessions, retrying with backoff.

        If no attempt succeeds within the fleet's ``start_timeout``, ``slot.failure`` tells
        every waiting and later call why (a ``FleetError`` with the cause); attempts go on
        in the background, and the first that succeeds clears it.
        """
        assert self.backend is not None
        lost_at = time.monotonic()
        slot.ready.clear()
        slot.replacements += 1  # from now on, episodes begun on the old server fail their steps
        await slot.client.close()
        old = slot.url
        log.warning("server %s lost (%s); replacing it", self.backend.describe(old), slot.client.broken_reason)
        timeout = self.fleet_config.start_timeout
        deadline, delay = lost_at + timeout, 0.5
        cause, error = f"no new server was up within {timeout:g} s (FleetConfig.start_timeout)", None
        while self.state is PoolState.OPEN:
            client = None
            try:
                async with asyncio.timeout(max(1.0, deadline - time.monotonic()) if slot.failure is None else timeout):
                    url = await self.backend.replace(old)
                    client = await self._connect(url)
                    await self._open_sessions(client, slot.envs)
                slot.url, slot.client, slot.failure = url, client, None  # swapped only once every session is open
                break
            except BaseException as exc:  # Docker errors, port conflicts, a missing image, a hung daemon call: all reported
                if client is not None:
                    await asyncio.shield(client.close())
                if not isinstance(exc, Exception):  # cancelled: the pool is closing
                    raise
                if not (isinstance(exc, TimeoutError) and not str(exc)):  # not just this attempt's deadline: a cause
                    cause, error = (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), exc
                if slot.failure is None and time.monotonic() >= deadline - delay:
                    slot.failure = FleetError(f"cannot replace the lost server {old}: {cause}", server=old)
                    slot.failure.__cause__ = error or exc
                    slot.ready.set()  # wake the waiting calls: they raise slot.failure
                log.warning("replacing %s failed: %r; retrying in %.1f s", old, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.replacements_log.append((old, lost_at, time.monotonic()))
        slot.ready.set()

    def _install_sigterm(self) -> None:
        """Turn SIGTERM into cancellation of the task that owns the pool, so cleanup runs."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application handles SIGTERM itself
        self._owner = asyncio.current_task()
        if self._owner is None:
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._owner.cancel)
            self._sigterm_installed = True
        except (NotImplementedError, RuntimeError):
            pass

    def _remove_sigterm(self) -> None:
        if self._sigterm_installed:
            self._sigterm_installed = False
            try:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            except RuntimeError:
                pass

    # -- batched calls (one frame per server)

    async def reset(
        self,
        seeds: Iterable[int | None] | None = None,
        env_ids: Sequence[int] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Reset the envs ``env_ids`` (default: all) with ``seeds`` (default: unseeded)."""
        ids = range(self.n) if env_ids is None else env_ids
        args = [None] * len(ids) if seeds is None else list(seeds)
        if len(args) != len(ids):
            raise ValueError(f"{len(args)} seeds for {len(ids)} envs")
        return await self._batch("reset", ids, args, return_exceptions)

    async def step(
        self,
        actions: Sequence[Any],
        env_ids: Sequence[int] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Step the envs ``env_ids`` (default: all) with one action each."""
        ids = range(self.n) if env_ids is None else env_ids
        if len(actions) != len(ids):
            raise ValueError(f"{len(actions)} actions for {len(ids)} envs")
        return await self._batch("step", ids, actions, return_exceptions)

    def vector(self, autoreset: str = "next_step", *, batch_size: int | None = None, text: bool = False) -> VectorPool:
        """The pool's envs as one numpy batch (``rollout.vector.VectorPool``), auto-reset by the servers."""
        from .vector import VectorPool

        return VectorPool(self, autoreset, batch_size=batch_size, text=text)

    async def states(self, env_ids: Sequence[int] | None = None) -> list[Any]:
        ids = range(self.n) if env_ids is None else env_ids
        self._check_open()
        return list(await asyncio.gather(*(self.envs[i].state() for i in ids)))

    async def _batch(self, op: str, ids: Sequence[int], args: Sequence[Any], return_exceptions: bool) -> list[Any]:
        self._check_open()
        results: list[Any] = [None] * len(ids)
        pending = []
        for slot, positions, sids, labels in self._plan(ids):
            if slot.failure is not None:
                for position in positions:
                    results[position] = slot.failure
                continue
            if op == "reset":
                for index in labels:
                    self.envs[index]._generation = slot.replacements
            elif slot.replacements and any(self.envs[index]._generation != slot.replacements for index in labels):
                positions, sids, labels = self._drop_lost(slot, positions, sids, labels, results)
                if not positions:
                    continue
            try:
                future = slot.client.batch(op, sids, [args[p] for p in positions], labels)
                pending.append((positions, future))
            except EnvError as exc:  # the server is down: every env on it fails now
                for position in positions:
                    results[position] = exc
        for positions, future in pending:
            for position, value in zip(positions, await future):
                results[position] = value
        if op == "reset":
            await self._reset_expired(ids, args, results)
        if not return_exceptions:
            for value in results:
                if isinstance(value, BaseException):
                    raise value
        return results

    async def _reset_expired(self, ids: Sequence[int], seeds: Sequence[Any], results: list[Any]) -> None:
        """Open again the sessions the servers expired (``UnknownSession``) and reset them once more."""
        expired = [position for position, value in enumerate(results) if isinstance(value, UnknownSession)]
        if not expired:
            return
        outcomes = await asyncio.gather(*(self.envs[ids[p]].reset(seeds[p]) for p in expired), return_exceptions=True)
        for position, outcome in zip(expired, outcomes):
            results[position] = outcome

    def _drop_lost(
        self, slot: _Slot, positions: list[int], sids: list[int], labels: list[int], results: list[Any]
    ) -> tuple[list[int], list[int], list[int]]:
        """Fail the envs whose episode began before ``slot``'s server was replaced; keep the others."""
        kept: tuple[list[int], list[int], list[int]] = ([], [], [])
        for position, sid, index in zip(positions, sids, labels):
            env = self.envs[index]
            if env._generation != slot.replacements:
                results[position] = env.lost_episode_error()
            else:
                for column, value in zip(kept, (position, sid, index)):
                    column.append(value)
        return kept

    def _plan(self, ids: Sequence[int]) -> list[tuple[_Slot, list[int], list[int], list[int]]]:
        """Which positions of ``ids`` go to which server, with their sids (cached: callers reuse id lists)."""
        key = tuple(ids)
        plan = self._plans.get(key)
        if plan is None:
            groups: dict[_Slot, tuple[list[int], list[int], list[int]]] = {}
            for position, index in enumerate(key):
                env = self.envs[index]
                positions, sids, labels = groups.setdefault(env._slot, ([], [], []))
                positions.append(position)
                sids.append(env.sid)
                labels.append(index)
            plan = [(slot, *group) for slot, group in groups.items()]
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    # -- whole episodes

    async def run(
        self,
        policy: Policy,
        episodes: int,
        seed: int = 0,
        *,
        options: dict[str, Any] | None = None,
        skip: Iterable[int] = (),
        per_episode: bool = False,
    ) -> AsyncIterator[EpisodeRecord]:
        """Play ``episodes`` episodes with at most n in flight; yield each record as it finishes.

        Episode i is seeded by ``episode_seed(seed, i)`` alone, so its result does not depend
        on which env or server ran it. An episode that fails with one of ``RETRIED`` (its
        server died, its session expired, a request timed out) is played again from its seed,
        on the replacement server if there is one, up to ``max_episode_retries`` times; each
        is reported once. Any other error (the policy raised, an invalid action, a server
        that cannot be replaced: ``FleetError``) ends the run.
        ``skip`` lists episode indices not to play (e.g. already recorded by a resumed job).
        With ``per_episode=True``, ``policy(episode_seed)`` is called at the start of every
        episode (and retry) and returns that episode's observation -> action callable, e.g.
        a random policy seeded from the episode seed. An exception raised while playing an
        episode carries its index as ``exc.episode`` (and a note).
        """
        self._check_open()
        done = set(skip)
        todo = iter([i for i in range(episodes) if i not in done])
        remaining = episodes - len(done & set(range(episodes)))
        queue: asyncio.Queue[EpisodeRecord | BaseException] = asyncio.Queue()

        async def worker(env: Env) -> None:
            episode = None
            try:
                for episode in todo:
                    queue.put_nowait(await self._play_with_retries(env, policy, episode, seed, options, per_episode))
            except BaseException as exc:  # hand every failure to the consumer
                if episode is not None and isinstance(exc, Exception) and not hasattr(exc, "episode"):
                    exc.episode = episode  # type: ignore[attr-defined]
                    exc.add_note(f"while playing episode {episode} (seed {episode_seed(seed, episode)})")
                queue.put_nowait(exc)

        workers = [asyncio.create_task(worker(env)) for env in self.envs[: max(0, min(self.n, remaining))]]
        try:
            for _ in range(remaining):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _play_with_retries(
        self, env: Env, policy: Policy, episode: int, seed: int, options: dict[str, Any] | None, per_episode: bool = False
    ) -> EpisodeRecord:
        retries = 0
        while True:
            try:
                act = policy(episode_seed(seed, episode)) if per_episode else policy
                return await self._play(env, act, episode, seed, options, retries)
            except RETRIED as exc:
                retries += 1
                if retries > self.config.max_episode_retries:
                    exc.add_note(f"gave up after {retries - 1} retries (PoolConfig.max_episode_retries)")
                    raise
                log.info("replaying episode %d (%s: %s)", episode, type(exc).__name__, exc)
                await env.wait_ready(self.fleet_config.start_timeout + self.config.request_timeout)

    async def _play(self, env: Env, policy: Policy, episode: int, seed: int, options: dict[str, Any] | None, retries: int) -> EpisodeRecord:
        start = time.perf_counter()
        ep_seed = episode_seed(seed, episode)
        result = await env.reset(ep_seed, options)
        total = 0.0
        length = 0
        while not (result.terminated or result.truncated):
            action = policy(result.observation)
            if inspect.isawaitable(action):
                action = await action
            result = await env.step(action)
            total += result.reward
            length += 1
        info: dict[str, Any] = {"server": env.server, "env": env.index, "wall_time": time.perf_counter() - start}
        returns = getattr(result.observation, "returns", None)
        if returns is not None:
            info["returns"] = returns
        if retries:
            info["retries"] = retries
        return EpisodeRecord(episode, ep_seed, total, length, info)
