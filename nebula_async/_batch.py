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
from typing import Any, Final, TypeVar

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._codec import from_payload
from ._exceptions import NebulaError, ValidationError
from ._limits import FifoLimiter
from ._models import (
    ImageResult,
    Img2ImgRequest,
    Job,
    JobResult,
    image_seed,
    seed_urls,
    seeded_job_result,
    url_seed,
)

__all__ = [
    "JobInput",
    "RefusedItem",
    "RepeatedIdCheck",
    "WorkerPermits",
    "aggregate",
    "backoff_sleep",
    "coerce_job",
    "default_window",
    "detach_error",
    "explicit_job_id",
    "job_id_of",
    "run_pipeline",
    "spare_worker_count",
    "worker_count",
]

JobInput = Job | Img2ImgRequest | Mapping[str, Any]
_JOB_KEYS: Final = frozenset({"id", "images"})
_POSITION_DIGITS: Final = 18
# Closing a cancelled pipeline is prompt (aiohttp aborts at once); this only
# guards against a run_job that ignores cancellation.
_CLOSE_GRACE_S: Final = 10.0


@attrs.frozen
class RefusedItem:
    """An input item refused as it was read (``admit``): fails as its job, unsent."""

    job_id: str
    error: ValidationError


def coerce_job(item: object, index: int) -> Job:
    """Turn one input item into a :class:`Job` with an id (its position by default).

    Raises :class:`ValidationError` naming the field for a bad item.
    """
    if isinstance(item, Job):
        return item if item.id is not None else Job(item.request, id=str(index), images=item.images)
    if isinstance(item, Img2ImgRequest):
        return Job(item, id=str(index))
    if isinstance(item, Mapping):
        fields = {key: value for key, value in item.items() if key not in _JOB_KEYS}
        job_id = item.get("id")
        return Job(
            from_payload(fields),
            id=str(index) if job_id is None else job_id,
            images=item.get("images"),
        )
    raise ValidationError(
        f"job {index}: expected a Job, an Img2ImgRequest or a dict, got {type(item).__name__}",
        field="job",
    )


def explicit_job_id(item: object) -> str | None:
    """The id an input item names itself (a Job's ``id``, a dict's ``"id"``), or None
    when its job will be known by its position.

    On the hot path of ``run_batch`` (its repeated-id check): concrete classes are
    tested before the ``Mapping`` ABC, whose ``isinstance`` costs several times more.
    """
    if isinstance(item, Job):
        return item.id
    if isinstance(item, Img2ImgRequest):
        return None
    if isinstance(item, dict | Mapping):
        job_id = item.get("id")
        if isinstance(job_id, str | int) and not isinstance(job_id, bool):
            return str(job_id)
    return None


def job_id_of(item: object, index: int) -> str:
    """The id an item's job will have, or the best one to report if it cannot be one."""
    explicit = explicit_job_id(item)
    return str(index) if explicit is None else explicit


def position_id(job_id: str) -> int | None:
    """The input position whose default id is ``job_id`` ("7" -> 7), or None."""
    if not (job_id.isascii() and job_id.isdigit()) or (job_id[0] == "0" and job_id != "0"):
        return None
    # No input has 10**18 items, and int() refuses strings of over 4,300 digits.
    if len(job_id) > _POSITION_DIGITS:
        return None
    return int(job_id)


class RepeatedIdCheck:
    """Refuses a job whose id an earlier job of the batch already has, in input order.

    ``check(index, item)`` is ``run_pipeline``'s ``admit`` hook. Only the ids that
    items name themselves are kept: a job known by its position ``i`` has the id
    ``str(i)``, unique among positions, so it can only clash with a named id. The
    common batch of bare requests therefore keeps nothing per job (a growing set
    also made glibc trim and regrow its heap, a page fault every few requests).
    """

    __slots__ = ("_named", "_named_at")

    def __init__(self) -> None:
        self._named: set[str] = set()  # ids the input named
        self._named_at: set[int] = set()  # the positions of the jobs that named one

    def check(self, index: int, item: object) -> object:
        named = explicit_job_id(item)
        if named is None:
            if not self._named:
                return item  # no id named yet: positions never repeat one another
            job_id = str(index)
            repeated = job_id in self._named
        else:
            job_id = named
            # Position ``earlier`` has the id ``named`` unless it named another one.
            earlier = position_id(named)
            repeated = named in self._named or (
                earlier is not None and earlier < index and earlier not in self._named_at
            )
            self._named_at.add(index)
            self._named.add(named)
        if repeated:
            error = ValidationError(
                f"job {index}: id {job_id!r} is already used by an earlier job of this "
                "batch; ids must be unique",
                field="id",
            )
            return RefusedItem(job_id, error)
        return item


def detach_error(error: BaseException) -> None:
    """Drop the tracebacks of an error kept in a result, and of its causes.

    A traceback pins every frame it passed through, request bodies (data: URIs of
    megabytes) included, for as long as the result is kept.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current.__context__ = None if current.__cause__ is not None else current.__context__
        current = current.__cause__ or current.__context__


def aggregate(
    job_id: str,
    outcomes: list[ImageResult | NebulaError],
    *,
    attempts: int,
    retries: int,
    rate_limited: int,
    elapsed_s: float,
    requested_images: int,
) -> JobResult:
    """Gather a job's submission outcomes, in submission order, into one result.

    Successful submissions give their URLs and images even when others failed, so a
    partly failed job keeps what it got; every failure is kept in ``errors``,
    detached from its traceback (:func:`detach_error`).
    """
    if len(outcomes) == 1 and isinstance(outcome := outcomes[0], ImageResult):
        # One submission of URL-only images (the common job): its seed is passed on,
        # without the loop and lists below (one general path measured ~1-2k more
        # instructions per job under callgrind).
        seed = image_seed(outcome)
        if seed is not None:
            return seeded_job_result(
                job_id=job_id,
                seed=seed,
                errors=(),
                submissions=1,
                attempts=attempts,
                retries=retries,
                rate_limited=rate_limited,
                elapsed_s=elapsed_s,
                requested_images=requested_images,
            )
    answers: list[ImageResult] = []
    errors: list[NebulaError] = []
    for outcome in outcomes:
        if isinstance(outcome, ImageResult):
            answers.append(outcome)
        else:
            detach_error(outcome)
            errors.append(outcome)
    seeds = [seed for answer in answers if (seed := image_seed(answer)) is not None]
    if len(seeds) == len(answers):
        # URL-only images (or none): the lists are made when read.
        joined = url_seed([url for seed in seeds for url in seed_urls(seed)])
        return seeded_job_result(
            job_id=job_id,
            seed=joined,
            errors=errors or (),
            submissions=len(outcomes),
            attempts=attempts,
            retries=retries,
            rate_limited=rate_limited,
            elapsed_s=elapsed_s,
            requested_images=requested_images,
        )
    images = [image for answer in answers for image in answer.images]
    return JobResult(
        job_id=job_id,
        urls=[image.url for image in images if image.url is not None],
        images=images,
        errors=errors,
        submissions=len(outcomes),
        attempts=attempts,
        retries=retries,
        rate_limited=rate_limited,
        elapsed_s=elapsed_s,
        requested_images=requested_images,
    )


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
