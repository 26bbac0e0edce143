"""The batch pipeline end to end: a worker pool reading one feed, a semaphore per attempt.

Real clients against real loopback servers: :class:`MockNebulaServer` for faults,
and a purpose-built endpoint (``tests/_gated.py``) that holds answers until told,
so that what is in flight, and what was read from the input, can be seen exactly.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _gated import GatedServer, request_for, wait_until

import nebula_async as na
from nebula_async._batch import worker_count
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio

FAST = na.RetryPolicy(max_attempts=10, backoff_base=0.005, backoff_max=0.02)


def client_for(base_url: str, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 10.0)
    return na.NebulaClient(base_url=base_url, **options)


class Reads:
    """A jobs source, plain or async, that records how many items were read."""

    def __init__(self, count: int, *, prefix: str = "job") -> None:
        self.count = count
        self.prefix = prefix
        self.read = 0

    def plain(self) -> Iterator[na.Img2ImgRequest]:
        for index in range(self.count):
            self.read += 1
            yield request_for(f"{self.prefix}{index}")

    async def asynchronous(self) -> AsyncIterator[na.Img2ImgRequest]:
        for index in range(self.count):
            await anyio.lowlevel.checkpoint()
            self.read += 1
            yield request_for(f"{self.prefix}{index}")

    def source(self, kind: str) -> Any:
        return self.plain() if kind == "plain" else self.asynchronous()


def test_worker_count_is_twice_the_concurrency() -> None:
    assert [worker_count(c) for c in (1, 2, 3, 16, 64)] == [2, 4, 6, 32, 128]


async def test_a_job_in_backoff_does_not_hold_its_concurrency_slot() -> None:
    # One slot. job0's first attempt fails; it then sleeps 0.4 s before its retry.
    # Were the slot held through the backoff, nothing else could be sent meanwhile.
    def script(prompt: str, attempt: int) -> int | None:
        return 503 if prompt == "job0" and attempt == 1 else None

    slow_retry = na.RetryPolicy(max_attempts=3, backoff_base=0.4, backoff_max=0.4)
    async with GatedServer(opened=True, latency=0.02, script=script) as server:
        async with client_for(
            server.base_url, max_concurrency=1, retry=slow_retry, random=lambda: 1.0
        ) as client:
            report = await client.run_batch(request_for(f"job{i}") for i in range(8))
    assert all(result.ok for result in report.results)
    assert server.max_in_flight == 1
    first, retry = (i for i, prompt in enumerate(server.arrivals) if prompt == "job0")
    # Every other job went out while job0 slept: 7 requests of 20 ms in its 400 ms.
    assert server.arrivals[first + 1 : retry] == [f"job{i}" for i in range(1, 8)]
    assert report.results[0].attempts == 2
    assert report.retries == 1


async def test_many_jobs_in_backoff_at_once_still_leave_no_slot_idle() -> None:
    # Two slots, four workers. The first three jobs fail once and back off 0.4 s;
    # the other jobs could use both slots meanwhile.
    def script(prompt: str, attempt: int) -> int | None:
        return 503 if prompt in {"job0", "job1", "job2"} and attempt == 1 else None

    slow_retry = na.RetryPolicy(max_attempts=3, backoff_base=0.4, backoff_max=0.4)
    async with GatedServer(opened=True, latency=0.02, script=script) as server:
        async with client_for(
            server.base_url, max_concurrency=2, retry=slow_retry, random=lambda: 1.0
        ) as client:
            report = await client.run_batch(request_for(f"job{i}") for i in range(12))
    assert all(result.ok for result in report.results)
    retries_start = min(
        i for i, prompt in enumerate(server.arrivals) if server.arrivals[:i].count(prompt)
    )
    # Jobs 3.. went out during the backoffs, not after them.
    assert "job3" in server.arrivals[:retries_start]


@pytest.mark.parametrize("seed", range(3))
async def test_never_more_than_max_concurrency_in_flight_and_every_slot_used(seed: int) -> None:
    rng = random.Random(seed)
    concurrency = rng.choice([2, 3, 5])
    faults = {"http_503": 0.15, "body_500": 0.05, "drop": 0.05}
    jobs = [na.Job(request_for(f"job{i}"), images=rng.choice([1, 1, 2, 4])) for i in range(60)]
    async with MockNebulaServer(
        faults=faults, latency=(0.001, 0.01), retry_after=0.01, seed=seed
    ) as server:
        async with client_for(server.base_url, max_concurrency=concurrency) as client:
            report = await client.run_batch(jobs)
    assert all(result.ok for result in report.results), [r.error for r in report.results]
    assert server.max_in_flight == concurrency  # capped, and the cap was reached
    assert server.request_count == report.attempts


async def test_a_short_input_starts_few_workers_under_a_large_concurrency() -> None:
    # Workers start as the input proves long enough: 5 jobs at max_concurrency=1,000
    # need 6 tasks (the sixth finds the input ended), not 2,000 started up front.
    # Counted by name (anyio names a task after its function): the mock server's
    # own tasks run in the same loop, as many as connections opened so far.
    tasks_at_read: list[int] = []

    def ours() -> int:
        return sum(task.get_name().startswith("nebula_async.") for task in asyncio.all_tasks())

    def jobs() -> Iterator[na.Img2ImgRequest]:
        for index in range(5):
            tasks_at_read.append(ours())
            yield request_for(f"job{index}")
        tasks_at_read.append(ours())

    async with MockNebulaServer(latency=0.01) as server:
        async with client_for(server.base_url, max_concurrency=1000) as client:
            report = await client.run_batch(jobs())
    assert report.succeeded == 5
    # The pipeline's task and the workers so far.
    assert 2 <= max(tasks_at_read) <= 1 + 6, tasks_at_read


async def test_an_async_input_is_read_in_one_task_across_its_yields() -> None:
    # An async generator may hold a timer, a context or a cancel scope across its
    # yields (an aiohttp response it streams jobs from): it must stay in one task.
    readers: set[asyncio.Task[Any] | None] = set()

    async def jobs() -> AsyncIterator[na.Img2ImgRequest]:
        with anyio.CancelScope():  # exited in another task, this would raise
            for index in range(40):
                readers.add(asyncio.current_task())
                yield request_for(f"job{index}")

    async with MockNebulaServer(latency=(0.0, 0.005), seed=1) as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            report = await client.run_batch(jobs())
    assert report.succeeded == 40
    assert len(readers) == 1


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_the_input_is_read_lazily_one_item_per_free_worker(kind: str) -> None:
    concurrency = 2
    workers = worker_count(concurrency)
    reads = Reads(30)
    async with GatedServer() as server:
        async with client_for(server.base_url, max_concurrency=concurrency) as client:
            with anyio.fail_after(10):
                async with client.stream(reads.source(kind)) as results:
                    # Every answer held: each worker took one job, and nothing more is
                    # read until one of them comes free (an async input's pump holds
                    # the next item read, for the first worker to come free).
                    await wait_until(lambda: server.in_flight == concurrency)
                    await anyio.sleep(0.1)
                    assert reads.read == workers + (kind == "async")
                    assert server.in_flight == concurrency  # the third worker waits for a slot
                    server.open()
                    seen = [result.job_id async for result in results]
    assert sorted(seen, key=int) == [str(i) for i in range(30)]
    assert reads.read == 30
    assert server.max_in_flight == concurrency


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_each_finished_job_lets_exactly_one_more_item_be_read(kind: str) -> None:
    reads = Reads(20)
    over: list[int] = []

    async def watch() -> None:
        # Whenever the count of reads changes: never more than one per answer.
        while reads.read < 20:
            if reads.read > held + len(server.answered):
                over.append(reads.read)
            await anyio.lowlevel.checkpoint()

    async with GatedServer() as server:
        async with client_for(server.base_url, max_concurrency=1) as client:
            with anyio.fail_after(10):
                async with client.stream(reads.source(kind)) as results:
                    await wait_until(lambda: server.in_flight == 1)
                    await anyio.sleep(0.05)
                    held = reads.read
                    assert held == worker_count(1) + (kind == "async")
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(watch)
                        server.open()
                        got = [result async for result in results]
    assert len(got) == 20
    assert not over


async def test_an_ordered_stream_keeps_input_order_under_backoffs() -> None:
    faults = {"http_503": 0.25, "http_502": 0.1}
    async with MockNebulaServer(faults=faults, latency=(0.0, 0.01), seed=3) as server:
        async with client_for(server.base_url, max_concurrency=4) as client:
            jobs = (request_for(f"job{i}") for i in range(80))
            got = [r.job_id async for r in client.stream(jobs, ordered=True, window=8)]
            retried = sum(1 for record in server.requests if record.fault is not None)
    assert got == [str(i) for i in range(80)]
    assert retried > 10  # the backoffs did reorder the finishing


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_random_backoffs_every_job_once_with_its_own_urls(seed: int, kind: str) -> None:
    rng = random.Random(seed)
    faults = {"http_503": 0.15, "body_500": 0.05, "malformed": 0.05, "drop": 0.03}
    jobs = [na.Job(request_for(f"job{i}"), images=rng.choice([1, 1, 3])) for i in range(80)]

    async def async_jobs() -> AsyncIterator[na.Job]:
        for job in jobs:
            yield job

    source: Any = iter(jobs) if kind == "plain" else async_jobs()
    async with MockNebulaServer(
        faults=faults, latency=(0.0, 0.005), retry_after=0.01, seed=seed
    ) as server:
        async with client_for(server.base_url, max_concurrency=rng.choice([1, 3, 8])) as client:
            results = [result async for result in client.stream(source)]
    counts = Counter(result.job_id for result in results)
    assert counts == Counter(str(i) for i in range(80))  # every job, each once
    issued: dict[str, list[str]] = {}
    for record in server.requests:
        if record.fault is None and record.code == 200:
            issued.setdefault(record.field("prompt"), []).extend(record.urls)
    for result in results:
        job = jobs[int(result.job_id)]
        assert result.ok, result.error
        assert len(result.urls) == job.total_images
        assert sorted(result.urls) == sorted(issued[job.request.prompt])
