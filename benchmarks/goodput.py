"""Goodput against a server whose rate limit the client is not told (issue 10).

Every contender runs the same jobs against its own :class:`MockNebulaServer`, all
configured alike (a limit of 20/s counted by ``rate_limit_algorithm``, answers
after 0.18-0.22 s), at the same time in one event loop: the servers share
nothing, so each contender meets the limit alone, and all meet the same machine
load. A job is one img2img request, repeated while it is refused, as each
contender's own rule says. Counts come from each server's record (attempts,
refusals, the admitted times), success and failure from the contender.

Contenders, each as a user would set it up:

- ``oracle``: raw aiohttp paced by an anchored GCRA at 0.97 of the limit, which
  it knows (and, when the limit changes, when and to what): the best that
  knowing the limit allows.
- ``aiolimiter``: ``AsyncLimiter(rate, 1)`` at the limit and at 1.5x; a refused
  request waits its ``Retry-After`` (if any) and goes again, up to 10 attempts.
- ``openai-python``: no shared limit, 32 at a time, each 429 repeated with its
  own backoff ``min(0.5 * 2**n, 8) * (1 - 0.25 * random())`` or its
  ``Retry-After``, ``max_retries=2`` (its defaults). It reads only HTTP
  statuses; here a body code 429 counts as a 429 too, as a user adapting it
  would have to.
- ``openai-cookbook``: ``api_request_parallel_processor.py``'s rule: sends paced
  at the configured rate (here the guess 3x too high), no concurrency cap, and
  after any rate-limit error every new send waits until 15 s after it, scaled to
  this limit's 1 s window as the cookbook's per-minute limits would have it
  (15 s / 60 s: 0.25 s); 5 attempts a job.
- ``nebula-async``: ``NebulaClient(max_concurrency=32)`` with the adaptive
  controller (``RateController``) in the in-process limiter, given a rate 3x too
  high or none (the client as users get it: its embedded limiter). The AIMD
  controller it replaced got 0.56-0.76x with 9-22% refused (docs/benchmarks.md).

Learning an unknown limit costs about a fixed number of refusals and seconds
(the round trip after the window first fills is refused; with ``Retry-After``
each refusal pauses every send for a second), so the shares shrink as runs
grow: ``python -m benchmarks.goodput 1200`` runs the same scenarios 3x longer.

Figures: goodput (jobs done per second, start to last job) against the oracle's;
the share of attempts refused; jobs failed (given up, or not done by the cap);
and, for a limit that changes, the seconds after each change until the admitted
rate settles (a 2 s span with at least 85% of the new limit admitted and at most
one refusal).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import aiohttp
import aiolimiter
import attrs
import orjson

import nebula_async as na
from nebula_async._limits import GcraSchedule
from nebula_async.testing import MockNebulaServer

from ._request import REQUEST, TOKEN
from ._server import ROOT

__all__ = [
    "SCENARIOS",
    "GoodputResult",
    "Scenario",
    "goodput_checks",
    "goodput_table",
    "run_goodput",
]

LIMIT: Final = 20.0
LATENCY: Final = (0.18, 0.22)
CONCURRENCY: Final = 32
ORACLE_FRACTION: Final = 0.97
#: The cookbook pauses 15 s after a rate-limit error for per-minute limits; here
#: the window is 1 s, so the pause is scaled by 1/60.
COOKBOOK_PAUSE_S: Final = 15.0 / 60.0
_BODY: Final = orjson.dumps(na.to_payload(REQUEST))
_HEADERS: Final = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@attrs.frozen
class Scenario:
    """One server set-up: its limit algorithm, how it refuses, whether the limit moves."""

    name: str
    algorithm: str = "sliding_window"
    style: str = "http"
    retry_after: float | None = None
    burst: int = 1
    #: (at_s, rate) changes after the start; () for a steady limit.
    schedule: tuple[tuple[float, float], ...] = ()
    #: Jobs (and time cap) relative to the steady scenarios.
    jobs_scale: float = 1.0

    def limit_at(self, t: float) -> float:
        rate = LIMIT
        for at, value in self.schedule:
            if t >= at:
                rate = value
        return rate

    def server(self) -> MockNebulaServer:
        return MockNebulaServer(
            latency=LATENCY,
            rate_limit=LIMIT,
            rate_limit_algorithm=self.algorithm,  # type: ignore[arg-type]
            rate_limit_burst=self.burst,
            rate_limit_style=self.style,  # type: ignore[arg-type]
            retry_after=self.retry_after,
            rate_limit_schedule=self.schedule or None,
            seed=1,
        )


SCENARIOS: Final = (
    Scenario("sliding window, HTTP 429 + Retry-After: 1", retry_after=1.0),
    Scenario("sliding window, HTTP 429"),
    Scenario("sliding window, body code 429", style="body"),
    Scenario("fixed window, HTTP 429", algorithm="fixed_window"),
    Scenario("token bucket (GCRA, burst 20), HTTP 429", algorithm="gcra", burst=20),
    # 10 s at 20/s, 10 s at 10/s, then 30/s: 200 + 100 jobs, and 20 s more at 30/s.
    Scenario(
        "sliding window 20 -> 10 -> 30/s, HTTP 429",
        schedule=((10.0, 10.0), (20.0, 30.0)),
        jobs_scale=2.25,
    ),
)


@attrs.define
class _Tally:
    """What a contender itself knows: jobs done and given up, and when it finished."""

    done: int = 0
    failed: int = 0
    finished_s: float = 0.0


@attrs.frozen
class GoodputResult:
    """One contender in one scenario."""

    scenario: str
    contender: str
    jobs: int
    done: int
    failed: int
    attempts: int
    refused: int
    finished_s: float
    goodput: float
    vs_oracle: float
    #: Seconds after each change of the limit until the admitted rate settled (inf: never).
    settled_s: tuple[float, ...]

    @property
    def refused_share(self) -> float:
        return self.refused / self.attempts if self.attempts else math.nan


# -- one attempt, the raw way --------------------------------------------------------------


async def _attempt(session: aiohttp.ClientSession, url: str) -> tuple[bool, float | None]:
    """Send the request once: (refused for the rate, its Retry-After)."""
    async with session.post(url, data=_BODY, headers=_HEADERS) as response:
        body = await response.read()
        if response.status == 429:
            header = response.headers.get("Retry-After")
            return True, float(header) if header else None
    return orjson.loads(body).get("code") == 429, None


async def _workers(count: int, jobs: int, work: Callable[[], Awaitable[None]]) -> None:
    """``count`` tasks sharing ``jobs`` calls of ``work``."""
    left = jobs

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await work()

    await asyncio.gather(*(worker() for _ in range(count)))


def _url(base_url: str) -> str:
    return f"{base_url}/prod-api/nebula/v4/api/img2imgSubmit"


# -- contenders ----------------------------------------------------------------------------


async def _oracle(base_url: str, scenario: Scenario, jobs: int, tally: _Tally) -> None:
    """Paced at 0.97 of the limit it knows, at most two slots reserved at a time: the
    next is reserved while the last sleeps, so late timers do not slow the schedule
    (reserved only when the last fired, each slot would start late by the timer's
    lateness: 4% slow measured on a busy machine)."""
    url = _url(base_url)
    started = time.monotonic()
    schedule = GcraSchedule(ORACLE_FRACTION * LIMIT)
    ahead = asyncio.Semaphore(2)

    async def slot() -> None:
        async with ahead:
            now = time.monotonic()
            rate = ORACLE_FRACTION * scenario.limit_at(now - started)
            if rate != schedule.rate:
                schedule.set_rate(rate, now)
            at = schedule.reserve(now)
            await asyncio.sleep(at - now)

    async with aiohttp.ClientSession() as session:

        async def job() -> None:
            for _ in range(50):
                await slot()
                refused, _retry_after = await _attempt(session, url)
                if not refused:
                    tally.done += 1
                    return
            tally.failed += 1

        await _workers(CONCURRENCY, jobs, job)


def _aiolimiter(rate: float) -> Callable[[str, Scenario, int, _Tally], Awaitable[None]]:
    async def run(base_url: str, scenario: Scenario, jobs: int, tally: _Tally) -> None:
        url = _url(base_url)
        limiter = aiolimiter.AsyncLimiter(rate, 1.0)
        async with aiohttp.ClientSession() as session:

            async def job() -> None:
                for _ in range(10):
                    async with limiter:
                        refused, retry_after = await _attempt(session, url)
                    if not refused:
                        tally.done += 1
                        return
                    if retry_after:
                        await asyncio.sleep(retry_after)
                tally.failed += 1

            await _workers(CONCURRENCY, jobs, job)

    return run


async def _openai(base_url: str, scenario: Scenario, jobs: int, tally: _Tally) -> None:
    """openai-python's retry loop: per request, no shared limit."""
    url = _url(base_url)
    rng = random.Random(7)
    async with aiohttp.ClientSession() as session:

        async def job() -> None:
            for retries in range(3):  # max_retries=2
                refused, retry_after = await _attempt(session, url)
                if not refused:
                    tally.done += 1
                    return
                if retries < 2:
                    backoff = min(0.5 * 2.0**retries, 8.0) * (1 - 0.25 * rng.random())
                    await asyncio.sleep(retry_after if retry_after else backoff)
            tally.failed += 1

        await _workers(CONCURRENCY, jobs, job)


