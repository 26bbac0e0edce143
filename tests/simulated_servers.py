"""Throttling servers and a client in virtual time, to test rate controllers.

A discrete-event simulation, deterministic for a seed: ``concurrency`` workers take
jobs, wait for a send slot from an anchored :class:`GcraSchedule` paced at the
controller's ``rate_at`` (unlimited while it says None), send; the request reaches
the server after half the latency (with jitter), the server admits or refuses it
at its arrival (in arrival order, which jitter makes other than the order of
sending), and the answer comes back after the other half. A refused job goes
back to the head of the queue; a ``Retry-After`` pauses every worker (as the
client's limiter does) and defers the schedule. This is the client's shape, not its
code: the in-process limiter does the same with a real clock.

Servers count accepted arrivals only (a refusal uses up nothing), as the usual
window and bucket limiters do. Each takes its limit as requests per window, a
number or a function of time (a limit that changes mid-run).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from nebula_async._limits import GcraSchedule

__all__ = [
    "REFUSAL_STYLES",
    "Controller",
    "FixedWindow",
    "Noisy",
    "OracleController",
    "Result",
    "Server",
    "SlidingWindow",
    "TokenBucket",
    "phases",
    "simulate",
]

Limit = Callable[[float], float]

#: How a refusal looks to the client: HTTP 429 with ``Retry-After: 1``, HTTP 429
#: without it, and HTTP 200 with body code 429 (which never has one). The last two
#: are the same event to a controller; both are kept so each style is named in tests.
REFUSAL_STYLES: dict[str, float | None] = {"http_retry_after": 1.0, "http": None, "body": None}


def phases(*steps: tuple[float, float]) -> Limit:
    """A limit that changes: ``phases((0, 20), (10, 10), (20, 30))`` is 20 from t=0, ..."""
    starts = [start for start, _ in steps]
    values = [value for _, value in steps]

    def limit(t: float) -> float:
        current = values[0]
        for start, value in zip(starts, values, strict=True):
            if t >= start:
                current = value
        return current

    return limit


def _as_limit(limit: float | Limit) -> Limit:
    if callable(limit):
        return limit
    value = float(limit)
    return lambda _t: value


class Server(Protocol):
    """Decides each request by its arrival time."""

    window: float

    def limit_at(self, t: float) -> float: ...

    def admit(self, t: float) -> bool: ...


class SlidingWindow:
    """At most ``limit`` accepted requests in any ``window`` seconds (a sliding log)."""

    def __init__(self, limit: float | Limit, window: float = 1.0) -> None:
        self.limit_at = _as_limit(limit)
        self.window = window
        self._log: deque[float] = deque()

    def admit(self, t: float) -> bool:
        log = self._log
        while log and log[0] <= t - self.window:
            log.popleft()
        if len(log) < math.floor(self.limit_at(t) * self.window + 1e-9):
            log.append(t)
            return True
        return False


class FixedWindow:
    """At most ``limit`` accepted requests per calendar window ``[k*W, (k+1)*W)``."""

    def __init__(self, limit: float | Limit, window: float = 1.0) -> None:
        self.limit_at = _as_limit(limit)
        self.window = window
        self._index = -1
        self._count = 0

    def admit(self, t: float) -> bool:
        index = math.floor(t / self.window)
        if index != self._index:
            self._index, self._count = index, 0
        if self._count < math.floor(self.limit_at(t) * self.window + 1e-9):
            self._count += 1
            return True
        return False


class TokenBucket:
    """Refilled at ``limit / window`` per second up to ``capacity`` tokens (starts full;
    default: one window's worth)."""

    def __init__(
        self, limit: float | Limit, capacity: float | None = None, window: float = 1.0
    ) -> None:
        self.limit_at = _as_limit(limit)
        self.window = window
        self.capacity = self.limit_at(0.0) if capacity is None else capacity
        self._tokens = self.capacity
        self._at = 0.0

    def admit(self, t: float) -> bool:
        if t > self._at:
            rate = self.limit_at(t) / self.window
            self._tokens = min(self.capacity, self._tokens + (t - self._at) * rate)
            self._at = t
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Noisy:
    """Refuses each request with probability ``share`` whatever the rate, then asks
    ``inner`` (None: no limit at all): a server that says 429 now and then."""

    def __init__(self, share: float, inner: Server | None = None, *, seed: int = 7) -> None:
        self.share = share
        self.inner = inner
        self.window = 1.0 if inner is None else inner.window
        self._rng = random.Random(seed)

    def limit_at(self, t: float) -> float:
        return math.inf if self.inner is None else self.inner.limit_at(t)

    def admit(self, t: float) -> bool:
        if self._rng.random() < self.share:
            return False
        return self.inner is None or self.inner.admit(t)


class Controller(Protocol):
    """What the simulated client asks of a controller (``RateController``'s shape)."""

    def on_sent(self, now: float) -> None: ...

    def on_accepted(self, sent_at: float, now: float) -> None: ...

    def on_refused(self, sent_at: float, now: float, *, retry_after: float | None) -> None: ...

    def rate_at(self, now: float) -> float | None: ...


class OracleController:
    """Knows the server's limit: paces at ``fraction`` of it ("just under")."""

    def __init__(self, server: Server, *, fraction: float = 0.98, lead: float = 0.1) -> None:
        self._server = server
        self._fraction = fraction
        self._lead = lead  # a request sent now arrives about this much later

    def on_sent(self, now: float) -> None:
        pass

    def on_accepted(self, sent_at: float, now: float) -> None:
        pass

    def on_refused(self, sent_at: float, now: float, *, retry_after: float | None) -> None:
        pass

    def rate_at(self, now: float) -> float:
        server = self._server
        return self._fraction * server.limit_at(now + self._lead) / server.window


@attrs.frozen
class Result:
    """What a simulated run did: ``finished_s`` is when the last job was accepted."""

    jobs: int
    attempts: int
    refused: int
    finished_s: float
    #: (time, rate) at every send; rate None while unlimited.
    rates: tuple[tuple[float, float | None], ...]

    @property
    def goodput(self) -> float:
        return self.jobs / self.finished_s

    @property
    def refused_share(self) -> float:
        return self.refused / self.attempts

    def settled_after(self, t: float, *, target: float, low: float, high: float) -> float:
        """Seconds after ``t`` until the send rate first lies in ``[low, high] * target``."""
        for at, rate in self.rates:
            if at >= t and rate is not None and low * target <= rate <= high * target:
                return at - t
        return math.inf


_SEND, _ANSWER, _WAKE, _ARRIVE = 0, 1, 2, 3


def simulate(
    controller: Controller,
    server: Server,
    *,
    jobs: int = 300,
    concurrency: int = 16,
    latency: float = 0.2,
    jitter: float = 0.25,
    retry_after: float | None = None,
    burst: int = 1,
    seed: int = 0,
    max_time: float = 600.0,
    reserve_ahead: bool = False,
) -> Result:
    """Run ``jobs`` jobs through ``controller`` against ``server``; see the module doc.

    ``latency`` is the round trip; each half is scaled by U(1 - jitter, 1 + jitter).
    ``retry_after`` is what a refusal carries (None: nothing). With
    ``reserve_ahead`` every waiting worker reserves its slot when it starts waiting
    (the rate of that moment applies to it however late it is); without, only the
    first in line holds a slot, taken when the one before it was sent, so a rate
    change applies to the very next send.
    """
    run = _Simulation(
        controller,
        server,
        jobs=jobs,
        latency=latency,
        jitter=jitter,
        retry_after=retry_after,
        burst=burst,
        seed=seed,
        reserve_ahead=reserve_ahead,
    )
    return run.run(concurrency, max_time)


class _Simulation:
    """The state of one :func:`simulate` run and a handler per kind of event."""

    def __init__(
        self,
        controller: Controller,
        server: Server,
        *,
        jobs: int,
        latency: float,
        jitter: float,
        retry_after: float | None,
        burst: int,
        seed: int,
        reserve_ahead: bool,
    ) -> None:
        self.controller = controller
        self.server = server
        self.jobs = jobs
        self.half = latency / 2
        self.jitter = jitter
        self.retry_after = retry_after
        self.burst = burst
        self.reserve_ahead = reserve_ahead
        self.rng = random.Random(seed)
        # A controller may ask that new sends wait (RateController.hold_until).
        self.hold: Callable[[float], float] = getattr(controller, "hold_until", lambda now: now)
        self.events: list[tuple[float, int, int, int]] = []
        self.sequence = 0
        self.pending = deque(range(jobs))  # job ids not yet accepted and not in flight
        self.schedule: GcraSchedule | None = None
        self.pause_until = -math.inf
        self.sent_at: dict[int, float] = {}  # job -> its send time, while in flight
        self.admitted: dict[int, bool] = {}
        self.rates: list[tuple[float, float | None]] = []
        self.attempts = self.refused = self.done = 0
        self.finished = 0.0
        self.idle_workers = 0
        self.wake_at = -math.inf
        self.in_line: deque[int] = deque()  # jobs of workers waiting for a slot (not reserve_ahead)
        self.head_reserved = False

    def run(self, concurrency: int, max_time: float) -> Result:
        self.idle_workers = concurrency
        for _ in range(concurrency):
            self.start_worker(0.0)
        handlers = {
            _WAKE: self.on_wake,
            _SEND: self.on_send,
            _ARRIVE: self.on_arrive,
            _ANSWER: self.on_answer,
        }
        while self.events:
            now, _, kind, job = heapq.heappop(self.events)
            if now > max_time:
                raise AssertionError(
                    f"simulation ran past {max_time} s ({self.done}/{self.jobs} done)"
                )
            handlers[kind](now, job)
        assert self.done == self.jobs, (self.done, self.jobs)
        return Result(
            jobs=self.jobs,
            attempts=self.attempts,
            refused=self.refused,
            finished_s=self.finished,
            rates=tuple(self.rates),
        )

    def push(self, at: float, kind: int, payload: int) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, self.sequence, kind, payload))

    def half_trip(self) -> float:
        return self.half * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    # -- the client side ---------------------------------------------------------------

    def reserve(self, now: float, job: int) -> None:
        rate = self.controller.rate_at(now)
        start = max(now, self.hold(now))
        if rate is None:
            slot = start
        else:
            if self.schedule is None:
                self.schedule = GcraSchedule(rate, self.burst)
            elif rate != self.schedule.rate:
                self.schedule.set_rate(rate, now)
            slot = self.schedule.reserve(start)
        self.rates.append((slot, rate))
        self.push(slot, _SEND, job)

    def paused(self, now: float) -> bool:
        if now >= self.pause_until:
            return False
        if self.wake_at != self.pause_until:
            self.wake_at = self.pause_until
            self.push(self.pause_until, _WAKE, 0)
        return True

    def next_in_line(self, now: float) -> None:
        if self.head_reserved or not self.in_line or self.paused(now):
            return
        self.head_reserved = True
        self.reserve(now, self.in_line.popleft())

    def start_worker(self, now: float) -> None:
        """A free worker takes the next job and waits for its slot."""
        if not self.pending or self.paused(now):
            return
        job = self.pending.popleft()
        self.idle_workers -= 1
        if self.reserve_ahead:
            self.reserve(now, job)
        else:
            self.in_line.append(job)
            self.next_in_line(now)

    def start_idle_workers(self, now: float) -> None:
        for _ in range(self.idle_workers):
            self.start_worker(now)

    # -- events --------------------------------------------------------------------------

    def on_wake(self, now: float, _job: int) -> None:
        """A pause ended."""
        self.start_idle_workers(now)
        self.next_in_line(now)

    def on_send(self, now: float, job: int) -> None:
        if not self.reserve_ahead:
            self.head_reserved = False
            self.next_in_line(now)
        self.attempts += 1
        self.controller.on_sent(now)
        self.sent_at[job] = now
        self.push(now + self.half_trip(), _ARRIVE, job)

    def on_arrive(self, now: float, job: int) -> None:
        # Decided in arrival order (jitter reorders sends), as a server would.
        self.admitted[job] = self.server.admit(now)
        self.push(now + self.half_trip(), _ANSWER, job)

    def on_answer(self, now: float, job: int) -> None:
        sent = self.sent_at.pop(job)
        self.idle_workers += 1
        if self.admitted.pop(job):
            self.controller.on_accepted(sent, now)
            self.done += 1
            self.finished = now
        else:
            self.refused += 1
            self.controller.on_refused(sent, now, retry_after=self.retry_after)
            self.pending.appendleft(job)
            retry_after = self.retry_after
            if retry_after is not None and now + retry_after > self.pause_until:
                self.pause_until = now + retry_after
                if self.schedule is not None:
                    self.schedule.defer_until(self.pause_until)
        self.start_idle_workers(now)


def compare(
    make: Callable[[], Controller],
    make_server: Callable[[], Server],
    **options: float | int | None,
) -> tuple[Result, Result]:
    """Ours and the oracle's runs against fresh servers of one kind, same seed."""
    ours = simulate(make(), make_server(), **options)  # type: ignore[arg-type]
    server = make_server()
    oracle = simulate(OracleController(server), server, **options)  # type: ignore[arg-type]
    return ours, oracle


def seeds(count: int) -> Sequence[int]:
    return range(count)
