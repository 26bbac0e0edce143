"""The batch pipeline: lazy input, a bounded worker pool reading it, a drain.

::

    jobs (plain iterable)   --next()----------------------.
    jobs (async iterable)   --pump task--[rendezvous]-----+--> feed.take() <- workers
    workers --run_item--> [bounded stream] -> JobStream

Each worker, when free, takes the next item from one :class:`_Feed` and runs
it, so memory stays flat in the number of jobs and a drain leaves no job
half-taken. A plain iterable is read by the worker itself; taking it there,
rather than from a feeder task over a rendezvous stream, saves two task
hand-offs per job: 349k -> 246k instructions per job in run_batch (library
only, callgrind), about 13% of a whole request. An async iterable keeps one
task of its own (the feed's pump), since an async generator may hold a timer, a
context or a cancel scope across its yields. There are up to twice
as many workers as the client's concurrency, each started when the one before it
took a job (a short input starts few tasks): the concurrency cap itself is a
semaphore taken per HTTP attempt and released during a retry's backoff, so a
job sleeping in a backoff never idles a slot while other jobs wait. Results
flow back through a stream bounded by the workers (backpressure on a slow
consumer).

:class:`JobStream` owns the pipeline's task group when entered
(``async with client.stream(jobs) as results``), the structured form. Iterated
bare (``async for r in client.stream(jobs)``), it runs the same pipeline in a
task of the client's, because a task group cannot live in the frame of an
abandoned async iterator (PEP 789); dropping the iterator cancels that task.

:meth:`JobStream.drain` stops the feed and every submission not yet started
(they end as :class:`~nebula_async.NotAttemptedError`); the jobs in flight finish
and are yielded, then the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
)
from functools import partial
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._breaker import CircuitBreaker
from ._exceptions import ClientStateError, NotAttemptedError, ValidationError
from ._lifecycle import CLOSE_GRACE_S
from ._models import JobResult

__all__ = ["BatchControl", "JobStream", "default_window", "worker_count"]

RunItem = Callable[[int, object, "BatchControl"], Awaitable[JobResult]]
Admit = Callable[[int, object], object]
_Pair = tuple[int, JobResult]
_T = TypeVar("_T")
_log = logging.getLogger("nebula_async")
# What a feed gives back for "no item" (None may be an item: it fails its own job).
_NOTHING: Final = object()


def default_window(max_concurrency: int) -> int:
    """The reorder window of ``stream(ordered=True)``: 4x the concurrency, at least 64."""
    return max(64, 4 * max_concurrency)


def worker_count(max_concurrency: int) -> int:
    """Workers of a batch, at most: twice the concurrency (started as the input
    proves long enough to need them).

    The concurrency cap is the semaphore taken per attempt, so workers beyond it
    only wait; they are there for the slots freed by jobs sleeping in a retry
    backoff: up to ``max_concurrency`` jobs may sleep at once with every slot still
    in use. (A worker waiting costs one task, about 1 KB.)
    """
    return 2 * max_concurrency


class BatchControl:
    """What one batch's submissions ask before they start: drained? circuit open?"""

    def __init__(self, *, breaker_threshold: int | None) -> None:
        self._breaker = CircuitBreaker(breaker_threshold)
        self._drained = False
        self._on_drain: list[Callable[[], None]] = []

    @property
    def draining(self) -> bool:
        """Whether the batch was told to stop taking work."""
        return self._drained

    def drain(self) -> None:
        """Start no more jobs or submissions; those in flight finish."""
        if not self._drained:
            self._drained = True
            for callback in self._on_drain:
                callback()

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when :meth:`drain` is first called."""
        self._on_drain.append(callback)

    def not_started(self) -> NotAttemptedError | None:
        """The error a submission about to start gets instead, or None to go ahead."""
        if self._drained:
            return NotAttemptedError("not attempted: the batch was drained", reason="drained")
        opened = self._breaker.opened
        if opened is None:
            return None
        # A fresh copy each: errors kept in results must not share tracebacks.
        return NotAttemptedError(str(opened), reason=opened.reason, cause=opened.cause)

    def record(self, outcome: object) -> None:
        """Count a finished submission's outcome toward the circuit breaker."""
        was_open = self._breaker.opened is not None
        self._breaker.record(outcome)
        if not was_open and self._breaker.opened is not None:
            _log.warning("circuit open: %s", self._breaker.opened)

    @property
    def stopped_by(self) -> NotAttemptedError | None:
        """The circuit breaker's error once it opened, else None."""
        return self._breaker.opened


