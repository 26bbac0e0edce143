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
    rng = random.Random(seed)
    half = latency / 2
    # A controller may ask that new sends wait (RateController.hold_until).
    hold: Callable[[float], float] = getattr(controller, "hold_until", lambda now: now)
    events: list[tuple[float, int, int, int]] = []
    sequence = 0

    def push(at: float, kind: int, payload: int) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at, sequence, kind, payload))

    pending = deque(range(jobs))  # job ids not yet accepted and not in flight
    schedule: GcraSchedule | None = None
    pause_until = -math.inf
    sent_at: dict[int, float] = {}  # job -> its send time, while in flight
    admitted: dict[int, bool] = {}
    rates: list[tuple[float, float | None]] = []
    attempts = refused = done = 0
    finished = 0.0
    idle_workers = concurrency
    wake_at = -math.inf
    in_line: deque[int] = deque()  # jobs of workers waiting for a slot (not reserve_ahead)
    head_reserved = False

    def reserve(now: float, job: int) -> None:
        nonlocal schedule
        rate = controller.rate_at(now)
        start = max(now, hold(now))
        if rate is None:
            slot = start
        else:
            if schedule is None:
                schedule = GcraSchedule(rate, burst)
            elif rate != schedule.rate:
                schedule.set_rate(rate, now)
            slot = schedule.reserve(start)
        rates.append((slot, rate))
        push(slot, _SEND, job)

    def paused(now: float) -> bool:
        nonlocal wake_at
        if now >= pause_until:
            return False
        if wake_at != pause_until:
            wake_at = pause_until
            push(pause_until, _WAKE, 0)
        return True

    def next_in_line(now: float) -> None:
        nonlocal head_reserved
        if head_reserved or not in_line or paused(now):
            return
        head_reserved = True
        reserve(now, in_line.popleft())

    def start_worker(now: float) -> None:
        """A free worker takes the next job and waits for its slot."""
        nonlocal idle_workers
        if not pending or paused(now):
            return
        job = pending.popleft()
        idle_workers -= 1
        if reserve_ahead:
            reserve(now, job)
        else:
            in_line.append(job)
            next_in_line(now)

    for _ in range(concurrency):
        start_worker(0.0)
    while events:
        now, _, kind, job = heapq.heappop(events)
        if now > max_time:
            raise AssertionError(f"simulation ran past {max_time} s ({done}/{jobs} done)")
        if kind == _WAKE:
            for _ in range(idle_workers):
                start_worker(now)
            next_in_line(now)
            continue
        if kind == _SEND:
            if not reserve_ahead:
                head_reserved = False
                next_in_line(now)
            attempts += 1
            controller.on_sent(now)
            sent_at[job] = now
            push(now + half * rng.uniform(1 - jitter, 1 + jitter), _ARRIVE, job)
            continue
        if kind == _ARRIVE:
            # Decided in arrival order (jitter reorders sends), as a server would.
            admitted[job] = server.admit(now)
            push(now + half * rng.uniform(1 - jitter, 1 + jitter), _ANSWER, job)
            continue
        sent = sent_at.pop(job)
        idle_workers += 1
        if admitted.pop(job):
            controller.on_accepted(sent, now)
            done += 1
            finished = now
        else:
            refused += 1
            controller.on_refused(sent, now, retry_after=retry_after)
            pending.appendleft(job)
            if retry_after is not None and now + retry_after > pause_until:
                pause_until = now + retry_after
                if schedule is not None:
                    schedule.defer_until(pause_until)
        for _ in range(idle_workers):
            start_worker(now)
    assert done == jobs, (done, jobs)
    return Result(
        jobs=jobs, attempts=attempts, refused=refused, finished_s=finished, rates=tuple(rates)
    )


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
