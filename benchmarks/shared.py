"""One rate limit shared by N processes: ``python -m benchmarks --only shared``.

N worker processes (1, 2, 4, 8) send to one mock server on loopback under
one aggregate limit (50/s and 500/s), each with a few concurrent senders
(acquire a slot, POST an img2img request with raw aiohttp, record the outcome;
the client integration of the limiter seam is the lead's and is not used
here). Contenders, each in the same harness:

- **shared**: :class:`~nebula_async.SharedRateLimit` through one redis-server
  (GCRA in one Lua script, one round trip per acquire);
- **per-process R/N**: what users do by hand, an in-process GCRA
  (:class:`~nebula_async._limits.GcraSchedule`, anchored) at ``R / N`` in each
  process: no round trip, but N must be known and fixed, and a 429 pauses
  only the process that saw it;
- **limits moving window**: the ``limits`` package's Redis moving window
  (``limits.aio``, on redis-py) as the limiter: it can only ``hit`` (take a
  slot now or fail), so the sender polls: on a failed hit it reads the window
  (``get_window_stats``) and sleeps until the window's reset time, then tries
  again. Every call is a round trip; its timestamps come from each host's clock.

Figures per cell, over the requests of all processes (stamped with
``time.monotonic``, one clock for all processes on Linux): the aggregate
rate of the sends over the fixed window from 1 s after the common start to the
end, against the target (the long-run rate error); the busiest one-second
window against ``rate + burst`` on three clocks: the granted slots (the shared
limiter's are Redis' slot times), the sends (just before each POST) and the
arrivals at the server (a full ``MockNebulaServer`` in a process of its own
that keeps them, :mod:`benchmarks._arrivals`); how late the sends were against
their slots (p99); Redis round trips per request (per acquire that returned a
slot, the last ones past the end included); the added latency per acquire
(the time acquire took beyond the wait the limiter meant: the round trip plus
the timer's lateness; p50, p99); and, to tell a stall of the host from one of
ours, the longest gap between two slots, the longest event-loop stall of any
worker (a 10 ms ticker's lateness) and the slots the shared limiter let lapse.
Every worker opens all its connections (server and Redis) before the start:
a cold start is not what the cells measure.

The pause cell: 4 processes at 100/s; the mock server answers the 150th
request 429 with ``Retry-After: 2``; the process that gets it records it, and
the figure is the time from that 429 to the last send of any process before
the pause ends, with the number of sends inside the pause.

The stall cell: 4 processes at 500/s; the first is stopped (SIGSTOP) 2 s in
for 0.7 s, as a loaded host may deschedule it, with its senders asleep on
slots; the figures are what went out when it woke: the busiest second at the
sends and at the server, the long-run rate, the slots lapsed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiohttp
import attrs

import nebula_async as na
from nebula_async._limiter import Outcome
from nebula_async._limits import GcraSchedule

from ._arrivals import ArrivalServer
from ._server import ROOT
from ._stats import busiest_window

__all__ = [
    "CONTENDERS",
    "PauseResult",
    "SharedResult",
    "StallResult",
    "render",
    "run_part",
    "run_shared",
    "run_stalls",
]

CONTENDERS: Final = ("shared", "per-process R/N", "limits moving window")
_MIN_SENDERS: Final = 8  # concurrent senders per process, at least
#: Senders enough for this many seconds of the target rate in flight, so that
#: they wait on the limiter, not on the loaded machine (500/s: 30 over all processes).
_IN_FLIGHT_S: Final = 0.2
_LATENCY_S: Final = 0.005
_PAUSE_PROCESSES: Final = 4
_PAUSE_RATE: Final = 100.0
_PAUSE_AT: Final = 150  # the mock server answers this request 429 (about 1.4 s in)
_RETRY_AFTER_S: Final = 2.0
_STALL_PROCESSES: Final = 4
_STALL_RATE: Final = 500.0
_STALL_AT_S: Final = 2.0
_STALL_S: Final = 0.7
_PAYLOAD: Final = na.to_payload(na.Img2ImgRequest(model="bench", prompt="a fox", n=1))


@attrs.frozen
class SharedResult:
    """One contender, one process count, one rate."""

    contender: str
    processes: int
    rate: float
    burst: int
    requests: int
    long_run_rate: float
    #: The busiest 1 s window on three clocks: the granted slots (for the shared
    #: limiter Redis' own slot times), the sends (just before each POST, client
    #: side) and the arrivals at the server.
    busiest_slots: int
    busiest_window: int
    busiest_arrivals: int
    #: How late sends were against their slots (p99, ms), and the longest gap
    #: between two consecutive slots of all processes (ms): a stall shows there.
    late_p99_ms: float
    longest_gap_ms: float
    #: The longest event-loop stall any worker saw (ms; a 10 ms ticker's lateness),
    #: and the slots the shared limiter let lapse after such a stall.
    loop_stall_ms: float
    expired: int
    round_trips_per_request: float
    added_p50_ms: float
    added_p99_ms: float
    refused: int

    @property
    def long_run_error(self) -> float:
        """Relative error of the aggregate long-run rate (-0.01 is 1% slow)."""
        return self.long_run_rate / self.rate - 1


@attrs.frozen
class PauseResult:
    """A 429 in one process: how fast the others stopped."""

    contender: str
    processes: int
    rate: float
    retry_after_s: float
    stop_after_429_ms: float
    sends_in_pause: int
    first_send_after_pause_s: float


@attrs.frozen
class StallResult:
    """One worker of several stopped for a while: what went out when it woke."""

    contender: str
    processes: int
    rate: float
    stall_s: float
    busiest_window: int
    busiest_arrivals: int
    long_run_rate: float
    expired: int

    @property
    def long_run_error(self) -> float:
        """Relative error of the aggregate long-run rate (-0.01 is 1% slow)."""
        return self.long_run_rate / self.rate - 1


# -- the worker process --------------------------------------------------------------------------


class _LocalGcra:
    """An anchored in-process GCRA (the per-process R/N contender) with a local pause."""

    def __init__(self, rate: float, burst: int) -> None:
        self._schedule = GcraSchedule(rate, burst)
        self.round_trips = 0

    async def acquire(self) -> tuple[object, float, float]:
        now = time.monotonic()
        slot = self._schedule.reserve(now)
        if slot > now:
            await asyncio.sleep(slot - now)
        return slot, slot - now, slot

    async def record(self, ticket: object, outcome: Outcome, retry_after: float | None) -> None:
        if retry_after:
            self._schedule.defer_until(time.monotonic() + retry_after)

    async def warm_up(self, senders: int) -> None:
        pass


class _Shared:
    def __init__(self, url: str, key: str, rate: float, burst: int) -> None:
        from nebula_async._redis import RedisLimiter

        limiter = na.SharedRateLimit(url, key=key, per_second=rate, burst=burst).create_limiter()
        assert isinstance(limiter, RedisLimiter)
        self._limiter = limiter
        # Redis' TIME is this host's wall clock: this converts its slots to monotonic.
        self._wall_minus_monotonic = time.time() - time.monotonic()

    @property
    def round_trips(self) -> int:
        return self._limiter.round_trips

    @property
    def expired(self) -> int:
        return self._limiter.expired

    async def acquire(self) -> tuple[object, float, float]:
        ticket = await self._limiter.acquire()  # the ticket says what wait was scheduled
        return ticket, ticket.wait_us / 1e6, ticket.slot_us / 1e6 - self._wall_minus_monotonic

    async def record(self, ticket: object, outcome: Outcome, retry_after: float | None) -> None:
        await self._limiter.record(ticket, outcome, retry_after=retry_after)

    async def warm_up(self, senders: int) -> None:
        # Open every connection the senders will use (the pool's, less the pause
        # listener's) and load the scripts, without taking a slot: a cold pool
        # opens them at the common start, all processes at once, and the first
        # grants come back after their slots (sent late, bunched: +40 in the
        # first second at 500/s x 8 before this warmed only 8).
        connections = min(senders, self._limiter.config.max_connections - 1)
        await asyncio.gather(*(self._limiter.connect() for _ in range(connections)))

    async def aclose(self) -> None:
        await self._limiter.aclose()


class _Limits:
    """The ``limits`` moving window: hit, or read the window and sleep to its reset."""

    def __init__(self, url: str, key: str, rate: float) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self._storage = RedisStorage("async+" + url, implementation="redispy")
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._item = RateLimitItemPerSecond(round(rate), 1)
        self._key = key
        self.round_trips = 0

    async def acquire(self) -> tuple[object, float, float]:
        while True:
            self.round_trips += 1
            asked = time.monotonic()  # the hit is stamped with the host's clock about now
            if await self._limiter.hit(self._item, self._key):
                return None, math.nan, asked
            self.round_trips += 1
            stats = await self._limiter.get_window_stats(self._item, self._key)
            await asyncio.sleep(max(stats.reset_time - time.time(), 0.001))

    async def record(self, ticket: object, outcome: Outcome, retry_after: float | None) -> None:
        pass  # no shared pause: a 429 is the sender's own business

    async def warm_up(self, senders: int) -> None:
        await asyncio.gather(*(self._storage.check() for _ in range(senders)))


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> None:
    async with session.post(url, data=body, headers=headers) as response:
        await response.read()


async def _loop_stalls(end: float, tick_s: float = 0.01) -> float:
    """The longest this loop was late for a ``tick_s`` timer until ``end`` (seconds)."""
    longest = 0.0
    while (before := time.monotonic()) < end:
        await asyncio.sleep(tick_s)
        longest = max(longest, time.monotonic() - before - tick_s)
    return longest


def _worker_limiter(spec: dict[str, Any]) -> Any:
    """The limiter a worker process uses for its contender."""
    contender, rate, burst = spec["contender"], spec["rate"], spec["burst"]
    if contender == "shared":
        return _Shared(spec["redis_url"], spec["key"], rate, burst)
    if contender == "limits moving window":
        return _Limits(spec["redis_url"], spec["key"], rate)
    return _LocalGcra(rate / spec["processes"], burst)


async def _common_start(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    senders: int,
    limiter: Any,
) -> float:
    """Warm up, say ready, and sleep until the start the parent gives every process."""
    # Every sender's connection to the server and to Redis is opened first (their
    # arrivals precede the start and are not counted).
    await asyncio.gather(*(_post(session, url, body, headers) for _ in range(senders)))
    await limiter.warm_up(senders)
    print("ready", flush=True)
    start = float(await asyncio.to_thread(sys.stdin.readline))
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    return start


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process of a shared-limit run: its senders, and what each send saw."""
    rate = spec["rate"]
    limiter = _worker_limiter(spec)
    url = spec["base_url"] + "/prod-api/nebula/v4/api/img2imgSubmit"
    headers = {"Authorization": "Bearer mock-token", "Content-Type": "application/json"}
    body = json.dumps(_PAYLOAD).encode()
    sends: list[float] = []
    slots: list[float] = []
    added: list[float] = []
    refusals: list[float] = []
    senders = max(_MIN_SENDERS, math.ceil(rate * _IN_FLIGHT_S / spec["processes"]))
    # Acquires that returned after the end (their slots are dropped, not sent).
    dropped = 0
    connector = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = await _common_start(session, url, body, headers, senders, limiter)
        end = start + spec["duration_s"]
        stalls = asyncio.get_running_loop().create_task(_loop_stalls(end))

        async def sender() -> None:
            nonlocal dropped
            while time.monotonic() < end:
                asked = time.monotonic()
                ticket, due, slot = await limiter.acquire()
                sent = time.monotonic()
                if sent >= end:
                    dropped += 1
                    break
                if not math.isnan(due):
                    added.append(sent - asked - max(due, 0.0))
                sends.append(sent)
                slots.append(slot)
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
                if status == 429:
                    refusals.append(time.monotonic())
                    pause = float(retry_after) if retry_after else None
                    await limiter.record(ticket, Outcome.REFUSED, pause)
                else:
                    await limiter.record(ticket, Outcome.ACCEPTED, None)

        await asyncio.gather(*(sender() for _ in range(senders)))
        loop_stall = await stalls
    if hasattr(limiter, "aclose"):
        await limiter.aclose()
    return {
        "start": start,
        "sends": sends,
        "slots": slots,
        "added": added,
        "refusals": refusals,
        "round_trips": limiter.round_trips,
        "acquires": len(sends) + dropped,
        "loop_stall": loop_stall,
        "expired": getattr(limiter, "expired", 0),
    }


