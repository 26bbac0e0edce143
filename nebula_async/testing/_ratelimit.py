"""The mock server's own rate limits, sans-I/O: the clock is passed in.

Three algorithms that real APIs use, because a client that adapts to one may
misjudge another (issue 10):

- ``gcra``: the generic cell rate algorithm (ITU-T I.371, virtual scheduling; the
  same arithmetic as a token bucket of ``burst`` tokens refilled at ``rate``).
- ``sliding_window``: a sliding-window log, "at most N admitted in any W seconds";
  a full window refuses until its oldest admission is W seconds old.
- ``fixed_window``: a counter per window ``[origin + kW, origin + (k+1)W)``, reset
  at each boundary; up to 2N can pass within W seconds across a boundary.

Each takes the rate at every call, so a changed limit applies at once while the
state (the schedule, the log, the count) carries on. Only admitted requests count:
a client refused again and again is never locked out by its own refusals.
"""

from __future__ import annotations

import collections
import math
from typing import Final, Literal, Protocol

__all__ = [
    "ALGORITHMS",
    "FixedWindow",
    "Gcra",
    "RateLimitAlgorithm",
    "ServerLimit",
    "SlidingWindow",
    "make_limit",
    "window_capacity",
]

RateLimitAlgorithm = Literal["gcra", "sliding_window", "fixed_window"]
ALGORITHMS: Final[tuple[RateLimitAlgorithm, ...]] = ("gcra", "sliding_window", "fixed_window")

# Arrival times are floats from one clock; a tolerance keeps "exactly on time" on time.
_EPSILON: Final = 1e-9


class ServerLimit(Protocol):
    """Decides each arrival: admit it (and count it), or refuse it."""

    def admit(self, now: float, rate: float) -> bool:
        """Admit an arrival at ``now`` under ``rate`` requests per second?"""
        ...


def window_capacity(rate: float, window_s: float) -> int:
    """Requests a window of ``window_s`` seconds holds at ``rate``/s: the whole part of
    ``rate * window_s``, at least 1 (a window that holds nothing would refuse all)."""
    return max(1, math.floor(rate * window_s + _EPSILON))


class Gcra:
    """GCRA: one request per ``1 / rate`` seconds, ``burst`` of them at once.

    The theoretical arrival time (TAT) advances by the emission interval for each
    admitted request; an arrival more than ``(burst - 1)`` intervals ahead of the
    TAT is refused and leaves it unchanged.
    """

    def __init__(self, *, burst: int = 1) -> None:
        self._burst = burst
        self._tat = -math.inf

    def admit(self, now: float, rate: float) -> bool:
        """Admit an arrival at ``now`` under ``rate`` requests per second?"""
        interval = 1.0 / rate
        tat = max(self._tat, now)
        if tat - now > (self._burst - 1) * interval + _EPSILON:
            return False
        self._tat = tat + interval
        return True


class SlidingWindow:
    """At most ``window_capacity(rate, window_s)`` admitted in any half-open window
    of ``window_s`` seconds (a log of the admission times still in the window)."""

    def __init__(self, *, window_s: float = 1.0) -> None:
        self._window_s = window_s
        self._admitted: collections.deque[float] = collections.deque()

    def admit(self, now: float, rate: float) -> bool:
        """Admit an arrival at ``now`` under ``rate`` requests per second?"""
        admitted = self._admitted
        # An admission at a is in the window [a, a + W); written as a sum, not now - W,
        # so that busiest_window, which tests the same way, agrees to the last bit.
        while admitted and admitted[0] + self._window_s <= now:
            admitted.popleft()
        if len(admitted) >= window_capacity(rate, self._window_s):
            return False
        admitted.append(now)
        return True


class FixedWindow:
    """At most ``window_capacity(rate, window_s)`` admitted per window
    ``[origin + k * window_s, origin + (k + 1) * window_s)``, the count reset at each."""

    def __init__(self, *, window_s: float = 1.0, origin: float = 0.0) -> None:
        self._window_s = window_s
        self._origin = origin
        self._window = -math.inf
        self._count = 0

    def admit(self, now: float, rate: float) -> bool:
        """Admit an arrival at ``now`` under ``rate`` requests per second?"""
        window = math.floor((now - self._origin) / self._window_s)
        if window != self._window:
            self._window, self._count = window, 0
        if self._count >= window_capacity(rate, self._window_s):
            return False
        self._count += 1
        return True


def make_limit(
    algorithm: RateLimitAlgorithm, *, burst: int, window_s: float, origin: float
) -> ServerLimit:
    """A fresh limit of ``algorithm`` (``burst`` is GCRA's, ``window_s`` the windows')."""
    if algorithm == "gcra":
        return Gcra(burst=burst)
    if algorithm == "sliding_window":
        return SlidingWindow(window_s=window_s)
    return FixedWindow(window_s=window_s, origin=origin)
