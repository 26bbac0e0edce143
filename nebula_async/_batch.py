"""The batch pipeline: lazy input, a bounded worker pool, and the aggregator.

::

    plain iterable  --next(), by the worker that is free-->  N workers --run_job-->
    async iterable  -> feeder --[memory stream, buffer = workers]--> N workers --run_job-->
      -> [memory stream, buffer = workers] -> the caller, unordered or reordered

A plain iterable is read by the workers themselves, one item when a worker is
free (no feeder task, no hand-off); an async iterable by one feeder task
through a bounded stream, since its ``__anext__`` must not run concurrently.
Either way a job is read only when a worker is about to take it, and the results
stream is bounded too: memory stays flat in the number of jobs (backpressure).

Workers and backoff: ``workers`` (the client's concurrency) workers run jobs, each
holding one of the pool's permits (:class:`WorkerPermits`) across jobs, so with
no retries every request finds a concurrency slot free and nothing is handed from
task to task. Spare workers (half as many again) wait for a permit. A submission
that sleeps in a retry backoff lends a permit out for the sleep
(:func:`backoff_sleep`): a spare takes it and runs another job meanwhile, so a
backoff never idles a concurrency slot. Awake again, the submission takes a
permit back at once, on credit if none is free, so its retry waits for nothing
but the concurrency slot; the next worker to finish a job while the pool is in
debt repays it and waits as a spare.

The pipeline runs in a task of its own that the client tracks, not inside the caller's async
generator frame: a task group entered in an async generator and closed by the
garbage collector would exit its cancel scope in another task. Leaving the
stream (break, cancellation, error) cancels the pipeline and waits for it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextvars import ContextVar
from typing import Final, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._exceptions import ValidationError
from ._limits import FifoLimiter
from ._models import (
    JobResult,
)

__all__ = [
    "WorkerPermits",
    "backoff_sleep",
    "default_window",
    "run_pipeline",
    "spare_worker_count",
    "worker_count",
]
# Closing a cancelled pipeline is prompt (aiohttp aborts at once); this only
# guards against a run_job that ignores cancellation.
_CLOSE_GRACE_S: Final = 10.0


_T = TypeVar("_T")
_END: Final = object()  # the end of a plain iterable


class WorkerPermits(FifoLimiter):
    """Which workers of a batch may run a job: ``workers`` permits, lent out on backoff.

    A :class:`FifoLimiter` (``acquire()`` waits its turn for a free permit) that may
    also run into debt: ``take()`` takes a permit at once, on credit when none is
    free (``in_debt``), and ``release()`` repays a debt before it hands a permit to
    a waiter or frees it. Unlike a limiter, a release needs no earlier acquire:
    every sleeping submission lends one permit, so the free count can briefly
    exceed ``workers`` (the spare workers bound what that starts).
    """

    __slots__ = ()

    @property
    def in_debt(self) -> bool:
        """Whether a permit was taken on credit and not yet repaid."""
        return self._free < 0

    def release(self) -> None:
        """Give back or lend a permit: repay a debt, else wake a waiter, else free it."""
        # No over-release check: a lent permit is released without an acquire.
        if self._free < 0 or not self._hand_over():
            self._free += 1

    def take(self) -> None:
        """Take a permit now, on credit when none is free."""
        self._free -= 1


#: The worker permits of the batch whose worker runs the current task (and the
#: tasks of its job), for :func:`backoff_sleep` to lend out; None outside a batch.
_WORKER_PERMITS: ContextVar[WorkerPermits | None] = ContextVar(
    "nebula_async_worker_permits", default=None
)


async def backoff_sleep(
    delay: float, sleep: Callable[[float], Awaitable[None]] = anyio.sleep
) -> None:
    """``sleep(delay)`` before a retry, lending a worker permit meanwhile.

    Inside a batch the permit goes to a spare worker, which runs another job during
    the sleep; afterwards the permit is taken back at once (on credit if need be,
    repaid by the next worker to finish a job). Outside a
    batch (``img2img``) this is a plain sleep.
    """
    permits = _WORKER_PERMITS.get()
    if permits is None:
        await sleep(delay)
        return
    permits.release()
    # Cancelled in the sleep, the pipeline is going away: nothing to take back.
    await sleep(delay)
    permits.take()


# anyio's send()/receive() checkpoint on every call, an extra event-loop round trip
# per item; try the non-blocking call first and wait only when the stream is full
# (or empty). Every job still reaches a real await (its HTTP request).
async def _send(stream: MemoryObjectSendStream[_T], item: _T) -> None:
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


async def _receive(stream: MemoryObjectReceiveStream[_T]) -> _T:
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        return await stream.receive()


async def _iterate(jobs: Iterable[object] | AsyncIterable[object]) -> AsyncGenerator[object]:
    if isinstance(jobs, AsyncIterable):
        try:
            async for item in jobs:
                yield item
        finally:
            # Stopped early (break, cancel): close the caller's async generator now,
            # in this task, rather than leave it to the garbage collector.
            if isinstance(jobs, AsyncGenerator):
                with anyio.CancelScope(shield=True):
                    await jobs.aclose()
    else:
        for item in jobs:
            yield item


async def run_pipeline(
    jobs: Iterable[object] | AsyncIterable[object],
    run_item: Callable[[int, object], Awaitable[JobResult]],
    *,
    workers: int,
    ordered: bool,
    window: int,
    track: Callable[[asyncio.Task[None]], None],
    admit: Callable[[int, object], object] | None = None,
) -> AsyncGenerator[tuple[int, JobResult]]:
    """Yield ``(input index, JobResult)`` for every job, as they finish or in order.

    ``admit(index, item)``, if given, sees every item in input order as it is read
    and returns what the workers get in its place (a check that needs input order,
    such as refusing a repeated id, belongs here, not in the workers).

    ``run_item(index, item)`` turns one input item into its result and never raises
    for a bad job. With ``ordered=True`` at most ``window`` jobs are started beyond
    the oldest one not yet yielded, which bounds the reorder buffer to ``window``
    results. An exception raised by the input iterable stops the feeding; the jobs
    already started still finish and are yielded, then the exception is raised.
    """
    if isinstance(jobs, str | bytes):
        raise ValidationError("jobs: expected an iterable of jobs, got a string", field="jobs")
    if isinstance(jobs, Mapping):
        # Iterating a dict yields its keys: almost surely one job passed as the list.
        raise ValidationError(
            "jobs: expected an iterable of jobs, got a mapping (one job? wrap it in a list)",
            field="jobs",
        )
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValidationError(f"window: must be an integer >= 1, got {window!r}", field="window")
    if not isinstance(jobs, Iterable | AsyncIterable):
        raise ValidationError(
            f"jobs: expected an iterable or async iterable, got {type(jobs).__name__}",
            field="jobs",
        )
    send_results, receive_results = anyio.create_memory_object_stream[tuple[int, JobResult]](
        workers
    )
    window_slots = anyio.Semaphore(window) if ordered else None
    input_failure: list[BaseException] = []
    permits = WorkerPermits(workers)

    async def work(
        take: Callable[[], Awaitable[tuple[int, object] | None]],
        send: MemoryObjectSendStream[tuple[int, JobResult]],
    ) -> None:
        async with send:
            # Every worker (its job's tasks included) lends this pool's permit on backoff.
            _WORKER_PERMITS.set(permits)
            await permits.acquire()  # spares wait here until a backoff lends a permit
            while True:
                if permits.in_debt:
                    # A job back from a backoff took a permit on credit: repay it with
                    # this worker's, and wait as a spare.
                    permits.release()
                    await permits.acquire()
                taken = await take()
                if taken is None:
                    permits.release()  # repays a debt, or lets a spare find the end too
                    return
                index, item = taken
                result = await run_item(index, item)
                await _send(send, (index, result))

    if isinstance(jobs, AsyncIterable):
        # An async iterable is read by one feeder task (its __anext__ must not run
        # concurrently), through a stream bounded by the workers.
        send_jobs, receive_jobs = anyio.create_memory_object_stream[tuple[int, object]](workers)

        async def feed() -> None:
            async with send_jobs:
                index = 0
                source = _iterate(jobs)
                try:
                    async for item in source:
                        if admit is not None:
                            item = admit(index, item)
                        if window_slots is not None:
                            await window_slots.acquire()
                        await _send(send_jobs, (index, item))
                        index += 1
                except Exception as exc:  # the caller's iterable failed: stop, keep results
                    input_failure.append(exc)
                except asyncio.CancelledError as exc:
                    if _really_cancelled():
                        raise
                    input_failure.append(_stray_cancel(exc))
                finally:
                    with anyio.CancelScope(shield=True):
                        await source.aclose()

        async def work_on_stream(receive: MemoryObjectReceiveStream[tuple[int, object]]) -> None:
            async def take() -> tuple[int, object] | None:
                try:
                    return await _receive(receive)
                except anyio.EndOfStream:
                    return None

            async with receive:
                await work(take, send_results.clone())

        async def pipeline() -> None:
            async with send_results, receive_jobs, anyio.create_task_group() as task_group:
                task_group.start_soon(feed)
                for _ in range(workers + spare_worker_count(workers)):
                    task_group.start_soon(work_on_stream, receive_jobs.clone())

    else:
        # A plain iterable is read by the workers themselves, each taking the next
        # item when it is free (next() never runs concurrently: it does not await).
        # No feeder task and no job stream: one task switch less per job.
        iterator: Iterator[object] | None = None
        read_index = 0

        async def take() -> tuple[int, object] | None:
            nonlocal iterator, read_index
            if read_index < 0:  # the input ended or failed
                return None
            if window_slots is not None:
                await window_slots.acquire()
            try:
                if iterator is None:
                    iterator = iter(jobs)
                item = next(iterator) if read_index >= 0 else _END
            except StopIteration:
                item = _END
            except Exception as exc:  # the caller's iterable failed: stop, keep results
                input_failure.append(exc)
                item = _END
            except asyncio.CancelledError as exc:  # next() never awaits: not ours
                input_failure.append(_stray_cancel(exc))
                item = _END
            if item is not _END and admit is not None:
                try:
                    item = admit(read_index, item)
                except Exception as exc:  # as if the input had failed here
                    input_failure.append(exc)
                    item = _END
            if item is _END:
                read_index = -1
                if window_slots is not None:
                    window_slots.release()
                return None
            # No await since next(): items were admitted in input order.
            index = read_index
            read_index += 1
            return index, item

        async def pipeline() -> None:
            async with send_results, anyio.create_task_group() as task_group:
                for _ in range(workers + spare_worker_count(workers)):
                    task_group.start_soon(work, take, send_results.clone())

    task = asyncio.get_running_loop().create_task(pipeline())
    track(task)
    try:
        if window_slots is None:
            while True:
                try:
                    pair = await _receive(receive_results)
                except anyio.EndOfStream:
                    break
                yield pair
        else:
            pending: dict[int, JobResult] = {}
            next_index = 0
            while True:
                try:
                    index, result = await _receive(receive_results)
                except anyio.EndOfStream:
                    break
                pending[index] = result
                while next_index in pending:
                    yield next_index, pending.pop(next_index)
                    next_index += 1
                    window_slots.release()
        if task.cancelled():
            raise RuntimeError("the NebulaClient was closed while this stream was running")
        await task  # surfaces a bug in run_item rather than hiding it
        if input_failure:
            raise input_failure[0]
    finally:
        # Stop the pipeline before closing our end of the results stream, so that no
        # worker can find it closed (BrokenResourceError) while finishing a job.
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_GRACE_S):
                await asyncio.wait({task})
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: raised above if it matters
        receive_results.close()


def _really_cancelled() -> bool:
    """Whether the current task is being cancelled (not merely handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _stray_cancel(exc: BaseException) -> RuntimeError:
    """A CancelledError raised by the caller's jobs iterable, not a cancellation of
    ours: reported as the input's failure rather than silently ending the stream."""
    error = RuntimeError("the jobs iterable raised CancelledError")
    error.__cause__ = exc
    return error


def default_window(max_concurrency: int) -> int:
    """The reorder window of ``stream(ordered=True)``: 4x the concurrency, at least 64."""
    return max(64, 4 * max_concurrency)


def worker_count(max_concurrency: int) -> int:
    """Workers running jobs at a time in a batch: one per concurrency slot."""
    return max_concurrency


def spare_worker_count(workers: int) -> int:
    """Spare workers of a batch, which run jobs only while others sleep in a backoff."""
    return max(1, math.ceil(workers / 2))
