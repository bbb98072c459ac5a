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

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import EnvPool, EpisodeRecord


class Counts:
    """Running totals of a command (bench's ``StepCounter`` is one)."""

    def __init__(self) -> None:
        self.steps = 0
        self.episodes = 0
        self.errors = 0
        self.latencies: list[float] = []  # seconds, appended as they are measured


class Totals:
    """Monotonic totals since the command started, and the latencies measured since the last call."""

    __slots__ = ("steps", "episodes", "errors", "latencies")

    def __init__(self, steps: int, episodes: int, errors: int, latencies: list[float]) -> None:
        self.steps = steps
        self.episodes = episodes
        self.errors = errors
        self.latencies = latencies


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
        self._read = 0  # latencies of the current counter already handed out by ``take``

    def attach(self, pool: EnvPool) -> None:
        """Show ``pool``'s servers (scraped with its backend's token)."""
        self.pool = pool

    def watch(self, counter: Counts, phase: str) -> None:
        """Count what ``counter`` counts from now on; totals keep what earlier counters counted."""
        old = self._counter
        steps, episodes, errors = self._base
        self._base = (steps + old.steps, episodes + old.episodes, errors + old.errors)
        self._counter = counter
        self._read = 0
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
            counter.latencies.append(wall)
        self.eval_done += 1

    def error(self, n: int = 1) -> None:
        """``n`` calls or episodes failed."""
        self._counter.errors += n

    def totals(self) -> Totals:
        """Totals now (no latencies)."""
        counter = self._counter
        steps, episodes, errors = self._base
        return Totals(steps + counter.steps, episodes + counter.episodes, errors + counter.errors, [])

    def take(self, limit: int = 20_000) -> Totals:
        """Totals now, with the latencies measured since the previous ``take`` (at most the last ``limit``)."""
        totals = self.totals()
        latencies = self._counter.latencies
        end = len(latencies)
        totals.latencies = latencies[max(self._read, end - limit) : end]
        self._read = end
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
