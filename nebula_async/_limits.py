"""The embedded rate limiter: an anchored GCRA schedule, a pause, an adaptive rate.

GCRA
----
The Generic Cell Rate Algorithm comes from ATM networks (ATM Forum, *Traffic
Management Specification 4.0*, 1996, the "virtual scheduling" algorithm; Brandur
Leach's "Rate limiting, cells, and GCRA", brandur.org/rate-limiting, explains it
for web APIs). For a rate ``r`` it keeps one number, the theoretical arrival time
``TAT`` of the next request, with the emission interval ``T = 1 / r`` and the
burst tolerance ``tau = (burst - 1) * T``. A request arriving at ``t`` conforms
when ``t >= TAT - tau``, and then ``TAT = max(TAT, t) + T``.

Here it shapes rather than polices: :meth:`GcraSchedule.reserve` never refuses,
it hands out the earliest conforming send time ``max(t, TAT - tau)`` and moves
``TAT`` on. Any window ``[a, a + W]`` then holds at most ``burst + floor(W * r)``
send times: for the first and last of ``n`` slots in it, ``TAT`` has grown by
``(n - 1) * T`` between them, and the last one conforms, so
``(n - 1) * T - tau <= W``.

Why anchored
------------
The next slot is computed from ``TAT``, the schedule, never from the moment a
sleeper actually woke up. Timers fire late (by the event loop's granularity and
load); a limiter that re-bases the next slot on the late wake-up adds that
lateness to every interval and so runs slow for good (aiometer and aiolimiter
lose about 6% at 200/s). Anchored to ``TAT``, lateness is paid back by the next
sends, so the long-run rate stays on target. ``max(TAT, t)`` brings an idle
schedule up to the present, so idleness never banks more than ``burst``.

The limiter
-----------
:class:`InProcessLimiter` is the client's embedded :class:`~nebula_async._limiter.Limiter`:
the schedule, the ``Retry-After`` pause (one number, ``_pause_until``; the
schedule is pushed past it so the resume is not a burst) and a rate controller
that says which rate to schedule at. :class:`GcraSchedule` and the controllers
are sans-I/O: they take the time as an argument and never await, so they are
tested on simulated timelines.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import anyio

from ._limiter import LimiterStatistics, Outcome
from ._models import RateLimit

__all__ = [
    "AdaptiveRate",
    "GcraSchedule",
    "InProcessLimiter",
    "RateController",
    "in_process_limiter",
]

#: With no ``min_per_second``, the adaptive rate never falls below this fraction of
#: the target: about four halvings, slow enough to relieve a throttled server yet
#: still sending, so that recovery can notice when the server is back. Longer stops
#: are the business of ``Retry-After``.
DEFAULT_FLOOR_FRACTION: Final = 1 / 20
#: With no ``recovery_per_s``, the rate regains this fraction of the target per
#: second (from half the target back to it in 5 s).
DEFAULT_RECOVERY_FRACTION: Final = 1 / 10

_NEVER: Final = -math.inf
_log = logging.getLogger("nebula_async")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def _check_rate(per_second: float) -> float:
    rate = float(per_second)
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"per_second must be a positive finite number, got {per_second!r}")
    return rate


class GcraSchedule:
    """The GCRA virtual-scheduling algorithm as a shaper, without I/O.

    Every method takes the current time; times must not go backwards between
    calls. Slots come out in reservation order, never earlier than the ``now``
    they were asked at, and any window ``[a, a + W]`` holds at most
    ``burst + floor(W * rate)`` of them (at one rate).

    >>> s = GcraSchedule(10.0, burst=2)
    >>> [round(s.reserve(0.0), 9) for _ in range(4)]
    [0.0, 0.0, 0.1, 0.2]
    """

    __slots__ = ("_burst", "_deferred", "_interval", "_latest", "_rate", "_tat", "_tau")

    def __init__(self, per_second: float, burst: int = 1) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        self._burst = burst
        self._rate = _check_rate(per_second)
        self._interval = 1.0 / self._rate
        self._tau = (burst - 1) * self._interval
        self._tat = _NEVER
        self._latest = _NEVER  # the latest slot handed out
        self._deferred = _NEVER  # the end of the latest deferral (defer_until)

    @property
    def rate(self) -> float:
        """Slots per second handed out from now on."""
        return self._rate

    @property
    def burst(self) -> int:
        """How many slots may share one instant after an idle spell."""
        return self._burst

    @property
    def tat(self) -> float:
        """The theoretical arrival time (``-inf`` before the first reservation)."""
        return self._tat

    def reserve(self, now: float) -> float:
        """Reserve the next slot and return its send time (``>= now``)."""
        tat = self._tat
        if tat < now:
            tat = now  # idle: bank at most `burst`, never the idle time itself
        slot = tat - self._tau
        if slot < now:
            slot = now
        if slot < self._latest:
            # Only float rounding across a rate change gets here: keep FIFO order.
            slot = self._latest
        # Advance from the schedule, not from when the caller will wake up.
        self._tat = tat + self._interval
        self._latest = slot
        return slot

    def set_rate(self, per_second: float, now: float) -> None:
        """Use ``per_second`` for the slots not yet handed out.

        The schedule's memory is the virtual time ``L = TAT - tau - T`` of the last
        slot: when backlogged it is the last slot handed out. A change keeps ``L``
        and re-derives the rest at the new rate, so the next slot comes ``1 / rate``
        after the last one (slots stay in order), and idle credit is the time since
        ``L`` divided by the new interval, capped at ``burst``. ``now`` lets the
        schedule drop idle history that cannot matter at either rate.
        """
        rate = _check_rate(per_second)
        interval = 1.0 / rate
        old_interval = self._interval
        # L + tau' + T' == TAT + burst * (T' - T).
        shift = self._burst * (interval - old_interval)
        # Below this TAT, the credit is a full burst at both rates (no change).
        forget = now - shift if shift > 0 else now
        tat = self._tat if self._tat > forget else forget
        self._tat = tat + shift
        self._rate = rate
        self._interval = interval
        self._tau = (self._burst - 1) * interval
        # A deferral in force stays in force at the new rate, still with no credit at its
        # end: a faster rate shifts TAT back, which would free a burst at the resume.
        self._hold_past(self._deferred)

    def defer_until(self, until: float) -> None:
        """Hand out no new slot before ``until`` (a server-requested pause).

        The schedule resumes at ``until`` as if busy up to then, without a burst:
        right after a ``Retry-After`` is no time to spend banked credit.
        Slots already handed out are not moved.

        >>> s = GcraSchedule(10.0, burst=3)
        >>> s.defer_until(5.0)
        >>> [round(s.reserve(1.0), 9) for _ in range(2)]
        [5.0, 5.1]
        """
        if until > self._deferred:
            self._deferred = until
        self._hold_past(until)

    def _hold_past(self, until: float) -> None:
        busy_until = until + self._tau
        if self._tat < busy_until:
            self._tat = busy_until

    def horizon(self, now: float) -> float:
        """The latest slot handed out so far, or ``now`` if that is later."""
        return self._latest if self._latest > now else now


class AdaptiveRate:
    """AIMD control of the request rate, without I/O.

    A 429 cuts the rate by ``limit.decrease_factor`` (never below the floor,
    ``limit.min_per_second`` or ``per_second / 20``), at most once per congestion
    event; the rate then climbs back linearly at ``limit.recovery_per_s`` (default
    ``per_second / 10``) per second up to ``limit.per_second``. A non-adaptive
    limit keeps ``per_second``.

    >>> import nebula_async as na
    >>> a = AdaptiveRate(na.RateLimit(100))
    >>> a.on_rate_limited(sent_at=9.5, now=10.0), a.on_rate_limited(sent_at=9.9, now=10.1)
    (True, False)
    >>> a.rate_at(10.0), a.rate_at(12.0), a.rate_at(99.0)
    (50.0, 70.0, 100.0)
    """

    __slots__ = (
        "_adaptive",
        "_base",
        "_decreased_at",
        "_decreases",
        "_event_end",
        "_factor",
        "_floor",
        "_recovered_at",
        "_recovery",
        "_target",
    )

    def __init__(self, limit: RateLimit) -> None:
        target = _check_rate(limit.per_second)
        self._target = target
        self._adaptive = limit.adaptive
        self._factor = limit.decrease_factor
        floor = limit.min_per_second
        self._floor = min(target, target * DEFAULT_FLOOR_FRACTION if floor is None else floor)
        recovery = limit.recovery_per_s
        self._recovery = target * DEFAULT_RECOVERY_FRACTION if recovery is None else recovery
        self._base = target  # the rate right after the last cut
        self._decreased_at = _NEVER
        self._recovered_at = _NEVER  # from then on the rate is the target again
        self._event_end = _NEVER  # 429s for requests sent up to here are old news
        self._decreases = 0

    @property
    def target(self) -> float:
        """The configured rate, ``limit.per_second``."""
        return self._target

    @property
    def floor(self) -> float:
        """The lowest rate a cut can reach."""
        return self._floor

    @property
    def decreases(self) -> int:
        """How many congestion events cut the rate."""
        return self._decreases

    def rate_at(self, now: float) -> float:
        """The rate at ``now``: the target, or recovering linearly from the last cut."""
        if now >= self._recovered_at:
            return self._target
        elapsed = now - self._decreased_at
        if elapsed <= 0.0:
            return self._base
        return self._base + self._recovery * elapsed

    def on_rate_limited(self, sent_at: float, now: float, *, horizon: float | None = None) -> bool:
        """Report a 429 for a request sent at ``sent_at``; True when it cut the rate.

        A request sent at or before the end of the last congestion event (the last
        cut, or ``horizon`` as given then) is ignored: it could not have seen the
        cut. :class:`RateLimiter` passes as ``horizon`` its last slot already handed
        out, since those were scheduled at the old rate.
        """
        if not self._adaptive or sent_at <= self._event_end:
            return False
        rate = max(self._floor, self.rate_at(now) * self._factor)
        self._base = rate
        self._decreased_at = now
        self._recovered_at = now + (self._target - rate) / self._recovery
        self._event_end = now if horizon is None or horizon < now else horizon
        self._decreases += 1
        return True


class RateController(Protocol):
    """Which rate to schedule at, learnt from what the service answers; sans-I/O.

    Every method takes ``now`` on the limiter's clock. ``rate_at`` returning None
    means unlimited (no limit configured and none met yet).
    """

    def on_sent(self, now: float) -> None:
        """A request was sent at ``now``."""

    def on_accepted(self, sent_at: float, now: float) -> None:
        """The request sent at ``sent_at`` was not refused for the rate."""

    def on_refused(self, sent_at: float, now: float, *, retry_after: float | None) -> None:
        """The request sent at ``sent_at`` was refused for the rate (a 429)."""

    def rate_at(self, now: float) -> float | None:
        """The rate to send at now, or None for unlimited."""

    @property
    def estimated_limit(self) -> float | None:
        """The controller's estimate of the service's limit, if it has one."""

    @property
    def decreases(self) -> int:
        """How many times the rate was cut."""


class _SendRate:
    """Sends per second over the last second: what slow start seeds a rate from."""

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent: deque[float] = deque()

    def add(self, now: float) -> None:
        self._sent.append(now)
        while self._sent[0] < now - 1.0:
            self._sent.popleft()

    def per_second(self, now: float) -> float:
        """The rate over the last second, or over the time since the first send if shorter."""
        while self._sent and self._sent[0] < now - 1.0:
            self._sent.popleft()
        if len(self._sent) < 2:
            return 1.0
        return len(self._sent) / max(now - self._sent[0], 1e-3)


class _AimdController:
    """:class:`AdaptiveRate` as a :class:`RateController`, with slow start.

    With no configured rate it is unlimited until the first refusal, which turns
    on an adaptive rate seeded from the send rate just measured.
    """

    def __init__(self, limit: RateLimit | None) -> None:
        self._limit = limit
        self._adaptive = None if limit is None else AdaptiveRate(limit)
        self._sent = _SendRate()

    def on_sent(self, now: float) -> None:
        if self._adaptive is None:
            self._sent.add(now)

    def on_accepted(self, sent_at: float, now: float) -> None:
        pass

    def on_refused(self, sent_at: float, now: float, *, retry_after: float | None) -> None:
        if self._adaptive is None:
            seed = max(1.0, self._sent.per_second(now))  # not below one per second
            self._adaptive = AdaptiveRate(RateLimit(seed))
        self._adaptive.on_rate_limited(sent_at, now)

    def rate_at(self, now: float) -> float | None:
        return None if self._adaptive is None else self._adaptive.rate_at(now)

    @property
    def estimated_limit(self) -> float | None:
        return None

    @property
    def decreases(self) -> int:
        return 0 if self._adaptive is None else self._adaptive.decreases


class InProcessLimiter:
    """The embedded :class:`~nebula_async._limiter.Limiter`: GCRA, pause and controller.

    ``acquire()`` returns the scheduled send time as its ticket (per ``clock``).
    ``clock`` and ``sleep`` are injectable for tests; they must agree (``sleep(d)``
    lets ``clock()`` advance by at least ``d``).
    """

    def __init__(
        self,
        controller: RateController,
        *,
        burst: int = 1,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._controller = controller
        self._clock = clock
        self._sleep = sleep
        # The schedule's own rate is replaced before every reservation.
        self._schedule = GcraSchedule(1.0, burst)
        self._pause_until = _NEVER
        self._acquired = 0
        self._refused = 0

    async def acquire(self) -> float:
        """Wait out a pause, then wait for the next send slot; return its time."""
        while True:
            now = self._clock()
            slot = self._reserve(now)
            if slot > now:
                await self._sleep(slot - now)
            if self._pause_until <= slot:
                break
            # A Retry-After came in while this caller slept: its slot falls inside the
            # pause, so it is forfeited (erring slow) and a new one taken after it.
        self._controller.on_sent(slot)
        self._acquired += 1
        return slot

    def _reserve(self, now: float) -> float:
        rate = self._controller.rate_at(now)
        start = self._pause_until if self._pause_until > now else now
        if rate is None:
            return start
        if rate != self._schedule.rate:
            self._schedule.set_rate(rate, now)
        return self._schedule.reserve(start)

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """Tell the controller what became of the slot; a ``retry_after`` pauses all."""
        now = self._clock()
        if retry_after is not None and retry_after > 0 and now + retry_after > self._pause_until:
            if self._pause_until <= now:
                _log.info("Retry-After: pausing every request for %.3gs", retry_after)
            self._pause_until = now + retry_after
            self._schedule.defer_until(self._pause_until)
        sent_at = ticket if isinstance(ticket, float) else now
        if outcome is Outcome.ACCEPTED:
            self._controller.on_accepted(sent_at, now)
        elif outcome is Outcome.REFUSED:
            self._refused += 1
            cuts = self._controller.decreases
            self._controller.on_refused(sent_at, now, retry_after=retry_after)
            if self._controller.decreases != cuts:
                rate = self._controller.rate_at(now)
                limit = self._controller.estimated_limit
                _log.info(
                    "refused for the rate: sending at %s/s from now (estimated limit %s/s)",
                    "?" if rate is None else f"{rate:.3g}",
                    "?" if limit is None else f"{limit:.3g}",
                )

    def statistics(self) -> LimiterStatistics:
        """A snapshot: the current rate, the estimate of the limit, the pause left."""
        now = self._clock()
        return LimiterStatistics(
            current_rate=self._controller.rate_at(now),
            estimated_limit=self._controller.estimated_limit,
            paused_for_s=max(0.0, self._pause_until - now),
            acquired=self._acquired,
            refused=self._refused,
            decreases=self._controller.decreases,
        )

    async def aclose(self) -> None:
        """Nothing to release: the in-process limiter holds no connection."""


def in_process_limiter(
    limit: RateLimit | None, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep
) -> InProcessLimiter:
    """The embedded limiter for ``rate_limit=`` (None: unlimited until a 429, then adaptive)."""
    return InProcessLimiter(
        _AimdController(limit),
        burst=1 if limit is None else limit.burst,
        clock=clock,
        sleep=sleep,
    )
