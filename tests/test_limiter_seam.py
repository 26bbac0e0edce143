"""The limiter seam (issue 12): a second ``Limiter`` plugs in through the public constructor.

A test double that counts ``acquire`` and ``record`` calls and the outcomes it is
told goes in as ``NebulaClient(rate_limit=double)``, and as a ``LimiterFactory``;
against :class:`MockNebulaServer` answering 429s (with and without Retry-After),
5xx, dropped connections and malformed bodies, it must see one acquire per HTTP
attempt, one record per acquire, and the outcome each answer deserves.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import nebula_async as na
from nebula_async import Limiter, LimiterFactory, LimiterStatistics, Outcome
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio

MODEL = "doubao-seedream-4-0-250828"
PATIENT = na.RetryPolicy(max_attempts=10, backoff_base=0.005, backoff_max=0.02)


def request(prompt: str = "a fox") -> na.Img2ImgRequest:
    return na.Img2ImgRequest(model=MODEL, prompt=prompt, image="https://example.com/a.png")


class CountingLimiter:
    """A :class:`Limiter` that never waits and records everything it is told."""

    def __init__(self) -> None:
        self.acquired = 0
        self.records: list[tuple[object, Outcome, float | None]] = []
        self.closed = 0
        self._tickets = itertools.count()

    async def acquire(self) -> object:
        self.acquired += 1
        await anyio.lowlevel.checkpoint()
        return ("ticket", next(self._tickets))

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        self.records.append((ticket, outcome, retry_after))

    def statistics(self) -> LimiterStatistics:
        refused = sum(1 for _, outcome, _ in self.records if outcome is Outcome.REFUSED)
        return LimiterStatistics(
            current_rate=7.0, estimated_limit=9.5, acquired=self.acquired, refused=refused
        )

    async def aclose(self) -> None:
        self.closed += 1

    def outcomes(self) -> list[tuple[Outcome, float | None]]:
        return [(outcome, retry_after) for _, outcome, retry_after in self.records]

    def assert_one_record_per_acquire(self) -> None:
        tickets = Counter(ticket for ticket, _, _ in self.records)
        assert len(tickets) == self.acquired
        assert set(tickets.values()) == {1}


class Factory:
    """A :class:`LimiterFactory`: plain configuration that makes its limiter when asked."""

    def __init__(self) -> None:
        self.made: list[CountingLimiter] = []

    def create_limiter(self) -> Limiter:
        limiter = CountingLimiter()
        self.made.append(limiter)
        return limiter


def client_for(server: MockNebulaServer, rate_limit: Any, **options: Any) -> na.NebulaClient:
    options.setdefault("retry", PATIENT)
    options.setdefault("timeout", 5.0)
    return na.NebulaClient(
        token="mock-token", base_url=server.base_url, rate_limit=rate_limit, **options
    )


def test_the_doubles_satisfy_the_protocols() -> None:
    assert isinstance(CountingLimiter(), Limiter)
    assert isinstance(Factory(), LimiterFactory)
    assert not isinstance(Factory(), Limiter)


async def test_a_limiter_instance_sees_each_attempt_and_its_outcome() -> None:
    script = ["http_429", "body_429", "http_503", "body_500", "drop", "malformed", None]
    double = CountingLimiter()
    async with MockNebulaServer(fault_script=script, retry_after=0.05) as server:
        async with client_for(server, double, max_concurrency=1) as client:
            result = await client.img2img(request())
            stats = client.statistics()
    assert result.urls
    assert double.acquired == server.request_count == len(script)
    double.assert_one_record_per_acquire()
    assert double.outcomes() == [
        (Outcome.REFUSED, 0.05),  # HTTP 429 with Retry-After: 0.05
        (Outcome.REFUSED, None),  # body code 429 under HTTP 200: no header
        (Outcome.FAILED, None),  # 503: says nothing about the rate
        (Outcome.FAILED, None),  # body code 500
        (Outcome.FAILED, None),  # connection dropped, nothing came back
        (Outcome.FAILED, None),  # half a body
        (Outcome.ACCEPTED, None),
    ]
    # The client's statistics read the limiter it was given.
    assert (stats.current_rate, stats.estimated_limit) == (7.0, 9.5)
    assert stats.attempts == len(script)
    assert double.closed == 0  # an instance is its owner's to close


async def test_refusals_that_are_not_for_the_rate_are_accepted_answers() -> None:
    # A bad request and a forbidden one were taken by the service: no rate signal.
    double = CountingLimiter()
    async with MockNebulaServer(fault_script=["body_400", "http_400", "body_403"]) as server:
        async with client_for(server, double, max_concurrency=1) as client:
            report = await client.run_batch([request("a"), request("b"), request("c")])
    assert [type(r.error).__name__ for r in report.results] == [
        "BadRequestError",
        "BadRequestError",
        "AuthenticationError",
    ]
    assert double.outcomes() == [(Outcome.ACCEPTED, None)] * 3


async def test_a_retry_after_beyond_retry_after_max_pauses_nobody() -> None:
    # The caller gives up at once: the limiter is told of the refusal, with no pause.
    double = CountingLimiter()
    policy = na.RetryPolicy(max_attempts=3, retry_after_max=1.0)
    async with MockNebulaServer(fault_script=["http_429"], retry_after=30) as server:
        async with client_for(server, double, retry=policy) as client:
            with pytest.raises(na.RateLimitError):
                await client.img2img(request())
    assert double.outcomes() == [(Outcome.REFUSED, None)]


async def test_a_send_cancelled_on_the_way_is_recorded_too() -> None:
    # Every slot handed out is accounted for, the one whose answer a caller's own
    # deadline cut off as well: it was sent, and nothing usable came back.
    double = CountingLimiter()
    async with MockNebulaServer(latency=5.0) as server:
        async with client_for(server, double) as client:
            with anyio.move_on_after(0.3) as scope:
                await client.img2img(request())
    assert scope.cancelled_caught
    assert double.acquired == 1
    double.assert_one_record_per_acquire()
    assert double.outcomes() == [(Outcome.FAILED, None)]


class SlowToRecord(CountingLimiter):
    """Records, then waits (a remote store that is slow or down)."""

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        await super().record(ticket, outcome, retry_after=retry_after)
        await anyio.sleep(5)


async def test_a_native_cancel_is_not_held_up_by_a_limiter_slow_to_record() -> None:
    # asyncio.wait_for (a web framework's timeout) cancels once: the limiter is told
    # of the slot, but a record that waits is cut off rather than waited for.
    double = SlowToRecord()
    async with MockNebulaServer(latency=5.0) as server:
        async with client_for(server, double) as client:
            started = anyio.current_time()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.img2img(request()), 0.3)
            assert anyio.current_time() - started < 2.0
    assert double.outcomes() == [(Outcome.FAILED, None)]


@pytest.mark.parametrize("seed", range(3))
async def test_one_acquire_per_attempt_across_a_faulty_batch(seed: int) -> None:
    faults = {"http_429": 0.1, "body_429": 0.05, "http_503": 0.1, "body_500": 0.05, "drop": 0.05}
    double = CountingLimiter()
    async with MockNebulaServer(faults=faults, retry_after=0.01, seed=seed) as server:
        async with client_for(server, double, max_concurrency=8) as client:
            jobs = [na.Job(request(f"job{i}"), images=1 + i % 3) for i in range(60)]
            report = await client.run_batch(jobs)
    assert all(result.ok for result in report.results)
    assert double.acquired == server.request_count == report.attempts
    double.assert_one_record_per_acquire()
    outcomes = Counter(outcome for outcome, _ in double.outcomes())
    assert outcomes[Outcome.REFUSED] == report.rate_limited
    assert outcomes[Outcome.ACCEPTED] == sum(result.submissions for result in report.results)
    failed = sum(1 for r in server.requests if r.fault in {"http_503", "body_500", "drop"})
    assert outcomes[Outcome.FAILED] == failed
    http_429 = [after for outcome, after in double.outcomes() if after is not None]
    assert http_429 == [0.01] * sum(1 for r in server.requests if r.fault == "http_429")


async def test_a_factory_is_asked_once_in_aenter_and_its_limiter_closed_by_the_client() -> None:
    factory = Factory()
    async with MockNebulaServer(fault_script=["http_429"], retry_after=0.01) as server:
        client = client_for(server, factory)
        assert factory.made == []  # configuration until the client enters the loop
        async with client:
            assert len(factory.made) == 1
            await client.img2img(request("one"))
            await client.run_batch([request("two"), request("three")])
            async for _ in client.stream([request("four")]):
                pass
            assert len(factory.made) == 1  # one limiter for every call
            limiter = factory.made[0]
            assert limiter.closed == 0
        await client.aclose()  # closing twice closes the limiter once
    assert limiter.closed == 1
    assert limiter.acquired == server.request_count == 5
    assert limiter.outcomes()[0] == (Outcome.REFUSED, 0.01)
    limiter.assert_one_record_per_acquire()


async def test_a_limiter_shared_by_two_clients_serves_both_and_stays_open() -> None:
    shared = CountingLimiter()
    async with MockNebulaServer() as server:
        async with client_for(server, shared) as first, client_for(server, shared) as second:
            await first.img2img(request("a"))
            await second.img2img(request("b"))
        async with client_for(server, shared) as third:  # still usable after both closed
            await third.img2img(request("c"))
    assert shared.acquired == 3
    assert shared.closed == 0
    assert shared.outcomes() == [(Outcome.ACCEPTED, None)] * 3


def test_rate_limit_refuses_what_is_neither_a_rate_nor_a_limiter() -> None:
    for bad in ("10", object(), True, [1.0]):
        with pytest.raises(na.ValidationError, match="rate_limit"):
            na.NebulaClient(token="t", base_url="http://127.0.0.1:1", rate_limit=bad)


class DeafLimiter(CountingLimiter):
    """A limiter whose ``record`` fails, as a shared one does when its Redis goes away."""

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        await super().record(ticket, outcome, retry_after=retry_after)
        raise na.APIConnectionError("shared rate limit: Redis unreachable", request_sent=False)


async def test_a_limiter_that_cannot_record_never_costs_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = DeafLimiter()
    async with MockNebulaServer() as server, client_for(server, limiter) as client:
        result = await client.img2img(request())
    assert len(result.urls) == 1
    assert len(server.requests) == 1  # generated once: not retried, not lost
    assert limiter.outcomes() == [(Outcome.ACCEPTED, None)]
    assert "could not record an outcome" in caplog.text