def check_jobs(jobs: object) -> Iterable[object] | AsyncIterable[object]:
    """``jobs`` if it is an iterable of jobs; a :class:`ValidationError` otherwise."""
    if isinstance(jobs, str | bytes):
        raise ValidationError("jobs: expected an iterable of jobs, got a string", field="jobs")
    if isinstance(jobs, Mapping):
        # Iterating a dict yields its keys: almost surely one job passed as the list.
        raise ValidationError(
            "jobs: expected an iterable of jobs, got a mapping (one job? wrap it in a list)",
            field="jobs",
        )
    if not isinstance(jobs, Iterable | AsyncIterable):
        raise ValidationError(
            f"jobs: expected an iterable or async iterable, got {type(jobs).__name__}",
            field="jobs",
        )
    return jobs


class _Feed:
    """The input, taken by whichever worker comes free: ``take()`` one item at a time.

    Nothing is read before a worker is free to run it (memory stays flat in the
    number of jobs), and a drain leaves no job half-taken. A plain iterator is
    read with ``next()``, which cannot stop halfway, so the workers call it
    themselves. An async iterable is read by one task of its own, :meth:`pump`,
    handing each item over a rendezvous stream: an async generator may hold a
    timer, a context or a cancel scope across its ``yield`` (an aiohttp response
    it streams jobs from), which must stay in the task that entered it. The index,
    ``admit``, the reorder window and the end of the input are the same code for
    both; so is the input's own failure, kept in :attr:`failure`.
    """

    def __init__(
        self,
        jobs: Iterable[object] | AsyncIterable[object],
        *,
        admit: Admit | None,
        window: anyio.Semaphore | None,
    ) -> None:
        self._jobs = jobs
        self._plain = None if isinstance(jobs, AsyncIterable) else iter(jobs)
        self._handed: MemoryObjectReceiveStream[object] | None = None
        self._admit = admit
        self._window = window
        self._index = 0
        self._window_wait: anyio.CancelScope | None = None
        self._pump_scope = anyio.CancelScope()
        self.stopped = False
        self.failure: BaseException | None = None

    def stop(self) -> None:
        """Take nothing more; the pump, and a worker waiting for the window, stop waiting."""
        self.stopped = True
        self._pump_scope.cancel()
        if self._window_wait is not None:
            self._window_wait.cancel()

    def start(self, task_group: TaskGroup) -> None:
        """Start the pump of an async input in ``task_group`` (a plain one needs none)."""
        if isinstance(self._jobs, AsyncIterable):
            send, self._handed = anyio.create_memory_object_stream[object](0)
            task_group.start_soon(self.pump, self._jobs, send)

    def close(self) -> None:
        """Close the workers' end of the pump's stream (once every worker is done)."""
        if self._handed is not None:
            self._handed.close()

    async def take(self) -> tuple[int, object] | None:
        """The next ``(index, item)``, admitted; None once the input is done or stopped."""
        if self.stopped:
            return None
        if self._window is not None and not await self._wait_for_window():
            return None
        if self._handed is None:
            item = self._read_plain()
        else:
            item = await self._receive_handed(self._handed)
        index = self._index
        if item is not _NOTHING and self._admit is not None:
            try:
                item = self._admit(index, item)
            except Exception as exc:  # the check of the input failed: as the input itself
                self._failed(exc)
                item = _NOTHING
        if item is _NOTHING:
            if self._window is not None:
                self._window.release()  # the permit taken for an item that never came
            return None
        self._index += 1
        return index, item

    def _read_plain(self) -> object:
        assert self._plain is not None
        try:
            return next(self._plain)
        except StopIteration:
            self.stopped = True
        except (Exception, asyncio.CancelledError) as exc:
            self._input_failed(exc)
        return _NOTHING

    def _input_failed(self, exc: BaseException) -> None:
        """The caller's input raised ``exc`` (plain or async: one rule): stop taking
        jobs, keep every result. A ``CancelledError`` the input raised itself, while
        this task is not being cancelled, is the input's failure too; a real
        cancellation goes on."""
        if isinstance(exc, asyncio.CancelledError):
            if _really_cancelled():
                raise exc
            exc = _stray_cancel(exc)
        self._failed(exc)

    async def _receive_handed(self, handed: MemoryObjectReceiveStream[object]) -> object:
        try:
            return await _receive(handed)
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.stopped = True  # the pump ended: input done, failed or stopped
            return _NOTHING

    async def pump(self, jobs: AsyncIterable[object], send: MemoryObjectSendStream[object]) -> None:
        """Read an async input in this one task, an item whenever a worker waits for one."""
        source = aiter(jobs)
        try:
            async with send:
                with self._pump_scope:
                    await self._pump_items(source, send)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                # Stopped early (drain, cancel): close the caller's generator here.
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def _pump_items(
        self, source: AsyncIterator[object], send: MemoryObjectSendStream[object]
    ) -> None:
        while True:
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return
            except (Exception, asyncio.CancelledError) as exc:
                self._input_failed(exc)
                return
            try:
                await _send(send, item)
            except anyio.BrokenResourceError:
                return  # every worker is gone

    async def _wait_for_window(self) -> bool:
        window = self._window
        assert window is not None
        try:
            window.acquire_nowait()
        except anyio.WouldBlock:
            with anyio.CancelScope() as scope:
                self._window_wait = scope
                try:
                    await window.acquire()
                finally:
                    self._window_wait = None
            return not scope.cancelled_caught
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        self.stopped = True


