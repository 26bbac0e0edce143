"""The client's lifecycle: ``new -> open -> (draining ->) closed``, owned by one object.

The state machine on its own, then the client: misuse before ``async with`` and
after close raises ``ClientStateError`` (both a ``NebulaError`` and a
``RuntimeError``), and ``aclose()`` wakes at once the callers sleeping in a
retry backoff or a limiter pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _gated import GatedServer, request_for, wait_until

import nebula_async as na
from nebula_async._exceptions import ClientStateError
from nebula_async._lifecycle import Lifecycle, State
from nebula_async._limiter import LimiterStatistics, Outcome
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio


# -- the state machine ---------------------------------------------------------------------


def test_client_state_error_is_a_nebula_error_and_a_runtime_error() -> None:
    error = ClientStateError("closed")
    assert isinstance(error, na.NebulaError)
    assert isinstance(error, RuntimeError)


def test_new_open_draining_closed() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.state is State.NEW
    with pytest.raises(ClientStateError, match="async with"):
        lifecycle.require_open()
    lifecycle.open()
    assert lifecycle.state is State.OPEN
    lifecycle.require_open()
    with pytest.raises(ClientStateError, match="open"):
        lifecycle.open()  # once only
    lifecycle.drain()
    assert lifecycle.state is State.DRAINING
    with pytest.raises(ClientStateError, match="draining"):
        lifecycle.require_open()
    lifecycle.drain()  # again: still draining
    assert lifecycle.state is State.DRAINING
    assert lifecycle.close() is True
    assert lifecycle.state is State.CLOSED
    assert lifecycle.close() is False  # closing twice is harmless
    with pytest.raises(ClientStateError, match="closed"):
        lifecycle.require_open()
    lifecycle.drain()  # a drain after close changes nothing
    assert lifecycle.state is State.CLOSED
    with pytest.raises(ClientStateError, match="closed"):
        lifecycle.open()  # a closed client never reopens


def test_open_straight_to_closed_and_new_straight_to_closed() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    assert lifecycle.close() is True
    never_opened = Lifecycle()
    assert never_opened.close() is True
    with pytest.raises(ClientStateError):
        never_opened.open()


class Stream:
    def __init__(self) -> None:
        self.drained = 0

    def drain(self) -> None:
        self.drained += 1


def test_drain_reaches_every_watched_stream_and_streams_watched_later() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    first, second = Stream(), Stream()
    lifecycle.watch(first)
    lifecycle.watch(second)
    lifecycle.drain()
    assert (first.drained, second.drained) == (1, 1)
    late = Stream()
    lifecycle.watch(late)  # watched while draining: drained at once
    assert late.drained == 1


def test_streams_are_watched_weakly() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    lifecycle.watch(Stream())  # dropped at once: no reference kept
    assert len(lifecycle._streams) == 0


async def test_close_cancels_running_calls_which_raise_client_state_error() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            with lifecycle.call():
                await anyio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as task_group:
        for _ in range(3):
            task_group.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        lifecycle.close()
    assert len(outcome) == 3
    assert all(isinstance(exc, ClientStateError) for exc in outcome)
    assert lifecycle.still_running() == 0  # every call deregistered


async def test_a_call_that_ends_normally_or_is_cancelled_otherwise_is_left_alone() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    with lifecycle.call():
        await anyio.lowlevel.checkpoint()
    with anyio.move_on_after(0.01) as scope:
        with lifecycle.call():  # an outer cancellation stays a cancellation
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert lifecycle.state is State.OPEN
    assert lifecycle.still_running() == 0


async def test_closing_takes_back_its_cancel_so_the_callers_task_goes_on() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    entered = anyio.Event()
    after: list[int] = []

    async def caller() -> None:
        try:
            with lifecycle.call():
                entered.set()
                await anyio.sleep_forever()
        except ClientStateError:
            after.append(0)
        task = asyncio.current_task()
        assert task is not None
        after.append(task.cancelling())
        await anyio.sleep(0.01)  # no cancel left pending: the caller's task goes on
        after.append(-1)

    task = asyncio.get_running_loop().create_task(caller())
    await entered.wait()
    lifecycle.close()
    await asyncio.wait({task}, timeout=2)
    task.result()
    assert after == [0, 0, -1]


async def test_a_call_cancelled_by_close_and_by_its_caller_at_once_stays_cancelled() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    entered = anyio.Event()

    async def call() -> None:
        with lifecycle.call():
            entered.set()
            await anyio.sleep_forever()

    for outer_first in (True, False):
        task = asyncio.get_running_loop().create_task(call())
        await entered.wait()
        entered = anyio.Event()
        if outer_first:
            task.cancel()  # the caller's own cancellation, in the same loop iteration
        lifecycle.close()
        if not outer_first:
            task.cancel()
        await asyncio.wait({task}, timeout=2)
        assert task.cancelled()  # a cancellation, not a ClientStateError
        lifecycle = Lifecycle()
        lifecycle.open()


async def test_an_anyio_deadline_in_the_same_iteration_as_close_stays_a_cancellation() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    with anyio.CancelScope() as scope:
        with lifecycle.call():
            scope.cancel()
            asyncio.get_running_loop().call_soon(lifecycle.close)
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert lifecycle.still_running() == 0


async def test_nested_calls_in_one_task_end_as_one_client_state_error() -> None:
    lifecycle = Lifecycle()
    lifecycle.open()
    seen: list[str] = []

    async def caller() -> None:
        try:
            with lifecycle.call():
                try:
                    with lifecycle.call():
                        await anyio.sleep_forever()
                except asyncio.CancelledError:
                    seen.append("inner: cancelled")  # the outer call's cancel still pending
                    raise
        except ClientStateError:
            seen.append("outer: ClientStateError")
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0

    task = asyncio.get_running_loop().create_task(caller())
    await anyio.wait_all_tasks_blocked()
    lifecycle.close()
    await asyncio.wait({task}, timeout=2)
    task.result()
    assert seen == ["inner: cancelled", "outer: ClientStateError"]


async def test_a_call_whose_own_task_closes_the_client_ends_with_client_state_error() -> None:
    # e.g. a custom limiter acting as a kill switch: closing is the immediate stop
    # for the call that closed too, and what the closing itself awaits is shielded.
    lifecycle = Lifecycle()
    lifecycle.open()
    closed_fully: list[bool] = []
    with pytest.raises(ClientStateError):  # noqa: PT012 - the close and the await both matter
        with lifecycle.call():
            lifecycle.close()
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)  # what aclose() awaits: not cut short
                closed_fully.append(True)
            await anyio.sleep(1)  # the call's next wait is cancelled
    assert closed_fully == [True]
    assert lifecycle.still_running() == 0


# -- the client ----------------------------------------------------------------------------


def client_for(base_url: str = "http://127.0.0.1:1", **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("timeout", 5.0)
    return na.NebulaClient(base_url=base_url, **options)


MISUSES: list[tuple[str, Callable[[na.NebulaClient], Any]]] = [
    ("img2img", lambda c: c.img2img(request_for("a"))),
    ("run_job", lambda c: c.run_job(request_for("a"))),
    ("run_batch", lambda c: c.run_batch([request_for("a")])),
]


@pytest.mark.parametrize(("name", "call"), MISUSES, ids=[name for name, _ in MISUSES])
async def test_calls_before_async_with_and_after_close_raise_client_state_error(
    name: str, call: Callable[[na.NebulaClient], Any]
) -> None:
    async with MockNebulaServer() as server:
        client = client_for(server.base_url)
        with pytest.raises(ClientStateError, match="async with"):
            await call(client)
        with pytest.raises(ClientStateError, match="async with"):
            client.stream([request_for("a")])
        async with client:
            await call(client)
        with pytest.raises(ClientStateError, match="closed"):
            await call(client)
        with pytest.raises(ClientStateError, match="closed"):
            client.stream([request_for("a")])
        with pytest.raises(RuntimeError):  # what code written before ClientStateError catches
            await call(client)
    assert server.request_count == 1


async def test_a_client_opens_once_and_its_state_shows_in_its_repr() -> None:
    async with MockNebulaServer() as server:
        client = client_for(server.base_url)
        assert "state=new" in repr(client)
        async with client:
            assert "state=open" in repr(client)
            with pytest.raises(ClientStateError):
                await client.__aenter__()
            client.drain()
            assert "state=draining" in repr(client)
        assert "state=closed" in repr(client)
        with pytest.raises(ClientStateError, match="closed"):
            async with client:
                pass
        await client.aclose()  # closing again is harmless


async def test_a_stream_made_while_open_refuses_to_start_after_close() -> None:
    async with MockNebulaServer() as server:
        client = client_for(server.base_url)
        async with client:
            stream = client.stream([request_for("a")])
        with pytest.raises(ClientStateError), anyio.fail_after(2):
            async for _ in stream:
                pass
    assert server.request_count == 0


async def test_aclose_wakes_a_caller_sleeping_in_a_retry_backoff() -> None:
    long_backoff = na.RetryPolicy(max_attempts=5, backoff_base=30.0, backoff_max=30.0)
    async with MockNebulaServer(faults={"http_503": 1.0}) as server:
        client = client_for(server.base_url, retry=long_backoff, random=lambda: 1.0)
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await client.img2img(request_for("a"))
            except BaseException as exc:
                outcome.append(exc)

        async with client, anyio.create_task_group() as task_group:
            task_group.start_soon(call)
            await wait_until(lambda: server.request_count == 1)
            await anyio.sleep(0.05)  # now in its 30 s backoff
            started = time.monotonic()
            await client.aclose()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClientStateError)
    assert server.request_count == 1


async def test_aclose_wakes_callers_held_in_a_limiter_pause() -> None:
    # A 429 with Retry-After: 30 pauses every caller of the client's limiter.
    async with MockNebulaServer(fault_script=["http_429"], retry_after=30) as server:
        client = client_for(server.base_url, max_concurrency=4)
        outcome: list[BaseException] = []

        async def call(prompt: str) -> None:
            try:
                await client.img2img(request_for(prompt))
            except BaseException as exc:
                outcome.append(exc)

        async with client, anyio.create_task_group() as task_group:
            task_group.start_soon(call, "first")
            await wait_until(lambda: client.statistics().paused_until is not None)
            for prompt in ("b", "c", "d"):
                task_group.start_soon(call, prompt)
            await anyio.sleep(0.05)
            started = time.monotonic()
            await client.aclose()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert len(outcome) == 4
    assert all(isinstance(exc, ClientStateError) for exc in outcome)
    assert server.request_count == 1


class QuietLimiter:
    """A Limiter that lets everything through and hears nothing; the ones below
    change one method each."""

    async def acquire(self) -> object:
        return None

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        pass

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(current_rate=0.0)

    async def aclose(self) -> None:
        pass


class StuckLimiter(QuietLimiter):
    """A limiter whose acquire never returns: only cancellation gets a caller out."""

    async def acquire(self) -> object:
        await anyio.sleep_forever()


async def test_aclose_wakes_callers_of_any_limiter_and_a_batch_on_it() -> None:
    async with GatedServer(opened=True) as server:
        client = client_for(server.base_url, rate_limit=StuckLimiter())
        outcome: list[BaseException] = []

        async def batch() -> None:
            try:
                await client.run_batch(request_for(f"job{i}") for i in range(10))
            except BaseException as exc:
                outcome.append(exc)

        async with client, anyio.create_task_group() as task_group:
            task_group.start_soon(batch)
            await anyio.sleep(0.1)
            started = time.monotonic()
            await client.aclose()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClientStateError)
    assert server.arrivals == []


async def test_close_during_a_drain_stops_the_jobs_in_flight_at_once() -> None:
    async with GatedServer() as server:
        client = client_for(server.base_url, max_concurrency=2)
        outcome: list[BaseException] = []

        async def batch() -> None:
            try:
                await client.run_batch(request_for(f"job{i}") for i in range(10))
            except BaseException as exc:
                outcome.append(exc)

        async with client, anyio.create_task_group() as task_group:
            task_group.start_soon(batch)
            await wait_until(lambda: server.in_flight == 2)
            client.drain()  # the two in flight would finish...
            await anyio.sleep(0.05)
            started = time.monotonic()
            await client.aclose()  # ... but closing is the immediate stop
        elapsed = time.monotonic() - started
        await wait_until(lambda: len(server.abandoned) == 2, within=2)
    assert elapsed < 1.0
    assert isinstance(outcome[0], ClientStateError)


async def test_aclose_stops_a_fanned_out_job_with_client_state_error() -> None:
    async with GatedServer() as server:
        client = client_for(server.base_url, max_concurrency=3)
        outcome: list[BaseException] = []

        async def job() -> None:
            try:
                await client.run_job(na.Job(request_for("fan", n=2), images=12))
            except BaseException as exc:
                outcome.append(exc)

        async with client, anyio.create_task_group() as task_group:
            task_group.start_soon(job)
            await wait_until(lambda: server.in_flight == 3)  # 3 of its 6 calls in flight
            started = time.monotonic()
            await client.aclose()
        elapsed = time.monotonic() - started
        await wait_until(lambda: len(server.abandoned) == 3, within=2)
    assert elapsed < 1.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClientStateError), repr(outcome[0])
    assert len(server.arrivals) == 3


# -- why a cancel scope per call (a review of Task.cancel()/uncancel() instead) -----------


@pytest.mark.parametrize("gap", [0, 1, 3])
async def test_a_close_just_after_the_callers_own_deadline_leaves_the_caller_moving_on(
    gap: int,
) -> None:
    # A fanned-out run_job unwinding from the caller's anyio deadline when the client
    # closes `gap` loop iterations later: the caller's scope must still catch it
    # (with a native cancel, a CancelledError escaped it and killed the task).
    async with GatedServer() as server:
        client = client_for(server.base_url, max_concurrency=3)
        async with client:
            scopes: list[anyio.CancelScope] = []

            async def caller() -> bool:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await client.run_job(na.Job(request_for("fan", n=2), images=12))
                return scope.cancelled_caught

            task = asyncio.get_running_loop().create_task(caller())
            await wait_until(lambda: server.in_flight == 3)
            scopes[0].cancel()  # the caller's deadline
            for _ in range(gap):
                await asyncio.sleep(0)
            await client.aclose()
            await asyncio.wait({task}, timeout=3)
    assert task.done()
    assert not task.cancelled()
    assert task.result() is True


class SwallowsOneCancel(QuietLimiter):
    """A limiter whose wait swallows one CancelledError (a timed read that does so)."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()

    async def acquire(self) -> object:
        self.waiting.set()
        with contextlib.suppress(asyncio.CancelledError):  # the cancel must come again
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)
        return None


