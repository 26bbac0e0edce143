"""Limits: a FIFO concurrency limiter, an anchored GCRA schedule, AIMD on 429, a pause.

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
sends, so the long-run rate stays on target, while the window bound above still
holds for the scheduled times (actual sends that a stall of ``d`` seconds delayed
bunch up by at most ``d * rate`` extra). ``max(TAT, t)`` brings an idle schedule
up to the present, so idleness never banks more than ``burst``.

Adaptation and pause
--------------------
:class:`AdaptiveRate` is an AIMD controller: a 429 cuts the rate by
``decrease_factor`` once per congestion event (TCP-style: 429s for requests sent
before the cut are echoes of the same event), and the rate then recovers
linearly. :class:`RateLimiter` joins the schedule and the controller behind one
``acquire()``. :class:`PauseGate` is the client-wide pause that honours
``Retry-After``; callers wait on it *before* taking a rate slot, so a pause does
not leave a pile of expired slots that would all fire at once when it ends.

Concurrency
-----------
:class:`FifoLimiter` is a counting limiter on bare asyncio futures, first come
first served. It replaces anyio's ``CapacityLimiter`` on the hot path: that one raises
``WouldBlock`` twice, makes an ``Event`` and checks for cancellation on every
contended acquire, several times the cost of one future. A release hands the
permit straight to the first waiter, so a newcomer's non-blocking acquire can
never overtake a queued task; a waiter cancelled after it was handed a permit
passes it on, so cancellation never leaks one.

:class:`GcraSchedule` and :class:`AdaptiveRate` are sans-I/O: they take the time
as an argument and never await, so they are tested on simulated timelines.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import attrs

from ._models import RateLimit

__all__ = [
    "AdaptiveRate",
    "FifoLimiter",
    "GcraSchedule",
    "PauseGate",
    "RateLimiter",
    "RateLimiterStatistics",
]

#: With no ``min_per_second``, the adaptive rate never falls below this fraction of
#: the target: about four halvings, slow enough to relieve a throttled server yet
#: still sending, so that recovery can notice when the server is back. Longer stops
#: are the business of ``Retry-After`` (:class:`PauseGate`).
DEFAULT_FLOOR_FRACTION: Final = 1 / 20
#: With no ``recovery_per_s``, the rate regains this fraction of the target per
#: second (from half the target back to it in 5 s).
DEFAULT_RECOVERY_FRACTION: Final = 1 / 10

_NEVER: Final = -math.inf

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

    __slots__ = ("_burst", "_interval", "_last_slot", "_latest", "_rate", "_tat", "_tau")

    def __init__(self, per_second: float, burst: int = 1) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        self._burst = burst
        self._rate = _check_rate(per_second)
        self._interval = 1.0 / self._rate
        self._tau = (burst - 1) * self._interval
        self._tat = _NEVER
        # The slot handed out last, while it may still be given back (NaN: none).
        self._last_slot = math.nan
        # The latest slot ever handed out (kept through give-backs: an upper bound).
        self._latest = _NEVER

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
        self._last_slot = self._latest = slot
        return slot

    def cancel(self, slot: float) -> bool:
        """Give back a reserved ``slot`` whose caller will not send.

        Only the slot handed out last can be given back (the schedule keeps no
        history); then the state is as if it had never been reserved, and this
        returns True. Otherwise, or after a rate change, this is a no-op that
        returns False: the slot stays spent, which errs on the slow side.
        """
        if slot == self._last_slot:  # NaN never compares equal
            self._tat -= self._interval
            self._last_slot = math.nan
            return True
        return False

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
        self._last_slot = math.nan  # the give-back arithmetic was for the old interval

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
        busy_until = until + self._tau
        if self._tat < busy_until:
            self._tat = busy_until
            self._last_slot = math.nan

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


@attrs.frozen
class RateLimiterStatistics:
    """A snapshot of a :class:`RateLimiter`.

    ``acquired``: slots taken by callers that were not cancelled; ``waited_s``: the
    total time those callers were scheduled to wait; ``current_rate``: requests per
    second now; ``decreases``: congestion events that cut the rate;
    ``rate_limited``: 429s reported.
    """

    acquired: int
    waited_s: float
    current_rate: float
    decreases: int
    rate_limited: int = 0


class RateLimiter:
    """Async rate limiter: an anchored :class:`GcraSchedule` steered by :class:`AdaptiveRate`.

    ``acquire()`` waits for the caller's slot and returns its scheduled send time
    per ``clock`` (time latency from there, wrk2's rule). Report a 429 with
    ``on_rate_limited(sent_at)`` using that value. ``clock`` and ``sleep`` are
    injectable for tests; they must agree (``sleep(d)`` lets ``clock()`` advance by
    at least ``d``).
    """

    __slots__ = (
        "_acquired",
        "_adaptive",
        "_clock",
        "_limit",
        "_rate_limited",
        "_schedule",
        "_sleep",
        "_waited_s",
    )

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._limit = limit
        self._clock = clock
        self._sleep = sleep
        self._adaptive = AdaptiveRate(limit)
        self._schedule = GcraSchedule(limit.per_second, limit.burst)
        self._acquired = 0
        self._waited_s = 0.0
        self._rate_limited = 0

    @property
    def limit(self) -> RateLimit:
        """The policy this limiter enforces."""
        return self._limit

    @property
    def current_rate(self) -> float:
        """Requests per second allowed now (lower than the target after a 429)."""
        return self._adaptive.rate_at(self._clock())

    async def acquire(self) -> float:
        """Wait for the next send slot; return its scheduled time per ``clock``.

        Returns without yielding when the slot is due. Cancelled while waiting, the
        caller gives its slot back when it was the last one handed out.
        """
        now = self._clock()
        schedule = self._schedule
        rate = self._adaptive.rate_at(now)
        if rate != schedule.rate:  # recovering after a cut
            schedule.set_rate(rate, now)
        slot = schedule.reserve(now)
        delay = slot - now
        if delay > 0.0:
            try:
                await self._sleep(delay)
            except BaseException:
                # Cancelled (or the sleep failed): this slot will not be used.
                schedule.cancel(slot)
                raise
            self._waited_s += delay
        self._acquired += 1
        return slot

    def on_rate_limited(self, sent_at: float) -> None:
        """Report a 429 for the request sent at ``sent_at`` (from :meth:`acquire`)."""
        self._rate_limited += 1
        now = self._clock()
        schedule = self._schedule
        if self._adaptive.on_rate_limited(sent_at, now, horizon=schedule.horizon(now)):
            schedule.set_rate(self._adaptive.rate_at(now), now)

    def defer_until(self, until: float) -> None:
        """Hand out no slot before ``until`` per ``clock`` (a ``Retry-After`` pause)."""
        self._schedule.defer_until(until)

    def statistics(self) -> RateLimiterStatistics:
        """A snapshot of the counters."""
        return RateLimiterStatistics(
            acquired=self._acquired,
            waited_s=self._waited_s,
            current_rate=self.current_rate,
            decreases=self._adaptive.decreases,
            rate_limited=self._rate_limited,
        )


class PauseGate:
    """The client-wide pause that honours ``Retry-After``.

    ``pause_for(s)`` holds every caller of ``wait()`` until ``s`` seconds from now,
    extending (never shortening) a pause already in force.
    """

    __slots__ = ("_clock", "_resume_at", "_sleep")

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._resume_at = _NEVER

    @property
    def resume_at(self) -> float:
        """When the pause ends, per ``clock`` (``-inf`` when none was seen in force)."""
        return self._resume_at

    def pause_for(self, seconds: float) -> None:
        """Pause until ``seconds`` from now, unless already paused longer.

        A zero, negative or NaN duration is ignored.
        """
        if not seconds > 0:
            return
        until = self._clock() + seconds
        if until > self._resume_at:
            self._resume_at = until

    def is_paused(self, now: float | None = None) -> bool:
        """Whether a pause is in force at ``now`` (default: the clock)."""
        if self._resume_at == _NEVER:
            return False
        return (self._clock() if now is None else now) < self._resume_at

    async def wait(self) -> None:
        """Return at once when not paused; otherwise sleep until the pause ends.

        Re-checks after each sleep, since the pause may have been extended
        meanwhile. Not a checkpoint when not paused.
        """
        if self._resume_at == _NEVER:  # the hot path: one comparison, no clock read
            return
        while True:
            resume_at = self._resume_at
            now = self._clock()
            if now >= resume_at:
                # Expired: forget it so that later calls take the hot path again.
                self._resume_at = _NEVER
                return
            await self._sleep(resume_at - now)


class FifoLimiter:
    """A counting limiter for asyncio: at most ``total`` holders, served in arrival order.

    ``try_acquire()`` takes a permit without waiting when one is free (never ahead
    of a queued caller); ``await acquire()`` waits its turn (it is not a checkpoint
    when a permit is free at once). ``release()`` hands the permit to the first
    waiter, or frees it. Not thread-safe; use it from one event loop.

    >>> async def main():
    ...     limiter = FifoLimiter(1)
    ...     await limiter.acquire()
    ...     busy = limiter.try_acquire()
    ...     limiter.release()
    ...     return busy, limiter.available
    >>> asyncio.run(main())
    (False, 1)
    """

    __slots__ = ("_free", "_total", "_waiters")

    def __init__(self, total: int) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be an integer >= 1, got {total!r}")
        self._total = total
        self._free = total
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"<FifoLimiter total={self._total} available={self._free} waiting={self.waiting}>"

    @property
    def total(self) -> int:
        """How many permits there are."""
        return self._total

    @property
    def available(self) -> int:
        """Permits free right now."""
        return self._free

    @property
    def borrowed(self) -> int:
        """Permits held right now."""
        return self._total - self._free

    @property
    def waiting(self) -> int:
        """Callers queued for a permit."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a permit if one is free (never ahead of a waiter); True when taken."""
        # A free permit with waiters queued cannot happen: release() hands it over.
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a permit, waiting in line for it when none is free.

        Cancelled while waiting, the caller leaves the line; cancelled after a
        permit was handed to it, it passes that permit on.
        """
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # handed a permit, but will not use it
            else:
                with contextlib.suppress(ValueError):  # already dropped by release()
                    self._waiters.remove(future)
            raise

    def release(self) -> None:
        """Give a permit back: to the first live waiter, or to the free pool."""
        if self._hand_over():
            return
        if self._free >= self._total:
            raise RuntimeError("FifoLimiter released more often than acquired")
        self._free += 1

    def _hand_over(self) -> bool:
        """Pass a permit straight to the first live waiter; False when none waits."""
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return True
        return False