class _Pipeline:
    """The workers of one stream, in a task group the caller provides."""

    def __init__(
        self,
        jobs: Iterable[object] | AsyncIterable[object],
        run_item: RunItem,
        *,
        control: BatchControl,
        workers: int,
        window: anyio.Semaphore | None,
        admit: Admit | None,
    ) -> None:
        self._feed = _Feed(jobs, admit=admit, window=window)
        self._run_item = run_item
        self._control = control
        self._workers = workers
        self._started = 0
        control.on_drain(self._feed.stop)
        self.cut_short: ClientStateError | None = None

    @property
    def input_failure(self) -> BaseException | None:
        """The exception the jobs iterable raised, if it did."""
        return self._feed.failure

    async def run_in(
        self, send_results: MemoryObjectSendStream[_Pair], call_scope: Callable[[], Any]
    ) -> None:
        """:meth:`run` inside the client's call scope; a client closing under it is noted."""
        try:
            with call_scope():
                await self.run(send_results)
        except ClientStateError as exc:
            self.cut_short = exc
        finally:
            send_results.close()

    async def run(self, send_results: MemoryObjectSendStream[_Pair]) -> None:
        """Work until the input ends (or is drained) and every job taken is done."""
        try:
            async with send_results, anyio.create_task_group() as task_group:
                self._feed.start(task_group)
                self._start_worker(task_group, send_results)
        finally:
            self._feed.close()

    def _start_worker(
        self, task_group: TaskGroup, send_results: MemoryObjectSendStream[_Pair]
    ) -> None:
        self._started += 1
        task_group.start_soon(self._work, task_group, send_results.clone())

    async def _work(
        self, task_group: TaskGroup, send_results: MemoryObjectSendStream[_Pair]
    ) -> None:
        async with send_results:
            while (taken := await self._feed.take()) is not None:
                if self._started < self._workers:
                    # The input had work for this worker: the next may find some too.
                    # Started as the input proves long enough, a 5-job batch under
                    # max_concurrency=1,000 starts 6 tasks, not 2,000.
                    self._start_worker(task_group, send_results)
                index, item = taken
                result = await self._run_item(index, item, self._control)
                try:
                    await _send(send_results, (index, result))
                except anyio.BrokenResourceError:
                    self._feed.stop()
                    return  # the consumer left (a bare loop abandoned): nobody wants it


