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
the schedule, which also holds the ``Retry-After`` pause (one number, its
deferral: it resumes past it without a burst), and a rate controller that says
which rate to schedule at and counts the refusals. :class:`GcraSchedule` and the controllers
are sans-I/O: they take the time as an argument and never await, so they are
tested on simulated timelines.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import anyio
import anyio.lowlevel

from ._adaptive import RateController
from ._limiter import LimiterStatistics, Outcome
from ._models import RateLimit

__all__ = [
    "Controller",
    "GcraSchedule",
    "InProcessLimiter",
    "in_process_limiter",
]

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
    def deferred_until(self) -> float:
        """The end of the latest deferral (``-inf``: none yet); see :meth:`defer_until`."""
        return self._deferred

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


class Controller(Protocol):
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

    def hold_until(self, now: float) -> float:
        """The earliest time a new send should go (``now``: at once); a window known
        to be full holds new reservations like a short pause."""

    @property
    def estimated_limit(self) -> float | None:
        """The controller's estimate of the service's limit, if it has one."""

    @property
    def decreases(self) -> int:
        """How many times the rate was cut."""

    @property
    def refused(self) -> int:
        """How many refusals it was told of."""


class InProcessLimiter:
    """The embedded :class:`~nebula_async._limiter.Limiter`: GCRA, pause and controller.

    ``acquire()`` returns the scheduled send time as its ticket (per ``clock``).
    ``clock`` and ``sleep`` are injectable for tests; they must agree (``sleep(d)``
    lets ``clock()`` advance by at least ``d``).
    """

    def __init__(
        self,
        controller: Controller,
        *,
        burst: int = 1,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._controller = controller
        self._clock = clock
        self._sleep = sleep
        # The schedule's own rate is replaced before every reservation; it keeps the
        # pause even while the rate is unlimited (None), when it hands out no slot.
        self._schedule = GcraSchedule(1.0, burst)
        # Taken as anyio does by default, with a turn of the event loop even when it
        # is free: under load that spaces the sends among the callers, and without
        # it garbage collection costs gathered img2img 25k instructions more (705k ->
        # 731k, whole client, concurrency 64). A caller alone (no ticket out) has
        # nobody to give way to: it takes a free one at once (one call awaited at a
        # time: 667.5k -> 631.8k instructions).
        self._reserving = anyio.Semaphore(2)
        self._acquired = 0
        # Tickets handed out and not yet recorded (the client records every one, a
        # cancelled send too; one never recorded only makes it always give way).
        self._outstanding = 0

    async def acquire(self) -> float:
        """Wait out a pause, then wait for the next send slot; return its time.

        At most two callers hold a reserved slot at once: a new rate (a cut after a
        refusal) applies from the next send but one, not after every slot already
        handed out to the callers queued behind, while the next slot is still
        reserved before the last one is due, so the schedule stays anchored.
        """
        controller = self._controller
        if self._outstanding or not self._reserving.value:
            await self._reserving.acquire()
        else:
            await anyio.lowlevel.checkpoint_if_cancelled()
            self._reserving.acquire_nowait()
        try:
            while True:
                now = self._clock()
                refused = controller.refused
                slot = self._reserve(now)
                if slot > now:
                    await self._sleep(slot - now)
                if self._schedule.deferred_until <= slot and (
                    refused == controller.refused or controller.hold_until(slot) <= slot
                ):
                    break
                # A Retry-After came in while this caller slept, or a refusal that says
                # the server's window is full: its slot falls inside the pause or the
                # hold, so it is forfeited (erring slow) and a new one taken after it.
            controller.on_sent(slot)
            self._acquired += 1
            self._outstanding += 1
            return slot
        finally:
            self._reserving.release()

    def _reserve(self, now: float) -> float:
        rate = self._controller.rate_at(now)
        start = max(now, self._schedule.deferred_until, self._controller.hold_until(now))
        if rate is None:
            return start
        if rate != self._schedule.rate:
            self._schedule.set_rate(rate, now)
        return self._schedule.reserve(start)

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """Tell the controller what became of the slot; a ``retry_after`` pauses all."""
        if self._outstanding:  # (not below zero for a ticket it did not hand out)
            self._outstanding -= 1
        now = self._clock()
        paused_until = self._schedule.deferred_until
        if retry_after is not None and retry_after > 0 and now + retry_after > paused_until:
            if paused_until <= now:
                _log.info("Retry-After: pausing every request for %.3gs", retry_after)
            self._schedule.defer_until(now + retry_after)
        sent_at = ticket if isinstance(ticket, float) else now
        if outcome is Outcome.ACCEPTED:
            self._controller.on_accepted(sent_at, now)
        elif outcome is Outcome.REFUSED:
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
            paused_for_s=max(0.0, self._schedule.deferred_until - now),
            acquired=self._acquired,
            refused=self._controller.refused,
            decreases=self._controller.decreases,
        )

    async def aclose(self) -> None:
        """Nothing to release: the in-process limiter holds no connection."""


def in_process_limiter(
    limit: RateLimit | None, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep
) -> InProcessLimiter:
    """The embedded limiter for ``rate_limit=``.

    None: unlimited until the first 429, then adaptive. A :class:`RateLimit` is a
    ceiling the adaptive rate never passes (``adaptive=False``: the rate itself);
    its ``min_per_second`` is the floor of a cut.
    """
    if limit is None:
        controller = RateController(initial_rate=None)
        return InProcessLimiter(controller, clock=clock, sleep=sleep)
    options = {} if limit.min_per_second is None else {"min_rate": limit.min_per_second}
    controller = RateController(
        initial_rate=limit.per_second,
        ceiling=limit.per_second,
        adaptive=limit.adaptive,
        burst=limit.burst,
        **options,
    )
    return InProcessLimiter(controller, burst=limit.burst, clock=clock, sleep=sleep)