async def test_aclose_stops_a_call_even_if_something_in_it_swallows_one_cancel() -> None:
    async with MockNebulaServer() as server:
        limiter = SwallowsOneCancel()
        client = client_for(server.base_url, rate_limit=limiter)
        async with client:
            task = asyncio.get_running_loop().create_task(client.img2img(request_for("a")))
            await limiter.waiting.wait()
            started = time.monotonic()
            await client.aclose()
            await asyncio.wait({task}, timeout=3)
        elapsed = time.monotonic() - started
        assert isinstance(task.exception(), ClientStateError)
        assert elapsed < 0.3
        assert server.request_count == 0


class ClosesItsClient(QuietLimiter):
    """A limiter acting as a kill switch: it closes the client at the first answer."""

    client: na.NebulaClient | None = None

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        assert self.client is not None
        await self.client.aclose()


async def test_aclose_from_inside_a_bare_streams_worker_does_not_wait_for_itself() -> None:
    # aclose() waits for detached pipelines, but not for the one it runs in: that
    # pipeline waits for this very worker (it deadlocked before).
    async with MockNebulaServer() as server:
        limiter = ClosesItsClient()
        client = client_for(server.base_url, rate_limit=limiter)
        limiter.client = client
        async with client:

            async def consume() -> list[na.JobResult]:
                return [r async for r in client.stream([request_for("a"), request_for("b")])]

            task = asyncio.get_running_loop().create_task(consume())
            await asyncio.wait({task}, timeout=3)
            assert task.done()
            assert isinstance(task.exception(), ClientStateError)
        assert "state=closed" in repr(client)


