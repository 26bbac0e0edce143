"""Draining a stream or a batch (issue 9, point 2), and the stops that stay immediate.

``results.drain()`` / ``client.drain()``: no new job is read, nothing new is sent,
the jobs in flight finish and are yielded, then the stream ends. Cancellation
(leaving the block, a deadline, ``break`` out of a bare loop) stops at once;
closing the client under a consumer raises ``ClientStateError`` in it. Requests
are held in flight by a loopback endpoint that answers only when told
(``tests/_gated.py``), so "in flight at the drain" is exact.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _gated import GatedServer, request_for, wait_until

import nebula_async as na
from nebula_async._exceptions import ClientStateError, NotAttemptedError

pytestmark = pytest.mark.anyio

FAST = na.RetryPolicy(max_attempts=4, backoff_base=0.005, backoff_max=0.02)
KINDS = ["plain", "async"]


def client_for(base_url: str, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 10.0)
    return na.NebulaClient(base_url=base_url, **options)


class Source:
    """Jobs ``job0``, ``job1``, ... as a plain or an async iterable; counts the reads."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.read = 0

    def plain(self) -> Iterator[Any]:
        for index in range(self.count):
            self.read += 1
            yield request_for(f"job{index}")

    async def asynchronous(self) -> AsyncIterator[Any]:
        for index in range(self.count):
            await anyio.lowlevel.checkpoint()
            self.read += 1
            yield request_for(f"job{index}")

    def of(self, kind: str) -> Any:
        return self.plain() if kind == "plain" else self.asynchronous()


# -- results.drain() ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_drain_mid_stream_finishes_the_jobs_in_flight_and_sends_nothing_more(
    kind: str,
) -> None:
    source = Source(100)
    concurrency = 3
    async with GatedServer() as server:
        async with client_for(server.base_url, max_concurrency=concurrency) as client:
            with anyio.fail_after(10):
                async with client.stream(source.of(kind)) as results:
                    await wait_until(lambda: server.in_flight == concurrency)
                    results.drain()
                    read_at_drain = source.read
                    in_flight = list(server.arrivals)
                    server.open()
                    got = [result async for result in results]
    assert len(in_flight) == concurrency
    assert source.read == read_at_drain  # no job read after the drain
    # The jobs in flight finished and were yielded, with their answers.
    sent = {result.job_id for result in got if result.attempts}
    assert {f"job{int(job_id)}" for job_id in sent} == set(in_flight)
    assert all(result.ok for result in got if result.attempts)
    # No request went out after those in flight at the drain.
    assert server.arrivals == in_flight
    # A job taken by a worker but not sent is reported as not attempted, not lost.
    for result in got:
        if not result.attempts:
            assert isinstance(result.error, NotAttemptedError)
            assert result.error.reason == "drained"


@pytest.mark.parametrize("kind", KINDS)
async def test_drain_after_some_results_then_the_stream_ends(kind: str) -> None:
    source = Source(200)
    async with GatedServer(opened=True, latency=0.01) as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            with anyio.fail_after(10):
                async with client.stream(source.of(kind)) as results:
                    got = []
                    async for result in results:
                        got.append(result)
                        if len(got) == 10:
                            results.drain()
                            read_at_drain = source.read
                            # Sent by the client (some may still be on the way).
                            sent_at_drain = client.statistics().attempts
    assert 10 <= len(got) <= read_at_drain < 200
    assert len(server.arrivals) == sent_at_drain
    assert sorted(r.job_id for r in got if r.ok) == sorted(
        str(int(p.removeprefix("job"))) for p in server.answered
    )


async def test_draining_a_fanned_out_job_keeps_the_finished_submissions_urls() -> None:
    # One job of 6 submissions on 2 slots: 2 in flight at the drain, 4 never started.
    job = na.Job(request_for("big"), images=6)
    async with GatedServer() as server:
        async with client_for(server.base_url, max_concurrency=2) as client:
            with anyio.fail_after(10):
                async with client.stream([job]) as results:
                    await wait_until(lambda: server.in_flight == 2)
                    results.drain()
                    server.open()
                    (result,) = [r async for r in results]
    assert server.arrivals == ["big", "big"]
    assert result.submissions == 6
    assert len(result.urls) == 2
    assert not result.ok
    assert result.urls == [f"https://img.example.com/big-{k}-0.png" for k in (1, 2)]
    not_attempted = [e for e in result.errors if isinstance(e, NotAttemptedError)]
    assert len(not_attempted) == 4 == len(result.errors)
    assert {e.reason for e in not_attempted} == {"drained"}
    assert result.attempts == 2


