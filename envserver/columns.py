"""Columnar batches on ``/v1/mux`` (``vstep``/``vreset``): k sessions stepped in one pass into packed arrays.

``ColumnBatch`` is what an environment writes a batch into (``Environment.write_batch``);
``VectorSessions`` is one connection's state of these ops (each session's base seed,
episode index and whether its episode ended) and answers a request with one ``Columns``.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from .errors import ServerError
from .protocol import Columns, ErrorCode, ErrorInfo, StepResult, Tensor, VecReset, VecStep, episode_seed
from .server import coded
from .sessions import Session

log = logging.getLogger("envserver.columns")


class ColumnSpec(msgspec.Struct, frozen=True, gc=False):
    """The row layout of an environment's batches: observation tensor shape, discrete action count (0: none)."""

    obs_shape: tuple[int, ...]
    num_actions: int = 0


class ColumnBatch:
    """Preallocated columns of k rows; an environment fills row i for its i-th session.

    Scalars are gathered in Python lists and packed once in ``columns``; the observation
    rows are copied straight into one buffer (``obs_view``, ``row_bytes`` per row), and
    mask rows are ``bytes`` of ``num_actions`` 0/1 values joined once.
    """

    __slots__ = ("k", "spec", "obs", "obs_view", "row_bytes", "reward", "terminated", "truncated", "mask", "text", "failures", "_no_mask", "_all_legal")

    def __init__(self, k: int, spec: ColumnSpec | None, text: bool = False) -> None:
        self.k = k
        self.reward: list[float] = [0.0] * k
        self.terminated: list[bool] = [False] * k
        self.truncated: list[bool] = [False] * k
        self.text: list[str] | None = [""] * k if text else None
        self.failures: dict[int, ErrorInfo] = {}
        self.spec = ColumnSpec(())
        self.row_bytes = 0
        self.obs = bytearray()
        self.obs_view = memoryview(self.obs)
        self._no_mask = self._all_legal = b""
        self.mask: list[bytes] = []
        if spec is not None:
            self._allocate(spec)

    def _allocate(self, spec: ColumnSpec) -> None:
        self.spec = spec
        size = 1
        for dim in spec.obs_shape:
            size *= dim
        self.row_bytes = 4 * size
        self.obs = bytearray(self.row_bytes * self.k)  # zeros: a failed row stays zero
        self.obs_view = memoryview(self.obs)
        self._no_mask = bytes(spec.num_actions)
        self._all_legal = b"\x01" * spec.num_actions
        self.mask = [self._no_mask] * self.k

    @property
    def allocated(self) -> bool:
        return bool(self.obs) or self.k == 0

    def put(self, row: int, result: StepResult[Any]) -> None:
        """Write one ``StepResult`` into ``row`` (the generic path: tensor, scalars, legal actions, text)."""
        observation = result.observation
        tensor = observation if type(observation) is Tensor else _first_tensor(observation)
        if tensor is not None and not self.allocated:  # an environment without a column_spec: learn it from the first row
            self._allocate(ColumnSpec(tuple(tensor.shape)))
        if tensor is None or tensor.dtype != "float32" or len(tensor.data) != self.row_bytes:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"observation has no float32 tensor of shape {self.spec.obs_shape} for a columnar batch")
        start = row * self.row_bytes
        self.obs_view[start : start + self.row_bytes] = tensor.data
        self.reward[row] = result.reward
        self.terminated[row] = result.terminated
        self.truncated[row] = result.truncated
        if self.spec.num_actions:
            legal = getattr(observation, "legal_actions", None)
            self.mask[row] = self._all_legal if legal is None else self.mask_row(legal)
        if self.text is not None:
            self.text[row] = str(getattr(observation, "text", "") or "")

    def mask_row(self, legal: Sequence[int]) -> bytes:
        row = bytearray(self.spec.num_actions)
        for action in legal:
            row[action] = 1
        return bytes(row)

    def fail(self, row: int, exc: BaseException) -> None:
        """Record why ``row`` failed; its columns are zeros."""
        error = coded(exc)
        if error is not exc:
            log.exception("environment failed in a columnar batch", exc_info=exc)
        self.failures[row] = ErrorInfo(error.code, error.message)
        self.reward[row] = 0.0
        self.terminated[row] = self.truncated[row] = False
        if self.allocated:
            start = row * self.row_bytes
            self.obs_view[start : start + self.row_bytes] = bytes(self.row_bytes)
            self.mask[row] = self._no_mask

    def columns(self, final_obs: bytes = b"") -> Columns:
        """The packed reply."""
        return Columns(
            obs_shape=self.spec.obs_shape,
            obs=self.obs,
            reward=array("d", self.reward).tobytes(),
            terminated=bytes(self.terminated),
            truncated=bytes(self.truncated),
            num_actions=self.spec.num_actions,
            mask=b"".join(self.mask) if self.spec.num_actions else b"",
            failures=self.failures,
            final_obs=final_obs,
            text=self.text,
        )


