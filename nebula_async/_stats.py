"""Counters kept by a client, and the frozen snapshot ``statistics()`` returns."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

__all__ = ["ClientStatistics", "Counters", "percentile"]


@attrs.frozen(kw_only=True)
class ClientStatistics:
    """A point-in-time snapshot of a client's counters (trio's ``statistics()`` idea).

    ``attempts`` counts every HTTP attempt (re-login repeats included), ``retries``
    the attempts that repeated a failed one, ``rate_limited`` the 429s seen.
    ``calls_waiting`` counts the one-off calls (``img2img``, ``run_job``) waiting to
    start, or to go on after a backoff: at most ``max_concurrency`` are under way.
    """

    attempts: int
    retries: int
    rate_limited: int
    in_flight: int
    submissions_ok: int
    submissions_failed: int
    images: int
    jobs_ok: int
    jobs_failed: int
    logins: int
    current_rate: float | None
    paused_until: float | None
    estimated_limit: float | None = None
    calls_waiting: int = 0


class Counters:
    """Mutable counters; plain attributes so the hot path pays one add each."""

    __slots__ = (
        "attempts",
        "images",
        "in_flight",
        "jobs_failed",
        "jobs_ok",
        "rate_limited",
        "retries",
        "submissions_failed",
        "submissions_ok",
    )

    def __init__(self) -> None:
        self.attempts = 0
        self.retries = 0
        self.rate_limited = 0
        self.in_flight = 0
        self.submissions_ok = 0
        self.submissions_failed = 0
        self.images = 0
        self.jobs_ok = 0
        self.jobs_failed = 0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.0
    """
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