async def test_a_drain_during_a_backoff_sends_no_retry() -> None:
    # The job is in flight (backing off) at the drain: it ends with its last error.
    def script(prompt: str, attempt: int) -> int | None:
        return 503

    slow = na.RetryPolicy(max_attempts=5, backoff_base=0.2, backoff_max=0.2)
    async with GatedServer(opened=True, script=script) as server:
        async with client_for(server.base_url, retry=slow, random=lambda: 1.0) as client:
            with anyio.fail_after(5):
                async with client.stream([request_for("job0")]) as results:
                    await wait_until(lambda: len(server.arrivals) == 1)
                    await anyio.sleep(0.05)  # in its 0.2 s backoff
                    results.drain()
                    (result,) = [r async for r in results]
    assert server.arrivals == ["job0"]
    assert isinstance(result.error, na.ServerError)


# -- client.drain() ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_client_drain_ends_a_running_batch_with_the_jobs_that_ran(kind: str) -> None:
    source = Source(300)
    async with GatedServer(opened=True, latency=0.01) as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            done: list[na.JobResult] = []

            async def drain_soon() -> None:
                await wait_until(lambda: len(done) >= 12)
                client.drain()

            with anyio.fail_after(10):
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(drain_soon)
                    report = await client.run_batch(source.of(kind), on_result=done.append)
            with pytest.raises(ClientStateError, match="draining"):
                await client.run_batch([request_for("late")])
            with pytest.raises(ClientStateError):
                await client.img2img(request_for("late"))
            with pytest.raises(ClientStateError):
                client.stream([request_for("late")])
            assert "state=draining" in repr(client)
    assert 12 <= len(report.results) <= source.read < 300
    assert [r.job_id for r in report.results] == sorted((r.job_id for r in report.results), key=int)
    answered = {p.removeprefix("job") for p in server.answered}
    assert {r.job_id for r in report.results if r.ok} == answered
    assert "late" not in server.arrivals


async def test_client_drain_drains_every_running_stream() -> None:
    async with GatedServer() as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            first = Source(50)
            second = Source(50)
            with anyio.fail_after(10):
                async with client.stream(first.plain()) as a, client.stream(second.plain()) as b:
                    await wait_until(lambda: server.in_flight == 4)
                    client.drain()
                    server.open()
                    got_a = [r async for r in a]
                    got_b = [r async for r in b]
    assert len(server.arrivals) == 4
    assert sum(r.ok for r in got_a + got_b) == 4
    assert first.read < 50
    assert second.read < 50


# -- the immediate stops -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_break_out_of_a_bare_loop_cancels_promptly(kind: str) -> None:
    source = Source(1000)
    async with GatedServer(opened=True) as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            got = 0
            async for _ in client.stream(source.of(kind)):
                got += 1
                if got == 5:
                    server.close_gate()  # what is in flight now hangs
                    await wait_until(lambda: server.in_flight == 4)
                    break
            started = time.monotonic()
            gc.collect()
            await wait_until(lambda: client.statistics().in_flight == 0, within=2)
            await wait_until(lambda: len(server.abandoned) == 4, within=2)
            elapsed = time.monotonic() - started
            read = source.read
            await anyio.sleep(0.05)
            assert source.read == read  # nothing read after the loop was left
    assert elapsed < 1.0
    assert source.read < 1000


@pytest.mark.parametrize("kind", KINDS)
async def test_leaving_the_block_and_a_deadline_cancel_at_once(kind: str) -> None:
    async with GatedServer() as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            started = time.monotonic()
            with anyio.move_on_after(0.2) as scope:
                async with client.stream(Source(100).of(kind)) as results:
                    async for _ in results:
                        pass
            assert scope.cancelled_caught
            assert time.monotonic() - started < 1.0
            await wait_until(lambda: len(server.abandoned) == 4, within=2)
            assert client.statistics().in_flight == 0
            # Leaving the block with break: the same immediate stop.
            server.abandoned.clear()
            source = Source(100)
            with anyio.fail_after(2):
                async with client.stream(source.of(kind)) as results:
                    await wait_until(lambda: server.in_flight == 4)
            await wait_until(lambda: len(server.abandoned) == 4, within=2)
            assert client.statistics().in_flight == 0


@pytest.mark.parametrize("structured", [True, False])
async def test_closing_the_client_mid_stream_raises_client_state_error(structured: bool) -> None:
    async with GatedServer() as server:
        client = client_for(server.base_url, max_concurrency=2)
        outcome: list[BaseException] = []

        async def consume() -> None:
            try:
                if structured:
                    async with client.stream(Source(50).plain()) as results:
                        async for _ in results:
                            pass
                else:
                    async for _ in client.stream(Source(50).plain()):
                        pass
            except BaseException as exc:
                outcome.append(exc)

        async with client:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(consume)
                    await wait_until(lambda: server.in_flight == 2)
                    started = time.monotonic()
                    await client.aclose()
        assert time.monotonic() - started < 1.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClientStateError), repr(outcome[0])