async def _cookbook(base_url: str, scenario: Scenario, jobs: int, tally: _Tally) -> None:
    """api_request_parallel_processor: paced at its configured rate (3x here), no
    concurrency cap, a global pause after any rate-limit error, 5 attempts."""
    url = _url(base_url)
    rate = 3 * LIMIT
    queue: list[int] = [5] * jobs  # attempts left, per job waiting to be sent
    last_error = -math.inf
    pending: set[asyncio.Task[None]] = set()

    async def call(session: aiohttp.ClientSession, attempts_left: int) -> None:
        nonlocal last_error
        refused, _retry_after = await _attempt(session, url)
        if not refused:
            tally.done += 1
        elif attempts_left > 1:
            last_error = time.monotonic()
            queue.append(attempts_left - 1)
        else:
            last_error = time.monotonic()
            tally.failed += 1

    async with aiohttp.ClientSession() as session:
        # It starts with a full minute's capacity: here, a full window's.
        capacity, updated = rate, time.monotonic()
        try:
            while queue or pending:
                now = time.monotonic()
                capacity = min(capacity + (now - updated) * rate, rate)
                updated = now
                pause = last_error + COOKBOOK_PAUSE_S - now
                if pause > 0:
                    await asyncio.sleep(pause)
                elif capacity >= 1 and queue:
                    capacity -= 1
                    task = asyncio.create_task(call(session, queue.pop()))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                else:
                    await asyncio.sleep(0.001)  # the cookbook's loop sleeps 1 ms too
        finally:
            for task in list(pending):
                task.cancel()