# -- the parent ----------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _run_cell(
    specs: list[dict[str, Any]], cap_s: float, stall: tuple[float, float] | None = None
) -> list[dict[str, Any]]:
    """Run one worker per spec; all start together once every one has warmed up.

    ``stall`` (``at_s``, ``for_s``): stop the first worker (SIGSTOP) ``at_s`` after
    the start for ``for_s``, as a host that deschedules it would.
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.shared", "--worker", json.dumps(spec)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for spec in specs
    ]
    outputs = []
    try:
        for child in children:
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], cap_s)
            if not ready or child.stdout.readline().strip() != "ready":
                raise RuntimeError("shared benchmark worker did not get ready")
        start = time.monotonic() + 0.2
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"{start!r}\n")
            child.stdin.flush()
        if stall is not None:
            _stop_for(children[0].pid, start + stall[0], stall[1])
        for child in children:
            out, _ = child.communicate(timeout=cap_s)
            if child.returncode != 0:
                raise RuntimeError(f"shared benchmark worker failed ({child.returncode})")
            outputs.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return outputs


def _stop_for(pid: int, at: float, for_s: float) -> None:
    """In a thread: SIGSTOP ``pid`` at monotonic ``at``, SIGCONT ``for_s`` later."""

    def stall() -> None:
        time.sleep(max(0.0, at - time.monotonic()))
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(for_s)
        finally:
            os.kill(pid, signal.SIGCONT)

    threading.Thread(target=stall, daemon=True).start()


def _specs(
    contender: str, processes: int, rate: float, base_url: str, redis_url: str, duration_s: float
) -> list[dict[str, Any]]:
    key = f"bench-{contender}-{processes}-{rate:g}-{time.monotonic_ns()}".replace(" ", "_")
    common = {
        "contender": contender,
        "processes": processes,
        "rate": rate,
        "burst": 1,
        "base_url": base_url,
        "redis_url": redis_url,
        "key": key,
        "duration_s": duration_s,
    }
    return [dict(common, index=i) for i in range(processes)]


def _steady_rate(sends: Sequence[float], start: float, end: float) -> float:
    """Sends per second in ``[start + 1 s, end)``: the fixed window after the start-up
    burst, the same for every contender (a limiter that bursts at window edges is
    not flattered by where its first and last sends fall)."""
    begin = start + 1.0
    if end <= begin:
        return math.nan
    return sum(1 for t in sends if begin <= t < end) / (end - begin)


def _measure(
    contender: str,
    processes: int,
    rate: float,
    outputs: list[dict[str, Any]],
    spec: dict[str, Any],
    arrivals: list[float],
) -> SharedResult:
    start = outputs[0]["start"]
    sends = sorted(t for out in outputs for t in out["sends"])
    slots = sorted(t for out in outputs for t in out["slots"])
    late = [t - s for out in outputs for s, t in zip(out["slots"], out["sends"], strict=True)]
    arrived = sorted(t for t in arrivals if t >= start)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    added = [a for out in outputs for a in out["added"]]
    round_trips = sum(out["round_trips"] for out in outputs)
    acquires = sum(out["acquires"] for out in outputs)
    return SharedResult(
        contender=contender,
        processes=processes,
        rate=rate,
        burst=1,
        requests=len(sends),
        long_run_rate=_steady_rate(sends, start, start + spec["duration_s"]),
        busiest_slots=busiest_window(slots),
        busiest_window=busiest_window(sends),
        busiest_arrivals=busiest_window(arrived),
        late_p99_ms=_percentile(late, 0.99) * 1e3,
        longest_gap_ms=max(gaps, default=math.nan) * 1e3,
        loop_stall_ms=max(out["loop_stall"] for out in outputs) * 1e3,
        expired=sum(out["expired"] for out in outputs),
        round_trips_per_request=round_trips / acquires if acquires else math.nan,
        added_p50_ms=_percentile(added, 0.5) * 1e3,
        added_p99_ms=_percentile(added, 0.99) * 1e3,
        refused=sum(len(out["refusals"]) for out in outputs),
    )


def _pause_server(ready: threading.Event, stop: threading.Event, box: dict[str, str]) -> None:
    """A full MockNebulaServer in a thread, answering request ``_PAUSE_AT`` 429 once."""
    from nebula_async.testing import MockNebulaServer

    async def serve() -> None:
        script = [None] * (_PAUSE_AT - 1) + ["http_429"]
        async with MockNebulaServer(
            latency=_LATENCY_S, fault_script=iter(script), retry_after=_RETRY_AFTER_S
        ) as server:
            box["url"] = server.base_url
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    asyncio.run(serve())


def _run_pause(contender: str, redis_url: str, duration_s: float, cap_s: float) -> PauseResult:
    ready, stop = threading.Event(), threading.Event()
    box: dict[str, Any] = {}
    thread = threading.Thread(target=_pause_server, args=(ready, stop, box), daemon=True)
    thread.start()
    try:
        if not ready.wait(20):
            raise RuntimeError("pause-cell mock server did not start")
        specs = _specs(contender, _PAUSE_PROCESSES, _PAUSE_RATE, box["url"], redis_url, duration_s)
        outputs = _run_cell(specs, cap_s)
    finally:
        stop.set()
        thread.join(10)
    refusals = sorted(t for out in outputs for t in out["refusals"])
    if not refusals:
        raise RuntimeError("pause cell: the server's 429 never came")
    t429 = refusals[0]
    resume = t429 + _RETRY_AFTER_S
    in_pause = [t for out in outputs for t in out["sends"] if t429 < t < resume - 0.05]
    after = [t for out in outputs for t in out["sends"] if t >= resume - 0.05]
    return PauseResult(
        contender=contender,
        processes=_PAUSE_PROCESSES,
        rate=_PAUSE_RATE,
        retry_after_s=_RETRY_AFTER_S,
        stop_after_429_ms=(max(in_pause) - t429) * 1e3 if in_pause else 0.0,
        sends_in_pause=len(in_pause),
        first_send_after_pause_s=(min(after) - t429) if after else math.nan,
    )


def run_shared(
    *,
    redis_url: str,
    rates: Sequence[float] = (50.0, 500.0),
    processes: Sequence[int] = (1, 2, 4, 8),
    duration_s: float = 5.0,
    log: Callable[[str], None],
) -> tuple[list[SharedResult], list[PauseResult]]:
    """Every contender at every rate and process count, then the pause cell."""
    results: list[SharedResult] = []
    cap_s = duration_s + 60.0
    with ArrivalServer(_LATENCY_S) as server:
        for rate in rates:
            for count in processes:
                for contender in CONTENDERS:
                    specs = _specs(contender, count, rate, server.base_url, redis_url, duration_s)
                    server.take()  # forget what came before (the last cell's stragglers)
                    outputs = _run_cell(specs, cap_s)
                    arrivals = server.take()
                    result = _measure(contender, count, rate, outputs, specs[0], arrivals)
                    results.append(result)
                    log(_summary_line(result))
    pauses = []
    for contender in ("shared", "per-process R/N"):
        pause = _run_pause(contender, redis_url, 4.5, cap_s)
        pauses.append(pause)
        log(
            f"[shared] pause {contender:<16} stop {pause.stop_after_429_ms:7.1f} ms after the 429, "
            f"{pause.sends_in_pause} sends in the pause"
        )
    return results, pauses


def run_stalls(
    *, redis_url: str, duration_s: float, log: Callable[[str], None]
) -> list[StallResult]:
    """4 processes at 500/s, the first stopped for 0.7 s 2 s in: shared, per-process."""
    stalls = []
    cap_s = duration_s + 60.0
    with ArrivalServer(_LATENCY_S) as server:
        for contender in ("shared", "per-process R/N"):
            specs = _specs(
                contender, _STALL_PROCESSES, _STALL_RATE, server.base_url, redis_url, duration_s
            )
            server.take()
            outputs = _run_cell(specs, cap_s, stall=(_STALL_AT_S, _STALL_S))
            cell = _measure(
                contender, _STALL_PROCESSES, _STALL_RATE, outputs, specs[0], server.take()
            )
            stall = StallResult(
                contender=contender,
                processes=_STALL_PROCESSES,
                rate=_STALL_RATE,
                stall_s=_STALL_S,
                busiest_window=cell.busiest_window,
                busiest_arrivals=cell.busiest_arrivals,
                long_run_rate=cell.long_run_rate,
                expired=cell.expired,
            )
            stalls.append(stall)
            log(f"[shared] stall {_summary_line(cell)[9:]}")
    return stalls


def _summary_line(r: SharedResult) -> str:
    return (
        f"[shared] {r.rate:>4g}/s x{r.processes} {r.contender:<21} "
        f"rate {r.long_run_error:+7.2%}  busiest slots/sends/arrivals "
        f"{r.busiest_slots}/{r.busiest_window}/{r.busiest_arrivals}  "
        f"late p99 {r.late_p99_ms:6.2f} ms  longest gap {r.longest_gap_ms:6.1f} ms  "
        f"loop stall {r.loop_stall_ms:6.1f} ms  lapsed {r.expired}  "
        f"trips/req {r.round_trips_per_request:5.2f}  "
        f"added p50 {r.added_p50_ms:6.2f} ms p99 {r.added_p99_ms:6.2f} ms"
    )


def _cell(value: float, fmt: str) -> str:
    return "n/a" if math.isnan(value) else format(value, fmt)


def render(
    results: Sequence[SharedResult],
    pauses: Sequence[PauseResult],
    stalls: Sequence[StallResult] = (),
) -> str:
    """The tables, in Markdown."""
    lines = [
        "| rate | procs | limiter | requests | long-run rate error "
        "| busiest 1 s: slots / sends / arrivals (bound) | sends late p99 (ms) "
        "| Redis round trips / request | added latency p50 / p99 (ms) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.rate:g}/s | {r.processes} | {r.contender} | {r.requests} "
            f"| {r.long_run_error:+.2%} "
            f"| {r.busiest_slots} / {r.busiest_window} / {r.busiest_arrivals} "
            f"({r.rate + r.burst:g}) | {_cell(r.late_p99_ms, '.1f')} "
            f"| {r.round_trips_per_request:.2f} "
            f"| {_cell(r.added_p50_ms, '.2f')} / {_cell(r.added_p99_ms, '.2f')} |"
        )
    lines += [
        "",
        "| limiter | procs | rate | Retry-After | last send after the 429 | sends in the pause "
        "| first send after the 429 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pauses:
        lines.append(
            f"| {p.contender} | {p.processes} | {p.rate:g}/s | {p.retry_after_s:g} s "
            f"| {p.stop_after_429_ms:.1f} ms | {p.sends_in_pause} "
            f"| {_cell(p.first_send_after_pause_s, '.2f')} s |"
        )
    if stalls:
        lines += ["", *_render_stalls(stalls)]
    return "\n".join(lines)


def _render_stalls(stalls: Sequence[StallResult]) -> list[str]:
    lines = [
        "| limiter | procs | rate | one worker stopped | busiest 1 s: sends / arrivals (bound) "
        "| long-run rate error | slots lapsed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in stalls:
        lines.append(
            f"| {t.contender} | {t.processes} | {t.rate:g}/s | {t.stall_s:g} s "
            f"| {t.busiest_window} / {t.busiest_arrivals} ({t.rate + 1:g}) "
            f"| {t.long_run_error:+.2%} | {t.expired} |"
        )
    return lines


def run_part(*, duration_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The ``shared`` part of ``python -m benchmarks``: starts its own redis-server.

    Returns ``{"cells": [...], "pauses": [...], "stalls": [...], "markdown": "..."}``
    for the run's record.
    """
    sys.path.insert(0, str(ROOT))
    from tests.redis_server import RedisServer, require_redis_server

    with RedisServer(require_redis_server()) as redis_server:
        results, pauses = run_shared(redis_url=redis_server.url, duration_s=duration_s, log=log)
        stalls = run_stalls(redis_url=redis_server.url, duration_s=duration_s, log=log)
    return {
        "cells": [attrs.asdict(r) | {"long_run_error": r.long_run_error} for r in results],
        "pauses": [attrs.asdict(p) for p in pauses],
        "stalls": [attrs.asdict(t) | {"long_run_error": t.long_run_error} for t in stalls],
        "markdown": render(results, pauses, stalls),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.shared`` (standalone) or a worker (``--worker SPEC``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="3 s per cell instead of 5 s")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(asyncio.run(_worker(json.loads(args.worker)))))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    print(run_part(duration_s=3.0 if args.quick else 5.0, log=log)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
