"""``Telemetry``: what a running command (bench, eval) tells the dashboard about itself.

The command updates it; ``rollout.dashboard`` reads it about once a second. Nothing here
does I/O or takes time on the hot path: bench hands over the counter it already keeps
(``watch``), eval reports each finished episode (``episode``).

    telemetry.attach(pool)                 # once the pool is open: its servers and token
    telemetry.watch(counter, "per-env")    # bench: count what ``counter`` counts from now on
    telemetry.start_eval(total=1000, done=120)
    telemetry.episode(record)              # eval: one finished EpisodeRecord
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import RequestTimeout

if TYPE_CHECKING:
    from .pool import EnvPool, EpisodeRecord


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values`` by nearest rank; NaN when empty.

    The project's one percentile: the smallest value with at least ``q`` of the values at or below it.
    """
    if not sorted_values:
        return float("nan")
    return sorted_values[_rank(len(sorted_values), q)]


def _rank(count: int, q: float) -> int:
    """The 0-based index of the nearest-rank ``q`` quantile among ``count`` values."""
    return min(count - 1, max(0, math.ceil(q * count) - 1))


_LOW = 1e-6  # seconds: the first bucket holds everything below
_GROWTH = 1.02  # each bucket is 2% wider than the one before: quantiles within 1%
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 1 + math.ceil(math.log(1e4 / _LOW) / _LOG_GROWTH)  # up to 10,000 s; the last bucket holds everything above


class LatencyHistogram:
    """Latencies in fixed log-spaced buckets: constant memory however long a run lasts.

    Quantiles follow ``percentile``'s nearest rank and are exact to within one bucket
    (about 1%), reported as the bucket's geometric middle.
    """

    __slots__ = ("counts", "count")

    def __init__(self, counts: Iterable[int] = ()) -> None:
        self.counts = list(counts) or [0] * _BUCKETS
        self.count = sum(self.counts)

    def observe(self, seconds: float, n: int = 1) -> None:
        """Record a latency (``n`` times: e.g. once for each step of a frame that took ``seconds``)."""
        index = int(math.log(seconds / _LOW) / _LOG_GROWTH) + 1 if seconds > _LOW else 0
        self.counts[index if index < _BUCKETS else _BUCKETS - 1] += n
        self.count += n

    def percentile(self, q: float) -> float:
        """The ``q`` quantile in seconds; NaN when empty."""
        if not self.count:
            return float("nan")
        rank, seen = _rank(self.count, q), 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen > rank:
                return _LOW if index == 0 else _LOW * _GROWTH ** (index - 0.5)
        raise AssertionError("unreachable: counts sum to count")

    def __add__(self, other: LatencyHistogram) -> LatencyHistogram:
        return LatencyHistogram(a + b for a, b in zip(self.counts, other.counts))

    def __sub__(self, older: LatencyHistogram) -> LatencyHistogram:
        """What was recorded since ``older`` (an earlier copy of this histogram)."""
        return LatencyHistogram(a - b for a, b in zip(self.counts, older.counts))

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.counts)


class Counts:
    """Running totals of a command (bench's ``StepCounter`` is one).

    ``errors`` counts failed calls or episodes, of which ``timeouts`` had no answer in time;
    ``error_classes`` counts them by exception class name.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.episodes = 0
        self.errors = 0
        self.timeouts = 0
        self.error_classes: dict[str, int] = {}
        self.latency = LatencyHistogram()  # seconds

    def error(self, exc: BaseException) -> None:
        """Count one failed call or episode."""
        self.errors += 1
        if isinstance(exc, RequestTimeout):
            self.timeouts += 1
        name = type(exc).__name__
        self.error_classes[name] = self.error_classes.get(name, 0) + 1


class Totals:
    """Monotonic totals since the command started, and the latencies measured since the last call."""

    __slots__ = ("steps", "episodes", "errors", "latency")

    def __init__(self, steps: int, episodes: int, errors: int, latency: LatencyHistogram | None = None) -> None:
        self.steps = steps
        self.episodes = episodes
        self.errors = errors
        self.latency = latency if latency is not None else LatencyHistogram()


class Telemetry:
    """Live counters, phase, pool and eval progress of one command, read by the dashboard."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.phase = "starting the fleet"
        self.pool: EnvPool | None = None
        #: What the latencies measure: "step" (bench: one call) or "episode" (eval: wall time).
        self.latency_kind = "step"
        self.eval_total: int | None = None
        self.eval_done = 0
        self.eval_started: float | None = None
        self._eval_done_at_start = 0
        self.started = time.monotonic()
        self._counter = Counts()
        self._base = (0, 0, 0)  # totals of counters watched before the current one
        self._read = LatencyHistogram()  # latencies of the current counter already handed out by ``take``

    def attach(self, pool: EnvPool) -> None:
        """Show ``pool``'s servers (scraped with its backend's token)."""
        self.pool = pool

    def watch(self, counter: Counts, phase: str) -> None:
        """Count what ``counter`` counts from now on; totals keep what earlier counters counted."""
        old = self._counter
        steps, episodes, errors = self._base
        self._base = (steps + old.steps, episodes + old.episodes, errors + old.errors)
        self._counter = counter
        self._read = LatencyHistogram()
        self.phase = phase

    def start_eval(self, total: int, done: int = 0) -> None:
        """An evaluation of ``total`` episodes begins, ``done`` of them already recorded (resumed)."""
        self.watch(Counts(), "eval")
        self.latency_kind = "episode"
        self.eval_total = total
        self.eval_done = self._eval_done_at_start = done
        self.eval_started = time.monotonic()

    def episode(self, record: EpisodeRecord) -> None:
        """One evaluation episode finished."""
        counter = self._counter
        counter.episodes += 1
        counter.steps += record.length
        wall = record.info.get("wall_time")
        if isinstance(wall, float):
            counter.latency.observe(wall)
        self.eval_done += 1

    def error(self, exc: BaseException) -> None:
        """One call or episode failed with ``exc``."""
        self._counter.error(exc)

    def totals(self) -> Totals:
        """Totals now (no latencies)."""
        counter = self._counter
        steps, episodes, errors = self._base
        return Totals(steps + counter.steps, episodes + counter.episodes, errors + counter.errors)

    def take(self) -> Totals:
        """Totals now, with the latencies measured since the previous ``take``."""
        totals = self.totals()
        now = self._counter.latency.copy()
        totals.latency, self._read = now - self._read, now
        return totals

    def eval_progress(self) -> dict[str, Any] | None:
        """``{done, total, fraction, eta_s}`` of a running eval, or None."""
        if self.eval_total is None:
            return None
        done, total = self.eval_done, self.eval_total
        eta: float | None = None
        played = done - self._eval_done_at_start
        if self.eval_started is not None and played > 0 and done < total:
            rate = played / (time.monotonic() - self.eval_started)
            eta = (total - done) / rate if rate > 0 else None
        elif done >= total:
            eta = 0.0
        return {"done": done, "total": total, "fraction": done / total if total else 1.0, "eta_s": eta}
