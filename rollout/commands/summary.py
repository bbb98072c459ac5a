"""The summary of an evaluation: mean return with a 95% CI, outcome rates, lengths, throughput."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

import msgspec

from .results import EpisodeLine, Header

Z95 = 1.959963984540054  # two-sided 95% quantile of the normal distribution


class EvalSummary(msgspec.Struct, kw_only=True):
    """What an evaluation found; ``None`` where there is nothing to say (no episodes, no outcomes)."""

    out: str
    env: str
    options: dict[str, Any]
    policy: str
    seed: int
    episodes: int  # episodes summarized
    mean_return: float | None
    std_return: float | None  # sample standard deviation
    ci95_low: float | None  # mean +- 1.96 standard errors (normal approximation)
    ci95_high: float | None
    outcomes: int  # episodes with a win/draw/loss outcome
    win_rate: float | None
    draw_rate: float | None
    loss_rate: float | None
    length_min: int | None
    length_p50: float | None
    length_max: int | None
    length_mean: float | None
    resumed: int = 0  # episodes already in the file when this run started
    played: int = 0  # episodes played by this run
    seconds: float | None = None  # wall time of this run (report: the span the file covers)
    episodes_per_s: float | None = None
    truncated_bytes: int = 0  # half-written last line removed before appending


def mean_ci95(values: Sequence[float]) -> tuple[float | None, float | None, float | None, float | None]:
    """Mean, sample standard deviation and the 95% confidence interval of the mean."""
    if not values:
        return None, None, None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None, None, None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = Z95 * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def summarize(lines: Sequence[EpisodeLine], header: Header, out: str, **fields: Any) -> EvalSummary:
    """Summarize episode lines of the job ``header`` names; ``fields`` fill the run's own numbers."""
    mean, std, low, high = mean_ci95([line.ret for line in lines])
    outcomes = [line.outcome for line in lines if line.outcome is not None]
    win, draw, loss = (outcomes.count(o) / len(outcomes) if outcomes else None for o in ("win", "draw", "loss"))
    lengths = sorted(line.length for line in lines)
    return EvalSummary(
        out=out,
        env=header.env,
        options=header.options,
        policy=header.policy,
        seed=header.seed,
        episodes=len(lines),
        mean_return=mean,
        std_return=std,
        ci95_low=low,
        ci95_high=high,
        outcomes=len(outcomes),
        win_rate=win,
        draw_rate=draw,
        loss_rate=loss,
        length_min=lengths[0] if lengths else None,
        length_p50=statistics.median(lengths) if lengths else None,
        length_max=lengths[-1] if lengths else None,
        length_mean=statistics.fmean(lengths) if lengths else None,
        **fields,
    )


def span_throughput(lines: Sequence[EpisodeLine]) -> tuple[float | None, float | None]:
    """Seconds from the first episode's start to the last one's end, and episodes/s over them."""
    if not lines:
        return None, None
    seconds = max(line.time for line in lines) - min(line.time - line.wall_time for line in lines)
    return seconds, (len(lines) / seconds if seconds > 0 else None)


def format_summary(s: EvalSummary) -> str:
    """The summary for people, a few lines."""
    what = s.env + (f" {s.options['game']}" if "game" in s.options else "")
    rows = [f"{s.out}: {s.episodes:,} episodes of {what}, policy {s.policy}, seed {s.seed}"]
    if s.resumed:
        rows[0] += f" ({s.resumed:,} from an earlier run)"
    if s.mean_return is not None:
        ret = f"return: mean {s.mean_return:.4f}"
        if s.ci95_low is not None and s.ci95_high is not None and s.std_return is not None:
            ret += f" ± {(s.ci95_high - s.ci95_low) / 2:.4f} (95% CI [{s.ci95_low:.4f}, {s.ci95_high:.4f}]), std {s.std_return:.4f}"
        rows.append(ret)
    if s.outcomes and s.win_rate is not None and s.draw_rate is not None and s.loss_rate is not None:
        rows.append(f"outcomes: win {s.win_rate:.1%}  draw {s.draw_rate:.1%}  loss {s.loss_rate:.1%}  ({s.outcomes:,} episodes)")
    if s.length_min is not None and s.length_mean is not None:
        rows.append(f"length: min {s.length_min}  p50 {s.length_p50:g}  max {s.length_max}  mean {s.length_mean:.2f}")
    if s.episodes_per_s is not None and s.seconds is not None:
        played = f"{s.played:,} played" if s.played else f"{s.episodes:,} episodes"
        rows.append(f"throughput: {s.episodes_per_s:,.1f} episodes/s ({played} in {s.seconds:.1f} s)")
    return "\n".join(rows)


def to_json(s: EvalSummary) -> str:
    return json.dumps(msgspec.to_builtins(s), indent=2)
