"""Medians and spread of repeated samples, and percentiles of latencies."""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from typing import Any, Final

import attrs

__all__ = ["Summary", "busiest_window", "long_run_rate", "percentile", "summarize"]

#: The window the rate figures are read over, in seconds.
_WINDOW_S: Final = 1.0


@attrs.frozen
class Summary:
    """The median of some samples, their range and their relative spread."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """(high - low) / median: how far apart the rounds were (0.05 is 5%)."""
        return (self.high - self.low) / self.median if self.median else math.nan

    def as_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "low": self.low,
            "high": self.high,
            "spread": self.spread,
            "samples": list(self.samples),
        }


def summarize(samples: Sequence[float]) -> Summary:
    """Median, minimum and maximum of the finite ``samples`` (NaN when there are none)."""
    values = tuple(value for value in samples if math.isfinite(value))
    if not values:
        return Summary(math.nan, math.nan, math.nan, ())
    return Summary(statistics.median(values), min(values), max(values), values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``values`` by linear interpolation (NaN when empty)."""
    ordered = sorted(value for value in values if math.isfinite(value))
    if not ordered:
        return math.nan
    position = fraction * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def long_run_rate(stamps: Sequence[float]) -> float:
    """Slots per second after the first second; NaN when fewer than two are left."""
    if not stamps:
        return math.nan
    steady = stamps[bisect.bisect_left(stamps, stamps[0] + _WINDOW_S) :]
    if len(steady) < 2 or steady[-1] <= steady[0]:
        return math.nan
    return (len(steady) - 1) / (steady[-1] - steady[0])


def busiest_window(stamps: Sequence[float], width: float = _WINDOW_S) -> int:
    """The most stamps in any half-open window ``[t, t + width)`` (``stamps`` sorted)."""
    best = 0
    start = 0
    for end, stamp in enumerate(stamps):
        while stamps[start] <= stamp - width:
            start += 1
        best = max(best, end - start + 1)
    return best
