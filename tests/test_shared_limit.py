"""SharedRateLimit against a real redis-server on 127.0.0.1 (no Redis mocks).

Conformance is checked on the slots' Redis times (the schedule's guarantee: no
one-second window over ``rate + burst``) and the long-run rate on the moments
acquire() returned, across tasks and across processes.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio
from redis_server import RedisServer, free_port, require_redis_server

import nebula_async as na
from benchmarks._stats import busiest_window, long_run_rate
from nebula_async._limiter import Limiter, LimiterFactory, Outcome
from nebula_async._redis import RedisLimiter, Ticket
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(require_redis_server()) as server:
        yield server


@pytest.fixture
def key(request: pytest.FixtureRequest) -> str:
    """A key of its own for each test, so that tests sharing the server never meet."""
    return f"test-{request.node.name}-{time.monotonic_ns()}"


def _limiter(url: str, key: str, **options: object) -> RedisLimiter:
    options.setdefault("per_second", 50.0)
    limiter = na.SharedRateLimit(url, key=key, **options).create_limiter()  # type: ignore[arg-type]
    assert isinstance(limiter, RedisLimiter)
    return limiter


# -- configuration -------------------------------------------------------------------------------


def test_config_pickles_and_is_a_factory() -> None:
    limit = na.SharedRateLimit(
        "redis://:pw@cache:6379/0", key="acct", per_second=12.5, burst=4, adaptive=False
    )
    again = pickle.loads(pickle.dumps(limit))
    assert again == limit
    assert (again.per_second, again.burst, again.adaptive) == (12.5, 4, False)
    assert isinstance(limit, LimiterFactory)
    assert isinstance(limit.create_limiter(), Limiter)
    assert "SharedRateLimit" in na.__all__


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2-secret@cache:6379/0",
        "redis://admin:hunter2-secret@cache:6379/0",
        "rediss://admin:hunter2-secret@cache:6380/1?password=hunter2-secret",
        "redis://cache:6379/0?password=hunter2-secret",
    ],
)
def test_repr_never_shows_the_password(url: str) -> None:
    limit = na.SharedRateLimit(url, key="acct", per_second=1)
    assert "hunter2-secret" not in repr(limit)
    assert "hunter2-secret" not in repr(limit.create_limiter())
    assert "***" in repr(limit)
    assert "cache" in repr(limit)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"per_second": 0}, "per_second"),
        ({"per_second": float("inf")}, "per_second"),
        ({"per_second": 5, "burst": 0}, "burst"),
        ({"per_second": 5, "decrease_factor": 1.5}, "decrease_factor"),
        ({"per_second": 5, "key": ""}, "key"),
        ({"per_second": 5, "key": "a{b}"}, "key"),
        ({"per_second": 5, "rate": 3}, "rate"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    kwargs = {"key": "acct", **kwargs}
    with pytest.raises(na.ValidationError) as caught:
        na.SharedRateLimit("redis://127.0.0.1/0", **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_bad_url_is_refused_without_echoing_its_password() -> None:
    with pytest.raises(na.ValidationError, match="redis://") as caught:
        na.SharedRateLimit("http://user:hunter2-secret@cache/0", key="k", per_second=1)
    assert "hunter2-secret" not in str(caught.value)
    assert caught.value.field == "redis_url"


# -- the clock offset (pure logic: local receive times injected) ----------------------------------


def _offsets(limiter: RedisLimiter, replies: list[tuple[float, float]]) -> list[float]:
    """Feed (received, observed offset) pairs as the replies would; the offsets that follow."""
    seen = []
    for received, observed in replies:
        limiter._offset = limiter._next_offset(observed, received)
        limiter._offset_at = received
        seen.append(limiter._offset)
    return seen


def test_offset_is_the_quickest_reply_and_ignores_a_stall() -> None:
    limiter = _limiter("redis://127.0.0.1:1/0", "k")
    quick = [(0.0, 0.0020), (0.1, 0.0012), (0.2, 0.0030)]
    # A stall of 0.8 s: the replies read after it are far above; then quick ones again.
    stall = [(1.0, 0.8012), (1.0001, 0.8013), (1.05, 0.0014)]
    seen = _offsets(limiter, quick + stall)
    assert seen[:3] == pytest.approx([0.0020, 0.0012, 0.0012], abs=2e-4)  # + drift
    # Unchanged through the stall (it moved up to 0.8 s before, and slept that much late).
    assert seen[3:] == pytest.approx([0.0012, 0.0012, 0.0012], abs=2e-4)


def test_offset_follows_a_clock_step_once_it_lasts() -> None:
    limiter = _limiter("redis://127.0.0.1:1/0", "k")
    # Redis' clock steps back 2 s at t=1 (a failover): every reply is 2 s above from then on.
    replies = [(0.0, 0.001)] + [(1.0 + i / 10, 2.001 + (i % 3) / 1000) for i in range(8)]
    seen = _offsets(limiter, replies)
    assert max(seen[:6]) < 0.01  # 1.0 .. 1.4 s: could still be a stall
    assert seen[6] == pytest.approx(2.001, abs=1e-4)  # at 1.5 s: the least of the raised ones
    assert seen[7] == pytest.approx(2.001, abs=1e-4)


# -- one process, many tasks ---------------------------------------------------------------------


async def _take(limiter: RedisLimiter, count: int, out: list[tuple[float, int]]) -> None:
    for _ in range(count):
        ticket = await limiter.acquire()
        assert isinstance(ticket, Ticket)
        out.append((time.monotonic(), ticket.slot_us))


async def test_gcra_across_tasks_keeps_rate_and_window(redis_server: RedisServer, key: str) -> None:
    rate, burst = 100.0, 3
    limiter = _limiter(redis_server.url, key, per_second=rate, burst=burst)
    stamps: list[tuple[float, int]] = []
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(_take, limiter, 9, stamps)
    await limiter.aclose()
    slots = sorted(slot / 1e6 for _, slot in stamps)
    returned = sorted(t for t, _ in stamps)
    assert len(slots) == 180
    assert busiest_window(slots) <= rate + burst
    # The burst at once (as the calls arrive), then the next slot one interval after the first.
    assert slots[burst] - slots[0] >= 1 / rate - 1e-5
    assert long_run_rate(returned) == pytest.approx(rate, rel=0.02)
    stats = limiter.statistics()
    assert (stats.acquired, stats.current_rate, stats.paused_for_s) == (180, rate, 0)
    assert limiter.round_trips == 180  # one per acquire


# -- several processes ---------------------------------------------------------------------------

_CHILD = """
import asyncio, base64, json, pickle, sys, time
config = pickle.loads(base64.b64decode(sys.argv[1]))
count, tasks = int(sys.argv[2]), int(sys.argv[3])

