"""Medians and spread of repeated samples, and percentiles of latencies."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = ["Summary", "percentile", "summarize"]


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