def _first_tensor(observation: Any) -> Tensor | None:
    for field in getattr(observation, "__struct_fields__", ()):
        value = getattr(observation, field)
        if type(value) is Tensor:
            return value
    return None


class _Episodes:
    """What the server keeps per session for auto-reset: base seed, episode index, whether it ended."""

    __slots__ = ("base", "episode", "ended")

    def __init__(self) -> None:
        self.base: int | None = None
        self.episode = 0
        self.ended = False  # set when a vstep ends its episode; a session reset by the typed API steps as usual

    def next_seed(self) -> int | None:
        return None if self.base is None else episode_seed(self.base, self.episode)


class VectorSessions:
    """One connection's ``vstep``/``vreset`` handler; ``live(sid)`` gives an open session or raises."""

    def __init__(self, live: Callable[[int], Session]) -> None:
        self._live = live
        self._episodes: dict[int, _Episodes] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}  # sids -> their sessions; a training loop sends the same lists again and again

    def forget(self, sid: int) -> None:
        """Drop what is kept about a closed session."""
        self._episodes.pop(sid, None)
        self._plans.clear()

    def handle(self, request: VecStep | VecReset) -> Columns:
        """Run one columnar request; a row that fails carries its coded error, the others go on."""
        sids = request.sids
        k = len(sids)
        if type(request) is VecStep:
            if len(request.actions) != 8 * k:
                raise ServerError(ErrorCode.VALIDATION_ERROR, f"{k} sids but {len(request.actions)} bytes of actions (8 per session)")
        elif len(request.seeds) != k or (request.episodes is not None and len(request.episodes) != k):  # type: ignore[union-attr]
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"{k} sids but {len(request.seeds)} seeds / episodes")  # type: ignore[union-attr]
        plan = self._plan(sids)
        if not plan.envs:
            batch = ColumnBatch(k, None, request.text)
            for row, exc in plan.refused.items():
                batch.fail(row, exc)
            return batch.columns()
        spec = plan.envs[0].column_spec()
        if type(request) is VecStep:
            return self._step(request, plan, spec)
        return self._reset(request, plan, spec)  # type: ignore[arg-type]

    def _plan(self, sids: list[int]) -> _Plan:
        """The sessions of ``sids`` (cached while they all stay open), each marked used."""
        key = tuple(sids)
        plan = self._plans.get(key)
        if plan is not None:
            now = time.monotonic()
            for session in plan.sessions:
                if session.closed:
                    break
                session.last_used = now
            else:
                return plan
            self._plans.clear()
        if len(set(sids)) != len(sids):
            raise ServerError(ErrorCode.VALIDATION_ERROR, "a session appears twice in one columnar request")
        plan = _Plan()
        for row, sid in enumerate(sids):
            try:
                session = self._live(sid)
                env = session.env
                if env.blocking:
                    raise ServerError(ErrorCode.VALIDATION_ERROR, f"{env.name} is blocking: columnar batches take non-blocking environments")
                if plan.env_class is None:
                    plan.env_class = type(env)
                elif type(env) is not plan.env_class:
                    raise ServerError(ErrorCode.VALIDATION_ERROR, f"session {sid} runs {env.name}, not {plan.env_class.name}: one environment per columnar request")
            except ServerError as exc:
                plan.refused[row] = exc
                continue
            plan.sessions.append(session)
            plan.envs.append(env)
            plan.rows.append(row)
            plan.states.append(self._episodes_of(sid))
        if not plan.refused:
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _episodes_of(self, sid: int) -> _Episodes:
        episodes = self._episodes.get(sid)
        if episodes is None:
            episodes = self._episodes[sid] = _Episodes()
        return episodes

    def _reset(self, request: VecReset, plan: _Plan, spec: ColumnSpec | None) -> Columns:
        resets: dict[int, int | None] = {}
        for position, row in enumerate(plan.rows):
            episodes = plan.states[position]
            episodes.base = request.seeds[row]
            episodes.episode = request.episodes[row] if request.episodes is not None else 0
            episodes.ended = False
            resets[position] = episodes.next_seed()
        batch = _run(plan, spec, (), resets, request.text, len(request.sids))
        for position, row in enumerate(plan.rows):
            if row in batch.failures:
                plan.states[position].ended = True  # retried by the next step
        return batch.columns()

    def _step(self, request: VecStep, plan: _Plan, spec: ColumnSpec | None) -> Columns:
        k = len(request.sids)
        rows, states, envs = plan.rows, plan.states, plan.envs
        all_actions = array("q", request.actions).tolist()
        actions = all_actions if len(rows) == k else [all_actions[row] for row in rows]
        mode = request.autoreset
        resets: dict[int, int | None] = {}
        if mode != "disabled":
            for position, episodes in enumerate(states):
                if episodes.ended:
                    resets[position] = _start_next(episodes)
        batch = _run(plan, spec, actions, resets, request.text, k)
        failures, terminated, truncated = batch.failures, batch.terminated, batch.truncated
        ended: list[int] = []
        for position, row in enumerate(rows):
            if terminated[row] or truncated[row]:
                ended.append(position)
                states[position].ended = True
            elif position in resets and row in failures:
                states[position].ended = True  # the reset failed: try again on the next step
        if mode != "same_step" or not ended:
            return batch.columns()
        # same_step: keep the last observations, then start the next episodes within this reply
        final_obs = bytes(batch.obs)
        fresh = ColumnBatch(len(ended), batch.spec, request.text)
        plan.env_class.write_batch([envs[p] for p in ended], (), fresh, {i: _start_next(states[p]) for i, p in enumerate(ended)})
        size = batch.row_bytes
        for i, position in enumerate(ended):
            row = rows[position]
            if i in fresh.failures:
                batch.failures[row] = fresh.failures[i]
                states[position].ended = True
                continue
            batch.obs_view[row * size : (row + 1) * size] = fresh.obs_view[i * size : (i + 1) * size]
            batch.mask[row] = fresh.mask[i]
            if batch.text is not None and fresh.text is not None:
                batch.text[row] = fresh.text[i]
        return batch.columns(final_obs)