def _nebula(
    rate_limit: float | None,
) -> Callable[[str, Scenario, int, _Tally], Awaitable[None]]:
    async def run(base_url: str, scenario: Scenario, jobs: int, tally: _Tally) -> None:
        async with na.NebulaClient(
            token=TOKEN,
            base_url=base_url,
            max_concurrency=CONCURRENCY,
            rate_limit=rate_limit,
        ) as client:
            async for result in client.stream(REQUEST for _ in range(jobs)):
                if result.ok:
                    tally.done += 1
                else:
                    tally.failed += 1

    return run


Contender = Callable[[str, Scenario, int, _Tally], Awaitable[None]]


def contenders() -> dict[str, Contender]:
    """Fresh contenders; ours is the client as users get it (its embedded limiter)."""
    return {
        "oracle (raw aiohttp at 0.97x the known limit)": _oracle,
        "aiolimiter at the limit": _aiolimiter(LIMIT),
        "aiolimiter at 1.5x": _aiolimiter(1.5 * LIMIT),
        "openai-python retries, 32 at a time": _openai,
        "openai-cookbook, 3x, pause 0.25 s": _cookbook,
        "ours, rate_limit=60 (3x)": _nebula(3 * LIMIT),
        "ours, no rate_limit": _nebula(None),
    }


