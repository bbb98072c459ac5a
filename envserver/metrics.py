"""``GET /metrics``: the server's counters in Prometheus' text exposition format (version 0.0.4).

Sessions come from the ``SessionTable``, request and frame counters from ``EnvServer.stats``,
and the mux's per-request latency from a ``Histogram`` the mux feeds once per frame (and once
per request of a blocking environment, when it finishes).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import Response

from . import __version__
from .server import EnvServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; inline requests of cheap envs take microseconds, blocking ones up to seconds.
LATENCY_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Histogram:
    """A fixed-bucket histogram; ``observe_frame`` records n requests at once, cheaply."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``n`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def observe_frame(self, seconds: float, n: int) -> None:
        """Record a frame of ``n`` requests that took ``seconds``: each is charged ``seconds / n``."""
        if n > 0:
            self.counts[bisect_left(self.bounds, seconds / n)] += n
            self.sum += seconds
            self.count += n

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs as Prometheus lists them, ending with ``+Inf``."""
        pairs, total = [], 0
        for bound, count in zip((*map(_number, self.bounds), "+Inf"), self.counts):
            total += count
            pairs.append((bound, total))
        return pairs


_MUX_LATENCY: weakref.WeakKeyDictionary[EnvServer, Histogram] = weakref.WeakKeyDictionary()


def mux_latency(server: EnvServer) -> Histogram:
    """The histogram of ``server``'s mux request handling time (made on first use)."""
    histogram = _MUX_LATENCY.get(server)
    if histogram is None:
        histogram = _MUX_LATENCY[server] = Histogram()
    return histogram


def render(server: EnvServer) -> str:
    """Every metric of ``server`` as Prometheus text."""
    sessions, stats = server.sessions, server.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {_number(value)}")

    env = server.config.env.replace("\\", "\\\\").replace('"', '\\"')
    metric("envserver_info", "gauge", "Server version and environment.", 1, f'{{version="{__version__}",env="{env}"}}')
    metric("envserver_sessions_active", "gauge", "Sessions open now.", len(sessions))
    metric("envserver_sessions_max", "gauge", "Session cap of this server.", sessions.max_sessions)
    metric("envserver_sessions_opened_total", "counter", "Sessions opened.", sessions.opened_total)
    metric("envserver_sessions_refused_total", "counter", "Session opens refused at the cap.", sessions.refused_total)
    metric("envserver_sessions_expired_total", "counter", "Sessions closed after the idle TTL.", sessions.expired_total)
    metric("envserver_steps_total", "counter", "Steps requested on every surface.", stats.steps)
    metric("envserver_resets_total", "counter", "Resets requested on every surface.", stats.resets)
    metric("envserver_errors_total", "counter", "Requests answered with an error.", stats.errors)
    metric("envserver_frames_received_total", "counter", "Mux frames received.", stats.frames_in)
    metric("envserver_frames_sent_total", "counter", "Mux frames sent.", stats.frames_out)
    metric("envserver_bytes_received_total", "counter", "Bytes of mux frames received.", stats.bytes_in)
    metric("envserver_bytes_sent_total", "counter", "Bytes of mux frames sent.", stats.bytes_out)

    name = "envserver_mux_request_seconds"
    histogram = mux_latency(server)
    lines.append(
        f"# HELP {name} Time the mux spent on each request: inline requests are charged their frame's handling"
        " time / the requests in it; a request of a blocking environment, its whole time until its answer is ready."
    )
    lines.append(f"# TYPE {name} histogram")
    for le, count in histogram.cumulative():
        lines.append(f'{name}_bucket{{le="{le}"}} {count}')
    lines.append(f"{name}_sum {_number(histogram.sum)}")
    lines.append(f"{name}_count {histogram.count}")
    return "\n".join(lines) + "\n"


async def metrics_endpoint(request: Request) -> Response:
    server: EnvServer = request.app.state.server
    return Response(render(server), media_type=CONTENT_TYPE)


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
