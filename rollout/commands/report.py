"""``rollout report``: the summary of an eval results file, and a plot of its returns."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..errors import EvalError
from .results import Contents, EpisodeLine, read
from .summary import Z95, EvalSummary, span_throughput, summarize


def report(path: str) -> tuple[EvalSummary, Contents]:
    """The summary of the results file ``path`` (a half-written last line is left out, not removed)."""
    try:
        contents = read(path)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such results file") from None
    if contents.header is None:
        raise EvalError(f"{path} is empty (no header yet)")
    lines = sorted(contents.episodes, key=lambda line: line.episode)
    seconds, rate = span_throughput(lines)
    return summarize(lines, contents.header, path, seconds=seconds, episodes_per_s=rate, truncated_bytes=contents.dropped), contents


def plot(lines: Sequence[EpisodeLine], path: str, title: str) -> None:
    """Write a PNG: the return histogram and the running mean (with its 95% CI) by episode index."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install 'envfleet[plot]'") from None
    if not lines:
        raise EvalError("nothing to plot: the file has no episodes yet")
    ordered = sorted(lines, key=lambda line: line.episode)
    returns = [line.ret for line in ordered]
    fig, (hist, run) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        distinct = sorted(set(returns))
        if len(distinct) <= 25:  # discrete returns (wins/draws/losses, catch's +-1): one bar each
            counts = [returns.count(v) for v in distinct]
            width = 0.8 * min((b - a for a, b in zip(distinct, distinct[1:])), default=1.0)
            hist.bar(distinct, counts, width=width, color="#4477aa")
            hist.set_xticks(distinct)
        else:
            hist.hist(returns, bins=40, color="#4477aa")
        hist.set_xlabel("return")
        hist.set_ylabel("episodes")
        hist.set_title(f"returns ({len(returns):,} episodes)")

        xs, means, lows, highs = _running_mean(returns)
        run.fill_between(xs, lows, highs, color="#aaccee", label="95% CI")
        run.plot(xs, means, color="#224466", label="running mean")
        run.set_xlabel("episodes (by index)")
        run.set_ylabel("mean return")
        run.set_title(f"running mean: {means[-1]:.4f}")
        run.legend(loc="best")
        fig.suptitle(title)
        fig.tight_layout()
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _running_mean(values: Sequence[float]) -> tuple[list[int], list[float], list[float], list[float]]:
    xs, means, lows, highs = [], [], [], []
    total = square = 0.0
    for k, v in enumerate(values, start=1):
        total += v
        square += v * v
        mean = total / k
        var = max(0.0, (square - k * mean * mean) / (k - 1)) if k > 1 else 0.0
        half = Z95 * math.sqrt(var / k)
        xs.append(k)
        means.append(mean)
        lows.append(mean - half)
        highs.append(mean + half)
    return xs, means, lows, highs