class JobStream:
    """Results of a batch as they finish: an async iterator, and an async context manager.

    >>> async def main(client, jobs):  # doctest: +SKIP
    ...     async with client.stream(jobs) as results:
    ...         async for result in results:
    ...             print(result.job_id, result.ok, result.urls)
    ...             if time_to_stop():
    ...                 results.drain()   # the jobs in flight still come

    Entered, it owns its task group: leaving the block cancels the jobs still
    running. Iterated bare, it runs in a task of the client's, cancelled when the
    iterator is dropped or the client closes. A failing job never raises here:
    its result carries the error. An exception raised by the jobs iterable
    stops the feeding; the jobs already started finish and are yielded, then it
    is raised.
    """

    def __init__(
        self,
        jobs: Iterable[object] | AsyncIterable[object],
        run_item: RunItem,
        *,
        control: BatchControl,
        workers: int,
        ordered: bool,
        window: int,
        admit: Admit | None = None,
        call_scope: Callable[[], Any],
        detach: Callable[[Callable[[], Coroutine[Any, Any, None]]], asyncio.Task[None]],
    ) -> None:
        self._control = control
        self._window = anyio.Semaphore(window) if ordered else None
        self._pipeline = _Pipeline(
            check_jobs(jobs),
            run_item,
            control=control,
            workers=workers,
            window=self._window,
            admit=admit,
        )
        self._send, self._receive = anyio.create_memory_object_stream[_Pair](workers)
        self._call_scope = call_scope
        self._detach = detach
        self._task_group: TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._reorder: dict[int, JobResult] = {}
        self._next_index = 0
        self._finished = False

    @property
    def stopped_by(self) -> NotAttemptedError | None:
        """Set when the circuit breaker opened: why jobs were not attempted."""
        return self._control.stopped_by

    def drain(self) -> None:
        """Take no more jobs and start no more submissions; in-flight jobs still come.

        Submissions of running jobs not yet started end as
        :class:`~nebula_async.NotAttemptedError` (``reason="drained"``). Cancelling
        (leaving the ``async with`` block) stays the immediate stop.
        """
        self._control.drain()

    async def __aenter__(self) -> Self:
        if self._task_group is not None or self._task is not None:
            raise ClientStateError("this stream was already started")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._pipeline.run_in, self._send, self._call_scope)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()  # early exit: stop the jobs still running
        try:
            # The pipeline never raises; the block's own exception (if any) goes on
            # as it is, not wrapped in an ExceptionGroup.
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._receive.close()
        return None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JobResult:
        return (await self.next_pair())[1]

    async def next_pair(self) -> tuple[int, JobResult]:
        """The next ``(input index, result)``; ``StopAsyncIteration`` at the end."""
        if self._task_group is None and self._task is None:
            # The task holds the pipeline, not this stream, so dropping the stream
            # (a bare loop left with break) reaches __del__, which cancels it.
            self._task = self._detach(partial(self._pipeline.run_in, self._send, self._call_scope))
        if self._window is None:
            return await self._receive_one()
        while self._next_index not in self._reorder:
            index, result = await self._receive_one()
            self._reorder[index] = result
        index = self._next_index
        self._next_index += 1
        self._window.release()
        return index, self._reorder.pop(index)

    async def _receive_one(self) -> tuple[int, JobResult]:
        if not self._finished:
            try:
                return await _receive(self._receive)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._finished = True
                self._receive.close()
            except BaseException:
                # A bare loop cancelled while waiting: stop its jobs before leaving.
                if self._task is not None:
                    await _stop(self._task)
                raise
        if self._pipeline.cut_short is not None:
            raise self._pipeline.cut_short
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            task.result()  # surfaces a bug in the pipeline rather than hiding it
        if self._pipeline.input_failure is not None:
            raise self._pipeline.input_failure
        raise StopAsyncIteration

    def __del__(self) -> None:
        # A bare iteration abandoned (break), or a stream never started: stop and close.
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()
        if hasattr(self, "_receive"):
            self._receive.close()
            if task is None and self._task_group is None:
                self._send.close()


# anyio's send() and receive() pass through the event loop even when they need not
# wait (a checkpoint each). Measured with the workers taking from one feed: run_batch
# 246.2k instructions per job with these two helpers, 342.6k with plain send() and
# receive() (library only, callgrind): about 13% of a whole request. Every job still
# reaches a real await (its HTTP request), so cancellation is as prompt as ever.
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


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a detached pipeline and wait for it (shielded, within a grace period)."""
    task.cancel()
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_GRACE_S):
        await asyncio.wait({task})


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
