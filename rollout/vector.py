"""``VectorPool``: a pool's envs as one batch of numpy arrays, auto-reset in the servers (Gymnasium/envpool shape).

    async with EnvPool(n=256, game="catch") as pool:
        envs = pool.vector(autoreset="next_step")
        obs, info = await envs.reset(seed=0)                    # obs: float32 [256, 10, 5]
        obs, reward, terminated, truncated, info = await envs.step(actions)

Each server answers one columnar request (``vstep``/``vreset``) with packed arrays that
are read with ``np.frombuffer``: no Python object per env on either side. ``send`` /
``recv`` are envpool's asynchronous pair: ``recv`` returns the first ``batch_size`` envs
that are ready, on whichever server, with their ids in ``info["env_id"]``.

Seeds: ``reset(seed=s)`` gives env i the base seed ``episode_seed(s, i)``, and its
episode e is seeded ``episode_seed(base, e)``, so a run replays exactly.

Failures: an env whose server dies (or whose row fails on the server) ends its episode
with ``truncated`` set and the reason in ``info["error"]``; its next step starts a new
episode (the next one of its seed sequence) on the replacement server.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from envserver.protocol import Columns, episode_seed

from .client import ClientState, EnvClient
from .errors import EnvCrashed, EnvError, EpisodeOver, InvalidAction
from .openenv_client import is_openenv_url

if TYPE_CHECKING:
    from .pool import EnvPool, _Slot

AUTORESET_MODES = ("next_step", "same_step", "disabled")

StepTuple = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


class _Chunk:
    """The rows of one reply (or of one failed request), decoded into arrays."""

    __slots__ = ("ids", "obs", "reward", "terminated", "truncated", "mask", "final_obs", "errors", "fresh", "text")

    def __init__(self, ids: np.ndarray, fresh: bool) -> None:
        self.ids = ids
        self.fresh = fresh  # the rows start episodes (a reset, or a restart after a crash)
        self.obs: np.ndarray | None = None
        self.reward: np.ndarray | None = None
        self.terminated: np.ndarray | None = None
        self.truncated: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.final_obs: np.ndarray | None = None
        self.errors: dict[int, str] = {}
        self.text: list[str] | None = None


def _columnar(slot: _Slot) -> EnvClient:
    """The slot's client, an ``EnvClient``: ``VectorPool`` refuses OpenEnv servers, which have no columnar calls."""
    return cast(EnvClient, slot.client)