class ShieldedLimiter(QuietLimiter):
    """A limiter whose acquire holds a shielded section (its own bookkeeping, say a
    Redis write that must not be cut): close cannot cut it short, only wait."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.events: list[str] = []
        self.inside = anyio.Event()

    async def acquire(self) -> object:
        with anyio.CancelScope(shield=True):
            self.inside.set()
            await anyio.sleep(self.hold_s)
        self.events.append("acquire returned")
        return None

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        self.events.append(f"record {outcome.name}")

    async def aclose(self) -> None:
        self.events.append("aclose")


class Makes:
    """A LimiterFactory: the client owns (and closes) what it makes."""

    def __init__(self, limiter: na.Limiter) -> None:
        self.limiter = limiter

    def create_limiter(self) -> na.Limiter:
        return self.limiter


async def _close_during_a_shielded_acquire(
    client: na.NebulaClient, limiter: ShieldedLimiter
) -> tuple[asyncio.Task[na.ImageResult], float]:
    """Start an img2img, close the client while its acquire is shielded; the call's
    task and how long aclose() took."""
    task = asyncio.get_running_loop().create_task(client.img2img(request_for("a")))
    await limiter.inside.wait()
    started = time.monotonic()
    await client.aclose()
    return task, time.monotonic() - started


async def test_aclose_waits_for_cancelled_calls_before_closing_what_they_use() -> None:
    async with MockNebulaServer() as server:
        limiter = ShieldedLimiter(hold_s=0.3)
        client = client_for(server.base_url, rate_limit=Makes(limiter))
        async with client:
            task, elapsed = await _close_during_a_shielded_acquire(client, limiter)
            # The call ended before the limiter it used was closed (having told it
            # of its slot, cancelled on the way), and aclose returned only then.
            assert task.done()
            assert isinstance(task.exception(), ClientStateError)
            assert limiter.events == ["acquire returned", "record FAILED", "aclose"]
            assert 0.2 < elapsed < 2.0
        assert server.request_count == 0


async def test_aclose_closes_anyway_after_its_grace_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("nebula_async._client.CLOSE_GRACE_S", 0.2)
    async with MockNebulaServer() as server:
        limiter = ShieldedLimiter(hold_s=1.0)
        client = client_for(server.base_url, rate_limit=Makes(limiter))
        async with client:
            task, elapsed = await _close_during_a_shielded_acquire(client, limiter)
            assert 0.15 < elapsed < 0.8
            assert not task.done()
            assert limiter.events == ["aclose"]
            assert "1 call(s) still running" in caplog.text
            await asyncio.wait({task}, timeout=3)
            assert isinstance(task.exception(), ClientStateError)
        assert server.request_count == 0


async def test_aclose_from_inside_a_stream_in_async_with_does_not_wait_for_itself() -> None:
    # The pipeline's call is hosted by the caller's task; the worker that closes
    # runs inside it, so aclose must not wait for it (it would wait for itself).
    async with MockNebulaServer() as server:
        limiter = ClosesItsClient()
        client = client_for(server.base_url, rate_limit=limiter)
        limiter.client = client
        async with client:
            with anyio.fail_after(3):
                outcome = await _consume_in_async_with(client)
        assert isinstance(outcome, ClientStateError)
        assert "state=closed" in repr(client)


async def _consume_in_async_with(client: na.NebulaClient) -> BaseException | None:
    try:
        async with client.stream([request_for("a"), request_for("b")]) as results:
            async for _ in results:
                pass
    except ClientStateError as exc:
        return exc
    return None


async def test_aclose_from_inside_a_fanned_out_job_does_not_wait_for_itself() -> None:
    async with MockNebulaServer() as server:
        limiter = ClosesItsClient()
        client = client_for(server.base_url, rate_limit=limiter)
        limiter.client = client
        async with client:
            with anyio.fail_after(3), pytest.raises(ClientStateError):
                await client.run_job(na.Job(request_for("a"), images=4))
        assert "state=closed" in repr(client)
