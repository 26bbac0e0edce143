"""The batch pipeline's worker pool on its own, with a fake ``run_item`` (no HTTP).

Workers run one job each at a time, as many as the concurrency; a submission that
sleeps in a retry backoff lends a permit to a spare worker, which runs another job
meanwhile, and takes one back afterwards, on credit that the next worker to finish
a job repays. No timed asserts: the
tests check orders and counts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Iterator

import anyio
import anyio.lowlevel
import pytest

from nebula_async import JobResult
from nebula_async._batch import (
    WorkerPermits,
    backoff_sleep,
    run_pipeline,
    spare_worker_count,
    worker_count,
)

pytestmark = pytest.mark.anyio


def _track(task: asyncio.Task[None]) -> None:
    pass


async def _collect(pipeline: AsyncGenerator[tuple[int, JobResult]]) -> list[int]:
    finished: list[int] = []
    try:
        with anyio.fail_after(30):
            async for index, result in pipeline:
                assert result.job_id == str(index)
                finished.append(index)
    finally:
        await pipeline.aclose()
    return finished


def test_worker_counts() -> None:
    assert [worker_count(c) for c in (1, 16, 64)] == [1, 16, 64]
    assert [spare_worker_count(w) for w in (1, 2, 3, 16, 64)] == [1, 1, 2, 8, 32]


async def test_backoff_outside_a_batch_is_a_plain_sleep() -> None:
    await backoff_sleep(0.0)  # no worker permits in this task: nothing to lend
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    await backoff_sleep(1.5, sleep)
    assert slept == [1.5]


async def test_backoff_in_a_batch_uses_the_given_sleep_and_still_lends() -> None:
    slept: list[float] = []
    finished_during_sleep: list[int] = []
    finished: list[int] = []

    async def sleep(seconds: float) -> None:  # e.g. one that ends early on close
        slept.append(seconds)
        while len(finished) < 3:
            await anyio.sleep(0.001)
        finished_during_sleep.extend(finished)

    async def run_item(index: int, item: object) -> JobResult:
        if index == 0:
            await backoff_sleep(7.0, sleep)
        finished.append(index)
        return JobResult(job_id=str(index))

    await _collect(
        run_pipeline(range(4), run_item, workers=1, ordered=False, window=64, track=_track)
    )
    assert slept == [7.0]
    assert finished_during_sleep == [1, 2, 3]
    assert finished == [1, 2, 3, 0]


async def test_a_job_in_backoff_lends_its_slot_to_the_other_jobs() -> None:
    # One worker: without the loan, job 0's backoff would hold up every other job.
    events: list[str] = []

    async def run_item(index: int, item: object) -> JobResult:
        events.append(f"start {index}")
        if index == 0:
            await backoff_sleep(0.3)
        else:
            await anyio.lowlevel.checkpoint()
        events.append(f"end {index}")
        return JobResult(job_id=str(index))

    finished = await _collect(
        run_pipeline(range(6), run_item, workers=1, ordered=False, window=64, track=_track)
    )
    assert finished == [1, 2, 3, 4, 5, 0]
    assert events[:2] == ["start 0", "start 1"]


async def test_a_job_back_from_backoff_runs_at_once_and_the_loan_is_repaid() -> None:
    # One worker, one spare. Job 0 lends its permit for its backoff; the spare runs
    # job 1. Job 0 wakes while job 1 still runs and goes on at once (on credit);
    # when job 1 ends, its worker repays the debt instead of starting job 2.
    go = {index: anyio.Event() for index in range(2)}
    events: list[str] = []

    async def run_item(index: int, item: object) -> JobResult:
        events.append(f"start {index}")
        if index == 0:
            await backoff_sleep(0.0)
            events.append("0 awake")
        if index in go:
            await go[index].wait()
        events.append(f"end {index}")
        return JobResult(job_id=str(index))

    async def wait_for(event: str) -> None:
        while event not in events:
            await anyio.sleep(0.001)

    async def drive() -> None:
        await wait_for("0 awake")
        await wait_for("start 1")
        go[1].set()
        await wait_for("end 1")
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        events.append("job 1 done, job 0 still running")
        go[0].set()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(drive)
        finished = await _collect(
            run_pipeline(range(4), run_item, workers=1, ordered=False, window=64, track=_track)
        )
    assert sorted(finished) == [0, 1, 2, 3]
    # No third job ran beside the two: the next job started only after job 0 ended.
    assert events.index("start 2") > events.index("job 1 done, job 0 still running")
    assert events.index("start 2") > events.index("end 0")


async def test_worker_permits_lend_take_on_credit_and_repay() -> None:
    permits = WorkerPermits(1)
    await permits.acquire()
    spare = asyncio.create_task(permits.acquire())
    await anyio.sleep(0.01)
    assert not spare.done()
    permits.release()  # a loan: the spare gets it
    await spare
    permits.take()  # back from the backoff: on credit
    assert permits.in_debt
    permits.release()  # a worker repays instead of waking anyone
    assert not permits.in_debt
    assert permits.available == 0


async def test_worker_permits_cancelled_waiters_leak_nothing() -> None:
    permits = WorkerPermits(1)
    await permits.acquire()
    waiting = asyncio.create_task(permits.acquire())
    handed = asyncio.create_task(permits.acquire())
    behind = asyncio.create_task(permits.acquire())
    await anyio.sleep(0.01)
    waiting.cancel()  # cancelled in the line
    await anyio.sleep(0.01)
    permits.release()  # handed to `handed`...
    handed.cancel()  # ... which is cancelled before it resumes: passed on to `behind`
    await behind
    assert waiting.cancelled()
    assert handed.cancelled()
    permits.release()
    assert permits.available == 1


@pytest.mark.parametrize("seed", range(6))
async def test_random_backoffs_every_job_once_and_the_slots_are_kept(seed: int) -> None:
    rng = random.Random(seed)
    workers = rng.choice([1, 2, 3, 5])
    jobs = 60
    # Per job: its submissions, each a list of backoff delays (0 to 3 retries).
    plans = [
        [[rng.choice([0.0, 0.001, 0.003]) for _ in range(rng.randint(0, 3))] for _ in range(n)]
        for n in (rng.choice([1, 1, 1, 2, 3]) for _ in range(jobs))
    ]
    running: set[int] = set()
    sleeping: dict[int, int] = {}
    most_running = 0
    started: list[int] = []
    no_backoff = not any(delays for job in plans for delays in job)

    async def submission(index: int, delays: list[float]) -> None:
        for delay in delays:
            await anyio.lowlevel.checkpoint()  # the "request"
            sleeping[index] += 1
            await backoff_sleep(delay)
            sleeping[index] -= 1
        await anyio.lowlevel.checkpoint()

    async def run_item(index: int, item: object) -> JobResult:
        nonlocal most_running
        assert item == index
        started.append(index)
        running.add(index)
        sleeping[index] = 0
        most_running = max(most_running, len(running))
        # Never more jobs than workers and spares; no more than the workers unless
        # a job is (or was just) in a backoff.
        assert len(running) <= workers + spare_worker_count(workers)
        async with anyio.create_task_group() as task_group:
            for delays in plans[index]:
                task_group.start_soon(submission, index, delays)
        running.discard(index)
        return JobResult(job_id=str(index))

    finished = await _collect(
        run_pipeline(range(jobs), run_item, workers=workers, ordered=False, window=64, track=_track)
    )
    assert sorted(finished) == list(range(jobs))
    assert sorted(started) == list(range(jobs))
    assert not running
    if no_backoff:
        assert most_running <= workers
    else:
        assert most_running > workers  # spares ran jobs during backoffs


async def test_ordered_stream_with_backoffs_keeps_input_order() -> None:
    async def run_item(index: int, item: object) -> JobResult:
        if index % 3 == 0:
            await backoff_sleep(0.002)
        return JobResult(job_id=str(index))

    finished = await _collect(
        run_pipeline(range(40), run_item, workers=2, ordered=True, window=8, track=_track)
    )
    assert finished == list(range(40))


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_plain_iterable_is_read_by_the_workers_one_item_per_free_worker(
    ordered: bool,
) -> None:
    # No feeder: an item is read only when a worker takes it, never ahead.
    read: list[int] = []
    running: list[int] = []
    most_ahead = 0

    def source() -> Iterator[int]:
        for index in range(30):
            read.append(index)
            yield index
        raise OSError("input broke")

    async def run_item(index: int, item: object) -> JobResult:
        nonlocal most_ahead
        running.append(index)
        most_ahead = max(most_ahead, len(read) - (len(finished_so_far) + len(running)))
        await anyio.lowlevel.checkpoint()
        running.remove(index)
        finished_so_far.append(index)
        return JobResult(job_id=str(index))

    finished_so_far: list[int] = []
    with pytest.raises(OSError, match="input broke"):
        await _collect(
            run_pipeline(source(), run_item, workers=3, ordered=ordered, window=4, track=_track)
        )
    assert sorted(finished_so_far) == list(range(30))
    assert most_ahead == 0