async def main():
    limiter = config.create_limiter()
    out = []
    async def take():
        for _ in range(count // tasks):
            ticket = await limiter.acquire()
            out.append((time.monotonic(), ticket.slot_us))
    await asyncio.gather(*(take() for _ in range(tasks)))
    await limiter.aclose()
    print(json.dumps(out))

asyncio.run(main())
"""


def _spawn(config: na.SharedRateLimit, count: int, tasks: int) -> subprocess.Popen[str]:
    blob = base64.b64encode(pickle.dumps(config)).decode()
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, blob, str(count), str(tasks)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_gcra_across_processes_shares_one_rate(redis_server: RedisServer, key: str) -> None:
    rate, burst, processes, each = 80.0, 2, 3, 60
    config = na.SharedRateLimit(redis_server.url, key=key, per_second=rate, burst=burst)
    children = [_spawn(config, each, 4) for _ in range(processes)]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        results.append(json.loads(out))
    assert all(len(r) == each for r in results)
    slots = sorted(slot / 1e6 for r in results for _, slot in r)
    returned = sorted(t for r in results for t, _ in r)
    assert busiest_window(slots) <= rate + burst
    # Three processes at one shared 80/s, not 3 x 80/s: 180 slots take over two seconds.
    assert slots[-1] - slots[0] >= (len(slots) - burst) / rate - 0.01
    # The processes start at different moments; where all were running, the
    # aggregate rate is the target (measured when acquire returned).
    start = max(min(t for t, _ in r) for r in results)
    end = min(max(t for t, _ in r) for r in results)
    overlap = [t for t in returned if start <= t <= end]
    if end - start > 1.0:
        assert (len(overlap) - 1) / (overlap[-1] - overlap[0]) == pytest.approx(rate, rel=0.03)
    assert long_run_rate(returned) == pytest.approx(rate, rel=0.03)


# -- the shared pause and the shared rate --------------------------------------------------------


async def test_retry_after_pauses_another_instance(redis_server: RedisServer, key: str) -> None:
    first = _limiter(redis_server.url, key, per_second=100.0, burst=5)
    second = _limiter(redis_server.url, key, per_second=100.0, burst=5)
    try:
        ticket = await first.acquire()
        started = time.monotonic()
        await first.record(ticket, Outcome.REFUSED, retry_after=0.6)
        assert first.statistics().paused_for_s > 0.5
        await second.acquire()
        waited = time.monotonic() - started
        assert 0.55 <= waited < 1.2
        # No burst right after a pause: the next slots are spaced at the rate.
        took = time.monotonic()
        for _ in range(3):
            await second.acquire()
        assert time.monotonic() - took >= 3 / 100 - 0.005
        assert second.statistics().decreases == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_sleepers_holding_slots_inside_a_new_pause_wait_it_out(
    redis_server: RedisServer, key: str
) -> None:
    limiter = _limiter(redis_server.url, key, per_second=10.0, adaptive=False)
    returned: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        returned.append(time.monotonic())

    try:
        first = await limiter.acquire()
        async with anyio.create_task_group() as tg:
            for _ in range(4):  # slots at +0.1 .. +0.4 s
                tg.start_soon(one)
            await anyio.sleep(0.03)
            paused_at = time.monotonic()
            await limiter.record(first, Outcome.FAILED, retry_after=0.5)
    finally:
        await limiter.aclose()
    assert len(returned) == 4
    assert min(returned) >= paused_at + 0.5 - 0.01


async def test_a_sleeper_that_wakes_long_after_its_slot_takes_a_fresh_one(
    redis_server: RedisServer, key: str
) -> None:
    # The process stalls 0.5 s while 4 tasks sleep on slots at +0.1 .. +0.4 s: sent on
    # waking they would all go out at once; each lets its slot lapse and takes a
    # fresh one, spaced at the rate from then on.
    limiter = _limiter(redis_server.url, key, per_second=10.0, adaptive=False)
    tickets: list[Ticket] = []
    sent: list[float] = []

    async def one() -> None:
        tickets.append(await limiter.acquire())
        sent.append(time.monotonic())

    try:
        await limiter.acquire()
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
            await anyio.sleep(0.03)
            time.sleep(0.5)  # noqa: ASYNC251 - the stall: the event loop blocked
    finally:
        await limiter.aclose()
    sent.sort()
    assert min(b - a for a, b in itertools.pairwise(sent)) > 0.08  # not bunched
    slots = sorted(t.slot_us for t in tickets)
    assert min(b - a for a, b in itertools.pairwise(slots)) >= 99_000
    assert limiter.expired == 4
    assert limiter.round_trips == 1 + 4 + 4


async def _subscribed(url: str, limiter: RedisLimiter) -> None:
    """Wait until ``limiter`` listens for pause notices (it subscribes in the background)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        with anyio.fail_after(5):
            channel = f"{limiter.config.key_prefix}:pause-notices"
            while dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
                await anyio.sleep(0.01)
    finally:
        await client.aclose()


async def test_a_pause_reaches_another_instances_sleepers_at_once(
    redis_server: RedisServer, key: str
) -> None:
    """The sleepers of another process hold slots reserved before the pause; the
    pause notice (pub/sub) makes them re-reserve instead of sending inside it."""
    # 4/s: a quarter second between slots leaves room for the subscription on a
    # busy machine (at 10/s the first sleeper's slot could come before the pause).
    seen_by = _limiter(redis_server.url, key, per_second=4.0, adaptive=False)
    sleepers = _limiter(redis_server.url, key, per_second=4.0, adaptive=False)
    returned: list[float] = []

    async def one() -> None:
        await sleepers.acquire()
        returned.append(time.monotonic())

    try:
        ticket = await seen_by.acquire()  # slot 0
        await sleepers.acquire()  # slot +0.25 s
        await _subscribed(redis_server.url, sleepers)
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # slots about +0.5 .. +1.0 s
                tg.start_soon(one)
            await anyio.sleep(0.02)
            paused_at = time.monotonic()
            await seen_by.record(ticket, Outcome.REFUSED, retry_after=1.0)
    finally:
        await seen_by.aclose()
        await sleepers.aclose()
    assert len(returned) == 3
    assert min(returned) >= paused_at + 1.0 - 0.01
    assert sleepers.statistics().paused_for_s == 0  # over by now


async def test_refusals_cut_the_shared_rate_once_per_event(
    redis_server: RedisServer, key: str
) -> None:
    # A slow recovery (0.1/s), so a busy machine may take up to 1 s between the cut and
    # the reads below before the rate has moved by their tolerance.
    first = _limiter(redis_server.url, key, per_second=100.0, recovery_per_s=0.1)
    second = _limiter(redis_server.url, key, per_second=100.0, recovery_per_s=0.1)
    try:
        old = [await first.acquire() for _ in range(3)]
        await first.record(old[0], Outcome.REFUSED)
        assert first.statistics().current_rate == pytest.approx(50.0)
        # Sent before the cut: echoes of the same congestion event.
        await first.record(old[1], Outcome.REFUSED)
        await second.record(old[2], Outcome.REFUSED)
        assert second.statistics().decreases == 1
        # The other instance now runs at the cut rate too.
        await second.acquire()
        stats = second.statistics()
        assert stats.current_rate == pytest.approx(50.0, abs=0.1)
        assert stats.estimated_limit == pytest.approx(100.0)
        # A refusal of a request sent after the cut is a new event.
        fresh = await second.acquire()
        await second.record(fresh, Outcome.REFUSED)
        assert second.statistics().current_rate == pytest.approx(25.0, abs=0.1)
        assert second.statistics().decreases == 2
        # The spacing follows the shared rate (25/s: 40 ms).
        await first.acquire()
        took = time.monotonic()
        await first.acquire()
        await first.acquire()
        assert time.monotonic() - took >= 2 / 25 - 0.01
    finally:
        await first.aclose()
        await second.aclose()


async def test_rate_recovers_and_floor_holds(redis_server: RedisServer, key: str) -> None:
    limiter = _limiter(
        redis_server.url, key, per_second=100.0, recovery_per_s=200.0, min_per_second=40.0
    )
    try:
        await limiter.record(await limiter.acquire(), Outcome.REFUSED)
        await limiter.record(await limiter.acquire(), Outcome.REFUSED)
        assert limiter.statistics().current_rate == pytest.approx(40.0)  # floor, not 25
        await anyio.sleep(0.35)  # +200/s per second: back to 100 within 0.3 s
        await limiter.acquire()
        assert limiter.statistics().current_rate == 100.0
    finally:
        await limiter.aclose()


async def test_quiet_outcomes_make_no_round_trip(redis_server: RedisServer, key: str) -> None:
    limiter = _limiter(redis_server.url, key, adaptive=False)
    try:
        ticket = await limiter.acquire()
        for outcome in (Outcome.ACCEPTED, Outcome.FAILED, Outcome.UNUSED, Outcome.REFUSED):
            await limiter.record(ticket, outcome)
        assert limiter.round_trips == 1
        assert limiter.statistics().refused == 1
        assert limiter.statistics().decreases == 0
    finally:
        await limiter.aclose()


async def test_keys_expire_when_unused(redis_server: RedisServer, key: str) -> None:
    limiter = _limiter(redis_server.url, key, idle_ttl_s=5.0)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        ticket = await limiter.acquire()
        await limiter.record(ticket, Outcome.REFUSED, retry_after=2.0)
        prefix = limiter.config.key_prefix
        assert 0 < await client.pttl(f"{prefix}:gcra") <= 5_100
        assert 1_000 < await client.pttl(f"{prefix}:pause") <= 2_000
        # The rate key lives until the rate has recovered (5 s at 5/s per second), plus the TTL.
        assert 5_000 < await client.pttl(f"{prefix}:rate") <= 10_100
    finally:
        await client.aclose()
        await limiter.aclose()


# -- failures ------------------------------------------------------------------------------------


async def test_survives_a_redis_restart(key: str) -> None:
    with RedisServer(require_redis_server()) as server:
        limiter = _limiter(server.url, key, per_second=200.0)
        try:
            await limiter.acquire()
            server.restart()  # the script cache and the keys are gone, the connection broken
            await limiter.acquire()
            await limiter.acquire()
            client = redis.asyncio.Redis.from_url(server.url)
            await client.script_flush()  # NOSCRIPT again, on a live connection
            await client.aclose()
            await limiter.acquire()
            assert limiter.statistics().acquired == 4
        finally:
            await limiter.aclose()


async def test_unreachable_redis_is_a_clear_error() -> None:
    port = free_port()
    limiter = _limiter(f"redis://:hunter2-secret@127.0.0.1:{port}/0", "k", connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(na.APIConnectionError) as caught:
        await limiter.acquire()
    assert time.monotonic() - started < 5.0
    message = str(caught.value)
    assert message.startswith(
        f"shared rate limit: Redis at redis://:***@127.0.0.1:{port}/0 unreachable"
    )
    assert "hunter2-secret" not in message
    assert "hunter2-secret" not in repr(caught.value)
    assert caught.value.request_sent is False
    assert isinstance(caught.value, na.NebulaError)
    with pytest.raises(na.APIConnectionError):
        await limiter.record(Ticket(0), Outcome.REFUSED, retry_after=1.0)
    await limiter.aclose()


async def test_redis_gone_mid_run_is_an_error_not_unlimited(key: str) -> None:
    with RedisServer(require_redis_server()) as server:
        limiter = _limiter(server.url, key, connect_timeout_s=1.0)
        await limiter.acquire()
        server.stop()
        with pytest.raises(na.APIConnectionError, match="unreachable"):
            await limiter.acquire()
        await limiter.aclose()


async def test_wrong_password_is_an_error_without_the_password(key: str) -> None:
    with RedisServer(require_redis_server(), extra_args=("--requirepass", "right-one")) as server:
        url = f"redis://:wrong-hunter2@127.0.0.1:{server.port}/0"
        limiter = _limiter(url, key)
        with pytest.raises(na.APIConnectionError) as caught:
            await limiter.acquire()
        assert "wrong-hunter2" not in str(caught.value)
        await limiter.aclose()
        good = _limiter(f"redis://:right-one@127.0.0.1:{server.port}/0", key)
        await good.acquire()
        await good.aclose()


async def test_cancelled_acquire_leaves_the_limiter_usable(
    redis_server: RedisServer, key: str
) -> None:
    limiter = _limiter(redis_server.url, key, per_second=5.0)
    try:
        await limiter.acquire()
        with anyio.move_on_after(0.05) as scope:
            await limiter.acquire()  # due in 0.2 s: cancelled while sleeping
        assert scope.cancelled_caught
        await limiter.acquire()  # the cancelled slot stays spent: due at +0.4 s
        assert limiter.statistics().acquired == 2
    finally:
        await limiter.aclose()


async def test_closed_limiter_refuses_use(redis_server: RedisServer, key: str) -> None:
    limiter = _limiter(redis_server.url, key)
    await limiter.acquire()
    await limiter.aclose()
    assert limiter.statistics().acquired == 1  # statistics need no connection
    with pytest.raises(RuntimeError, match="closed"):
        await limiter.acquire()


# -- end to end: NebulaClient + MockNebulaServer -------------------------------------------------


def _jobs(count: int, prefix: str) -> list[na.Job]:
    return [
        na.Job(na.Img2ImgRequest(model="m", prompt="a fox"), id=f"{prefix}{i}")
        for i in range(count)
    ]


async def test_two_clients_share_one_limit_end_to_end(redis_server: RedisServer, key: str) -> None:
    """Two clients (two limiters, two pools: as two processes) at one shared 40/s: the
    server, limiting at 40/s itself, refuses nothing, and sees at most rate + burst a second."""
    rate = 40.0
    limit = na.SharedRateLimit(redis_server.url, key=key, per_second=rate, burst=2)
    async with MockNebulaServer(latency=0.01, rate_limit=rate, rate_limit_burst=4) as server:

        async def one(prefix: str) -> na.BatchReport:
            async with na.NebulaClient(
                token="mock-token", base_url=server.base_url, max_concurrency=8, rate_limit=limit
            ) as client:
                return await client.run_batch(_jobs(30, prefix))

        started = time.monotonic()
        reports: list[na.BatchReport] = []
        async with anyio.create_task_group() as tg:
            for prefix in ("a", "b"):
                tg.start_soon(_append, reports, one(prefix))
        elapsed = time.monotonic() - started
    assert [r.succeeded for r in reports] == [30, 30]
    assert sum(r.rate_limited for r in reports) == 0
    arrivals = sorted(record.received_at for record in server.requests)
    assert len(arrivals) == 60
    assert busiest_window(arrivals) <= rate + 2
    assert elapsed >= (60 - 2) / rate - 0.05  # one 40/s for both, not 40/s each


async def test_a_429_in_one_client_pauses_the_other(redis_server: RedisServer, key: str) -> None:
    limit = na.SharedRateLimit(redis_server.url, key=key, per_second=30.0, adaptive=False)
    script = [None] * 8 + ["http_429"]
    async with MockNebulaServer(latency=0.01, fault_script=iter(script), retry_after=1.0) as server:

        async def run(prefix: str) -> na.BatchReport:
            async with na.NebulaClient(
                token="mock-token", base_url=server.base_url, max_concurrency=4, rate_limit=limit
            ) as client:
                return await client.run_batch(_jobs(20, prefix))

        reports: list[na.BatchReport] = []
        async with anyio.create_task_group() as tg:
            for prefix in ("a", "b"):
                tg.start_soon(_append, reports, run(prefix))
    assert sum(r.succeeded for r in reports) == 40
    assert sum(r.rate_limited for r in reports) == 1
    refused = next(r for r in server.requests if r.status == 429)
    # The refusal reached its client after the server's latency; from then on
    # neither client sends until the Retry-After is over.
    heard = refused.received_at + 0.01
    inside = [r for r in server.requests if heard + 0.02 < r.received_at < heard + 0.95]
    assert inside == []
    assert any(r.received_at >= heard + 0.95 for r in server.requests)


async def _append(out: list[na.BatchReport], report: Awaitable[na.BatchReport]) -> None:
    out.append(await report)


async def test_redis_unreachable_fails_the_jobs_and_sends_nothing() -> None:
    limit = na.SharedRateLimit(
        f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0",
        key="k",
        per_second=10,
        connect_timeout_s=0.5,
    )
    async with MockNebulaServer() as server:
        async with na.NebulaClient(
            token="mock-token",
            base_url=server.base_url,
            rate_limit=limit,
            retry=na.RetryPolicy(max_attempts=1),
        ) as client:
            report = await client.run_batch(_jobs(3, "j"))
        assert server.request_count == 0  # never silently unlimited
    assert report.failed == 3
    for result in report.results:
        assert isinstance(result.error, na.APIConnectionError)
        assert "shared rate limit: Redis at redis://:***@127.0.0.1" in str(result.error)
        assert "hunter2-secret" not in str(result.error)