ORACLE: Final = "oracle (raw aiohttp at 0.97x the known limit)"


# -- measuring -----------------------------------------------------------------------------


def _settled(
    admitted: Sequence[float], refused: Sequence[float], scenario: Scenario
) -> tuple[float, ...]:
    """Seconds after each change until a 2 s span admits >= 85% of the new limit
    with at most one refusal (inf: not within the phase)."""
    out = []
    changes = [at for at, _ in scenario.schedule] + [math.inf]
    for (at, rate), end in zip(scenario.schedule, changes[1:], strict=True):
        found = math.inf
        t = at
        while t + 2.0 <= min(end, at + 30.0):
            took = sum(t <= x < t + 2.0 for x in admitted)
            lost = sum(t <= x < t + 2.0 for x in refused)
            if took >= 0.85 * rate * 2.0 and lost <= 1:
                found = t - at
                break
            t += 0.1
        out.append(found)
    return tuple(out)


@attrs.frozen
class _Run:
    """One contender's run, as its child process reports it."""

    done: int
    failed: int
    finished_s: float
    #: Arrival times (since the server's start) of the admitted and refused requests.
    admitted: list[float]
    refused: list[float]


async def _one(name: str, scenario: Scenario, jobs: int, cap_s: float) -> _Run:
    """Run contender ``name`` against a fresh server, in this process."""
    contender = contenders()[name]
    tally = _Tally()
    async with scenario.server() as server:
        started = time.monotonic()

        async def timed() -> None:
            await contender(server.base_url, scenario, jobs, tally)
            tally.finished_s = time.monotonic() - started

        try:
            await asyncio.wait_for(timed(), cap_s)
        except TimeoutError:
            tally.finished_s = cap_s
        origin = server.started_at or started
        return _Run(
            done=tally.done,
            failed=jobs - tally.done,
            finished_s=tally.finished_s,
            admitted=[r.received_at - origin for r in server.requests if not r.rate_limited],
            refused=[r.received_at - origin for r in server.requests if r.rate_limited],
        )