class VectorPool:
    """A pool's n envs stepped as one batch: numpy in, numpy out, finished envs reset by the servers."""

    def __init__(self, pool: EnvPool, autoreset: str = "next_step", *, batch_size: int | None = None, text: bool = False) -> None:
        if autoreset not in AUTORESET_MODES:
            raise ValueError(f"autoreset must be one of {', '.join(AUTORESET_MODES)}, not {autoreset!r}")
        n = pool.n
        if batch_size is not None and not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be between 1 and {n}, not {batch_size}")
        self.pool = pool
        self.autoreset = autoreset
        self.num_envs = n
        self.batch_size = batch_size or n
        self.text = text
        self.obs_shape: tuple[int, ...] | None = None  # known after the first reply
        self.num_actions = 0
        slots: list[_Slot] = []
        for env in pool.envs:
            if env._slot not in slots:
                slots.append(env._slot)
        openenv = [slot.url for slot in slots if is_openenv_url(slot.url)]
        if openenv:
            raise ValueError(f"pool.vector() needs envserver's columnar calls, which the OpenEnv server {openenv[0]} lacks: step its envs one by one")
        self._slots = slots
        self._slot_of = np.array([slots.index(env._slot) for env in pool.envs], np.int64)
        self._sid = np.array([env.sid for env in pool.envs], np.int64)
        self._generation = np.zeros(n, np.int64)  # the slot's replacement count when the env's episode began
        self._base: list[int | None] = [None] * n
        self._episode = np.zeros(n, np.int64)  # index of each env's current episode
        self._return = np.zeros(n, np.float64)
        self._length = np.zeros(n, np.int64)
        self._started = np.zeros(n, bool)  # reset at least once
        self._ended = np.zeros(n, bool)  # the last step ended the episode
        self._lost = np.zeros(n, bool)  # the episode died with its server or failed there: restart it
        self._mask: np.ndarray | None = None  # each env's legal actions now
        self._busy = np.zeros(n, bool)  # sent, not received yet
        self._requests: dict[asyncio.Future[Any], tuple[np.ndarray, bool]] = {}
        self._ready: deque[_Chunk] = deque()
        self._ready_rows = 0

    # -- Gymnasium-shaped calls

    async def reset(
        self, seed: int | Sequence[int] | None = None, env_ids: Sequence[int] | np.ndarray | None = None, *, episodes: Sequence[int] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start new episodes in ``env_ids`` (default all); ``seed`` is the run seed, or one base seed per env.

        Without a seed, each env starts the next episode of its seed sequence, as Gymnasium's ``reset()`` does.
        ``episodes`` picks which episode of each env's sequence to start (default 0): base seed s and
        episode e play the episode seeded ``episode_seed(s, e)``.
        """
        self._check_idle("reset")
        ids = self._ids(env_ids)
        if seed is None:  # as Gymnasium: go on with each env's seed sequence (unseeded if it never had one)
            self._episode[ids] = np.where(self._started[ids], self._episode[ids] + 1, 0)
        else:
            if isinstance(seed, (int, np.integer)):
                bases: list[int | None] = [episode_seed(int(seed), int(i)) for i in ids]
            else:
                bases = [int(s) for s in seed]
                if len(bases) != len(ids):
                    raise ValueError(f"{len(bases)} seeds for {len(ids)} envs")
            for i, base in zip(ids.tolist(), bases):
                self._base[i] = base
            self._episode[ids] = 0
        if episodes is not None:
            if len(episodes) != len(ids):
                raise ValueError(f"{len(episodes)} episode indices for {len(ids)} envs")
            self._episode[ids] = np.asarray(episodes, np.int64)
        self._send_resets(ids)
        obs, _, _, _, info = await self._receive(len(ids), by_id=env_ids is None)
        return obs, info

    async def step(self, actions: Any) -> StepTuple:
        """Step every env with ``actions[i]`` (an int array of length n); return obs, reward, terminated, truncated, info."""
        self._check_idle("step")
        self.send(actions)
        return await self._receive(self.num_envs, by_id=True)

    def send(self, actions: Any, env_ids: Sequence[int] | np.ndarray | None = None) -> None:
        """Start stepping ``env_ids`` (default all) with ``actions``; ``recv`` gives the results as they come."""
        ids = self._ids(env_ids)
        acts = self._check_actions(actions, ids)
        if self._busy[ids].any():
            raise ValueError(f"env(s) {ids[self._busy[ids]][:8].tolist()} are already in flight: recv() them first")
        lost = self._lost[ids]
        if lost.any():
            self._send_restarts(ids[lost])
            ids, acts = ids[~lost], acts[~lost]
        stale = self._generation[ids] != self._replacements()[self._slot_of[ids]]
        if stale.any():  # the server was replaced since these episodes began: report them lost, like a crash mid-step
            self._fail_now(ids[stale])
            ids, acts = ids[~stale], acts[~stale]
        self._busy[ids] = True
        for slot_index, rows in self._by_slot(ids):
            slot = self._slots[slot_index]
            future = _columnar(slot).vstep(self._sid[ids[rows]].tolist(), acts[rows].tobytes(), self.autoreset, text=self.text)
            self._track(future, ids[rows], False)

    async def recv(self) -> StepTuple:
        """The first ``batch_size`` envs to be ready (fewer if fewer are in flight), ids in ``info["env_id"]``."""
        waiting = sum(len(ids) for ids, _ in self._requests.values())
        if not waiting and not self._ready_rows:
            raise EnvError("recv() has nothing to wait for: send() first")
        return await self._receive(min(self.batch_size, waiting + self._ready_rows), by_id=False)

    # -- sending

    def _ids(self, env_ids: Sequence[int] | np.ndarray | None) -> np.ndarray:
        self.pool._check_open()
        if env_ids is None:
            return np.arange(self.num_envs)
        ids = np.asarray(env_ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise TypeError(f"env_ids must be a 1-d sequence of ints, not {ids.dtype} of shape {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_envs):
            raise ValueError(f"env ids must be in [0, {self.num_envs})")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("env_ids has duplicates")
        return ids

    def _check_actions(self, actions: Any, ids: np.ndarray) -> np.ndarray:
        """The actions as int64, refused before anything is sent if their shape, type or legality is wrong."""
        acts = np.asarray(actions)
        if acts.shape != (len(ids),):
            raise ValueError(f"expected {len(ids)} actions (shape ({len(ids)},)), got shape {acts.shape}")
        if not np.issubdtype(acts.dtype, np.integer):
            raise TypeError(f"actions must be integers (discrete action ids), not {acts.dtype}")
        acts = acts.astype(np.int64, copy=False)
        if not self._started[ids].all():
            raise EpisodeOver(f"env(s) {ids[~self._started[ids]][:8].tolist()} were never reset: call reset() first")
        live = ~(self._lost[ids] | self._ended[ids]) if self.autoreset == "next_step" else ~self._lost[ids]
        if self.autoreset == "disabled" and self._ended[ids].any():
            raise EpisodeOver(f"env(s) {ids[self._ended[ids]][:8].tolist()} finished their episode and autoreset is disabled: reset() them")
        if self.num_actions and live.any():
            checked, rows = acts[live], ids[live]
            bad = (checked < 0) | (checked >= self.num_actions)
            if not bad.any():
                assert self._mask is not None
                bad = ~self._mask[rows, checked]
            if bad.any():
                first = np.flatnonzero(bad)[:8]
                pairs = ", ".join(f"env {rows[j]}: {checked[j]}" for j in first)
                raise InvalidAction(f"illegal action(s) ({pairs}); see info['action_mask']", code="INVALID_ACTION", env=int(rows[first[0]]))
        return acts

    def _replacements(self) -> np.ndarray:
        return np.array([slot.replacements for slot in self._slots], np.int64)

    def _by_slot(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Row positions of ``ids`` per server, in pieces of at most ``batch_size``."""
        slot_of = self._slot_of[ids]
        groups = []
        for slot_index in range(len(self._slots)):
            rows = np.flatnonzero(slot_of == slot_index)
            for start in range(0, len(rows), self.batch_size):
                groups.append((slot_index, rows[start : start + self.batch_size]))
        return groups

    def _send_resets(self, ids: np.ndarray) -> None:
        self._busy[ids] = True
        generations = self._replacements()
        timeout = self.pool.fleet_config.start_timeout + self.pool.config.request_timeout
        for slot_index, rows in self._by_slot(ids):
            part = ids[rows]
            slot = self._slots[slot_index]
            if slot.client.state is not ClientState.OPEN or not slot.ready.is_set():  # being replaced: reset on the new server
                self._track(asyncio.ensure_future(self._restart(slot, slot_index, part, timeout)), part, True)
                continue
            self._generation[part] = generations[slot_index]
            self._lost[part] = False
            future = _columnar(self._slots[slot_index]).vreset(
                self._sid[part].tolist(), [self._base[i] for i in part.tolist()], self._episode[part].tolist(), text=self.text
            )
            self._track(future, part, True)

    def _send_restarts(self, ids: np.ndarray) -> None:
        """Start the next episode of envs whose last one was lost, once their server is back."""
        self._busy[ids] = True
        timeout = self.pool.fleet_config.start_timeout + self.pool.config.request_timeout
        for slot_index, rows in self._by_slot(ids):
            part = ids[rows]
            self._track(asyncio.ensure_future(self._restart(self._slots[slot_index], slot_index, part, timeout)), part, True)

    def _track(self, future: asyncio.Future[Any], ids: np.ndarray, fresh: bool) -> None:
        """Wait for ``future`` in ``recv``; if the pool closes first, its error is read here, not lost."""
        self._requests[future] = (ids, fresh)
        future.add_done_callback(_read_error)

    def _fail_now(self, ids: np.ndarray) -> None:
        self._busy[ids] = True
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        env = self.pool.envs[int(ids[0])]
        future.set_exception(EnvCrashed(f"the server was replaced during this episode (now {env.server})", env=int(ids[0]), server=env.server))
        self._track(future, ids, False)

    async def _restart(self, slot: _Slot, slot_index: int, ids: np.ndarray, timeout: float) -> Columns:
        try:
            await self.pool.envs[int(ids[0])].wait_ready(timeout)
        except asyncio.TimeoutError:
            raise EnvCrashed(f"no replacement server within {timeout:g} s", env=int(ids[0]), server=slot.url) from None
        self._generation[ids] = slot.replacements
        self._lost[ids] = False
        columns: Columns = await _columnar(slot).vreset(
            self._sid[ids].tolist(), [self._base[i] for i in ids.tolist()], self._episode[ids].tolist(), text=self.text
        )
        return columns

    # -- receiving

    async def _receive(self, count: int, *, by_id: bool) -> StepTuple:
        """Wait until ``count`` rows are ready; return them (in env order when ``by_id``)."""
        while self._ready_rows < count:
            done, _ = await asyncio.wait(list(self._requests), return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                ids, fresh = self._requests.pop(future)
                chunk = self._decode(future, ids, fresh)
                self._ready.append(chunk)
                self._ready_rows += len(ids)
        chunks: list[_Chunk] = []
        taken = 0
        while taken < count:
            chunk = self._ready.popleft()
            if taken + len(chunk.ids) > count:  # take what is needed; the rest waits for the next recv
                chunk, rest = _split(chunk, count - taken)
                self._ready.appendleft(rest)
            chunks.append(chunk)
            taken += len(chunk.ids)
        self._ready_rows -= taken
        return self._assemble(chunks, by_id)

    def _decode(self, future: asyncio.Future[Any], ids: np.ndarray, fresh: bool) -> _Chunk:
        chunk = _Chunk(ids, fresh)
        k = len(ids)
        exc = future.exception()
        if exc is not None and not isinstance(exc, EnvError):
            raise exc
        if exc is None:
            columns: Columns = future.result()
            if columns.obs_shape and self.obs_shape is None:
                self.obs_shape, self.num_actions = tuple(columns.obs_shape), columns.num_actions
                self._mask = np.zeros((self.num_envs, self.num_actions), bool)
            if columns.obs:
                chunk.obs = np.frombuffer(columns.obs, np.float32).reshape(k, *columns.obs_shape)
            chunk.reward = np.frombuffer(columns.reward, np.float64)
            chunk.terminated = np.frombuffer(columns.terminated, np.bool_)
            chunk.truncated = np.frombuffer(columns.truncated, np.bool_)
            if columns.num_actions and columns.mask:
                chunk.mask = np.frombuffer(columns.mask, np.bool_).reshape(k, columns.num_actions)
            if columns.final_obs:
                chunk.final_obs = np.frombuffer(columns.final_obs, np.float32).reshape(k, *columns.obs_shape)
            chunk.text = columns.text
            for row, info in columns.failures.items():
                chunk.errors[row] = f"{info.code}: {info.message}"
        else:
            message = f"{type(exc).__name__}: {exc}"
            chunk.errors = dict.fromkeys(range(k), message)
        if chunk.errors:
            self._fail_rows(chunk)
        return chunk

    def _fail_rows(self, chunk: _Chunk) -> None:
        """A failed row ends its episode as truncated; its next step restarts it (the next seed of its sequence)."""
        k = len(chunk.ids)
        rows = np.fromiter(chunk.errors, np.int64, len(chunk.errors))
        for name in ("reward", "terminated", "truncated"):
            column = getattr(chunk, name)
            column = np.zeros(k, np.float64 if name == "reward" else bool) if column is None else column.copy()
            setattr(chunk, name, column)
        chunk.reward[rows] = 0.0  # type: ignore[index]
        chunk.terminated[rows] = False  # type: ignore[index]
        chunk.truncated[rows] = True  # type: ignore[index]
        if chunk.obs is None and self.obs_shape is not None:
            chunk.obs = np.zeros((k, *self.obs_shape), np.float32)
        if chunk.mask is None and self.num_actions:
            chunk.mask = np.zeros((k, self.num_actions), bool)
        self._lost[chunk.ids[rows]] = True

    def _assemble(self, chunks: list[_Chunk], by_id: bool) -> StepTuple:
        ids = np.concatenate([c.ids for c in chunks]) if len(chunks) != 1 else chunks[0].ids
        order = np.argsort(ids, kind="stable") if by_id and len(chunks) > 1 else None

        def column(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
            parts = [getattr(c, name) if getattr(c, name) is not None else np.zeros((len(c.ids), *shape), dtype) for c in chunks]
            out = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return out[order] if order is not None else out

        shape = self.obs_shape or ()
        obs = column("obs", np.float32, shape)
        reward = column("reward", np.float64)
        terminated = column("terminated", bool)
        truncated = column("truncated", bool)
        fresh = np.concatenate([np.full(len(c.ids), c.fresh) for c in chunks]) if len(chunks) != 1 else np.full(len(ids), chunks[0].fresh)
        if order is not None:
            ids, fresh = ids[order], fresh[order]
        self._busy[ids] = False
        self._started[ids] = True
        info: dict[str, Any] = {"env_id": ids, "_env_id": np.ones(len(ids), bool)}
        if self.num_actions:
            mask = column("mask", bool, (self.num_actions,))
            assert self._mask is not None
            self._mask[ids] = mask
            info["action_mask"], info["_action_mask"] = mask, np.ones(len(ids), bool)
        # episode statistics: a row that (re)starts an episode, by a reset or by next_step's auto-reset, counts from zero
        restarted = fresh | (self._ended[ids] if self.autoreset == "next_step" else False)
        self._return[ids] = np.where(restarted, 0.0, self._return[ids] + reward)
        self._length[ids] = np.where(restarted, 0, self._length[ids] + 1)
        if self.autoreset == "next_step":
            self._episode[ids[restarted & ~fresh]] += 1
        done = terminated | truncated
        self._ended[ids] = done
        if done.any():
            info["episode_return"] = np.where(done, self._return[ids], 0.0)
            info["episode_length"] = np.where(done, self._length[ids], 0)
            info["_episode_return"] = info["_episode_length"] = done
            if self.autoreset == "same_step":
                finals = [c for c in chunks if c.final_obs is not None]
                if finals:
                    info["final_obs"] = column("final_obs", np.float32, shape)
                    info["_final_obs"] = done & ~self._lost[ids]
                self._episode[ids[done & ~self._lost[ids]]] += 1
                self._ended[ids] = False
                self._return[ids[done]] = 0.0
                self._length[ids[done]] = 0
        lost_rows = self._lost[ids]
        if lost_rows.any():
            self._episode[ids[lost_rows & ~fresh]] += 1  # the lost episode's successor takes the next seed
        errors = [(position, message) for position, message in _errors(chunks)]
        if errors:
            error = np.full(len(ids), None, object)
            for position, message in errors:
                error[position] = message
            if order is not None:
                error = error[order]
            info["error"], info["_error"] = error, error != None  # noqa: E711 - elementwise
        if self.text:
            text = np.array([t for c in chunks for t in (c.text or [""] * len(c.ids))], object)
            info["text"], info["_text"] = (text[order] if order is not None else text), np.ones(len(ids), bool)
        return obs, reward, terminated, truncated, info

    # -- state

    def _check_idle(self, what: str) -> None:
        if self._requests or self._ready_rows:
            raise ValueError(f"{what}() while send() results are pending: recv() them first")

    async def close(self) -> None:
        """Cancel what is in flight (the pool itself is closed by its owner)."""
        for future in self._requests:
            future.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)
        self._requests.clear()
        self._ready.clear()
        self._ready_rows = 0
        self._busy[:] = False


VectorPolicy = Callable[[np.ndarray, np.ndarray], Any]  # (observations [k, ...], legal masks [k, A]) -> k actions


def vectorized(policy: VectorPolicy) -> VectorPolicy:
    """Mark ``policy(obs_batch, mask_batch) -> actions`` as batched, so ``rollout eval`` plays it through ``VectorPool``."""
    policy.vectorized = True  # type: ignore[attr-defined]
    return policy


def _read_error(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it read: an abandoned request must not log "exception was never retrieved"


def _split(chunk: _Chunk, count: int) -> tuple[_Chunk, _Chunk]:
    head, tail = _Chunk(chunk.ids[:count], chunk.fresh), _Chunk(chunk.ids[count:], chunk.fresh)
    for name in ("obs", "reward", "terminated", "truncated", "mask", "final_obs"):
        value = getattr(chunk, name)
        if value is not None:
            setattr(head, name, value[:count])
            setattr(tail, name, value[count:])
    if chunk.text is not None:
        head.text, tail.text = chunk.text[:count], chunk.text[count:]
    head.errors = {row: m for row, m in chunk.errors.items() if row < count}
    tail.errors = {row - count: m for row, m in chunk.errors.items() if row >= count}
    return head, tail


def _errors(chunks: list[_Chunk]) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    offset = 0
    for chunk in chunks:
        found.extend((offset + row, message) for row, message in chunk.errors.items())
        offset += len(chunk.ids)
    return found


__all__ = ["AUTORESET_MODES", "VectorPool", "VectorPolicy", "vectorized"]