class _Plan:
    """The live sessions of one request's sids: their envs, rows, auto-reset state, and the rows refused."""

    __slots__ = ("sessions", "envs", "rows", "states", "refused", "env_class")

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.envs: list[Any] = []
        self.rows: list[int] = []
        self.states: list[_Episodes] = []
        self.refused: dict[int, BaseException] = {}
        self.env_class: Any = None


def _start_next(episodes: _Episodes) -> int | None:
    """Move a session to its next episode; return that episode's seed."""
    episodes.episode += 1
    episodes.ended = False
    return episodes.next_seed()


def _run(plan: _Plan, spec: ColumnSpec | None, actions: Sequence[int], resets: Mapping[int, int | None], text: bool, k: int) -> ColumnBatch:
    """Let the environment class write the live rows, then place them at their rows of the request."""
    envs, rows, refused = plan.envs, plan.rows, plan.refused
    if not refused:
        batch = ColumnBatch(k, spec, text)
        plan.env_class.write_batch(envs, actions, batch, resets)
        return batch
    dense = ColumnBatch(len(envs), spec, text)
    plan.env_class.write_batch(envs, actions, dense, resets)
    batch = ColumnBatch(k, dense.spec if dense.allocated else spec, text)
    size = batch.row_bytes
    for position, row in enumerate(rows):
        if position in dense.failures:
            batch.failures[row] = dense.failures[position]
            continue
        batch.obs_view[row * size : (row + 1) * size] = dense.obs_view[position * size : (position + 1) * size]
        batch.reward[row] = dense.reward[position]
        batch.terminated[row] = dense.terminated[position]
        batch.truncated[row] = dense.truncated[position]
        if batch.spec.num_actions:
            batch.mask[row] = dense.mask[position]
        if batch.text is not None and dense.text is not None:
            batch.text[row] = dense.text[position]
    for row, exc in refused.items():
        batch.fail(row, exc)
    return batch