async def _child(name: str, scenario: int, jobs: int, cap_s: float) -> _Run:
    """The same run in a child process of its own: a contender and its server share
    an event loop, and nine of them sharing one would bunch each other's arrivals
    (the oracle saw 2-3% refused that way, none alone)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.goodput", "--one", str(scenario), name,
        str(jobs), str(cap_s),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"goodput child for {name!r} exited with {process.returncode}")
    return _Run(**orjson.loads(out))


def _result(scenario: Scenario, name: str, run: _Run, jobs: int, oracle: float) -> GoodputResult:
    goodput = run.done / run.finished_s if run.finished_s > 0 else 0.0
    return GoodputResult(
        scenario=scenario.name,
        contender=name,
        jobs=jobs,
        done=run.done,
        failed=run.failed,
        attempts=len(run.admitted) + len(run.refused),
        refused=len(run.refused),
        finished_s=run.finished_s,
        goodput=goodput,
        vs_oracle=goodput / oracle,
        settled_s=_settled(run.admitted, run.refused, scenario),
    )


async def _scenario(index: int, jobs: int, cap_s: float) -> list[GoodputResult]:
    names = list(contenders())
    runs = await asyncio.gather(*(_child(name, index, jobs, cap_s) for name in names))
    oracle = runs[names.index(ORACLE)]
    oracle_goodput = oracle.done / oracle.finished_s
    scenario = SCENARIOS[index]
    return [
        _result(scenario, name, run, jobs, oracle_goodput)
        for name, run in zip(names, runs, strict=True)
    ]


def run_goodput(*, jobs: int, cap_s: float, log: Callable[[str], None]) -> list[GoodputResult]:
    """Every contender in every scenario, ``jobs`` each (``jobs_scale`` times as many
    for a limit that changes), each contender in a process of its own, all at once."""
    results: list[GoodputResult] = []
    for index, scenario in enumerate(SCENARIOS):
        count = round(jobs * scenario.jobs_scale)
        log(f"[goodput] {scenario.name}: {count} jobs, {len(contenders())} contenders at once")
        found = asyncio.run(_scenario(index, count, cap_s * scenario.jobs_scale))
        for r in found:
            log(
                f"[goodput]   {r.contender}: {r.vs_oracle:.2f}x, refused {r.refused_share:.1%}, "
                f"failed {r.failed}, {r.finished_s:.1f} s"
            )
        results += found
    return results


def goodput_table(results: Sequence[GoodputResult]) -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) for the report."""
    rows = []
    for r in results:
        settled = ", ".join("-" if math.isinf(s) else f"{s:.1f}" for s in r.settled_s)
        rows.append(
            [
                r.scenario,
                r.contender,
                f"{r.vs_oracle:.2f}x",
                f"{r.refused_share:.1%}",
                str(r.failed),
                f"{r.finished_s:.1f}",
                settled or "",
            ]
        )
    title = (
        f"Goodput against an unknown limit of {LIMIT:g}/s ({CONCURRENCY} at a time, "
        f"answers after {LATENCY[0]}-{LATENCY[1]} s); goodput vs the oracle's, attempts "
        "refused, jobs failed, seconds to settle after each change of the limit"
    )
    header = ["server", "contender", "goodput", "refused", "failed", "time (s)", "settled (s)"]
    return title, header, rows


#: The contenders issue 10's goal is checked on.
OURS: Final = ("ours, rate_limit=60 (3x)", "ours, no rate_limit")


def goodput_checks(
    results: Sequence[GoodputResult],
) -> list[tuple[str, str, str, bool | None]]:
    """Issue 10's goal per scenario for ours: (name, measured, target, passed)."""
    found: list[tuple[str, str, str, bool | None]] = []
    for r in results:
        if r.contender not in OURS:
            continue
        passed = r.vs_oracle >= 0.97 and r.refused_share <= 0.01 and r.failed == 0
        found.append(
            (
                f"goodput, {r.contender}: {r.scenario}",
                f"{r.vs_oracle:.2f}x, {r.refused_share:.1%} refused, {r.failed} failed",
                ">= 0.97x, <= 1%, 0 failed",
                passed,
            )
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.goodput [JOBS]``: this part alone, printed; with
    ``--one SCENARIO NAME JOBS CAP_S``, one contender's run as JSON (a child)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--one":
        index, name, jobs, cap_s = int(args[1]), args[2], int(args[3]), float(args[4])
        run = asyncio.run(_one(name, SCENARIOS[index], jobs, cap_s))
        sys.stdout.buffer.write(orjson.dumps(attrs.asdict(run)))
        return 0
    jobs = int(args[0]) if args else 400
    # The cap grows with the run: 400 jobs at 20/s take 21 s, 1,200 take 62 s.
    cap_s = 60.0 * max(1.0, jobs / 400)
    results = run_goodput(jobs=jobs, cap_s=cap_s, log=lambda m: print(m, file=sys.stderr))
    title, header, rows = goodput_table(results)
    print(title)
    for row in [header, *rows]:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
