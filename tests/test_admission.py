"""One-off calls gathered by the thousand: at most ``max_concurrency`` are under
way at once; the rest wait before they build anything, first come first served,
and a close or their caller's cancellation ends them there. A call sleeping in a
backoff lends its place (at most ``max_concurrency`` are lent at once) and,
awake, takes the next one that comes free before any waiting call.

A gathered call that has not started holds only its coroutine, so 100,000 calls
gathered at once cost what 100,000 coroutines cost (docs/benchmarks.md has the
figures), and the first sends go out before the last call has started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _gated import GatedServer, request_for, wait_until

import nebula_async as na
from nebula_async._admission import Admission
from nebula_async._exceptions import ClientStateError

pytestmark = pytest.mark.anyio

CALLS = 12
CONCURRENCY = 2
UNDER_WAY = CONCURRENCY
#: The calls of every test, made in this order.
PROMPTS = [str(i) for i in range(CALLS)]


def client_for(base_url: str, concurrency: int = CONCURRENCY, **options: Any) -> na.NebulaClient:
    return na.NebulaClient(
        token="mock-token", base_url=base_url, max_concurrency=concurrency, timeout=5.0, **options
    )


#: Every backoff exactly ``BACKOFF`` seconds (full jitter drawn at its top).
BACKOFF = 0.3
RETRIES = {"retry": na.RetryPolicy(backoff_base=BACKOFF), "random": lambda: 1.0}


def failing_first(*prompts: str) -> Any:
    """A script: a 503 for the first attempt of each of ``prompts``."""
    return lambda prompt, attempt: 503 if prompt in prompts and attempt == 1 else None


async def _img2img(client: na.NebulaClient, prompt: str) -> Any:
    return (await client.img2img(request_for(prompt))).urls


async def _run_job(client: na.NebulaClient, prompt: str) -> Any:
    result = await client.run_job(request_for(prompt))
    if result.error is not None:
        raise result.error
    return result.urls


ONE_OFF_CALLS = [pytest.param(_img2img, id="img2img"), pytest.param(_run_job, id="run_job")]
Call = Callable[[na.NebulaClient, str], Awaitable[Any]]


def _gather(
    client: na.NebulaClient, call: Call, prompts: list[str], outcomes: dict[str, Any]
) -> Callable[[], Awaitable[None]]:
    """Start ``call`` for every prompt in order; their outcomes land in ``outcomes``."""

    async def one(prompt: str) -> None:
        try:
            outcomes[prompt] = await call(client, prompt)
        except BaseException as exc:
            outcomes[prompt] = exc
            if not isinstance(exc, Exception):
                raise

    async def run_all() -> None:
        async with anyio.create_task_group() as task_group:
            for prompt in prompts:
                task_group.start_soon(one, prompt)
                await anyio.lowlevel.checkpoint()  # starts in this order

    return run_all


@pytest.mark.parametrize("call", ONE_OFF_CALLS)
async def test_calls_beyond_the_concurrency_wait_to_start_in_order(call: Call) -> None:
    outcomes: dict[str, Any] = {}
    async with GatedServer() as server, client_for(server.base_url) as client:
        run_all = _gather(client, call, PROMPTS, outcomes)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_all)
            await wait_until(lambda: server.in_flight == CONCURRENCY)
            await wait_until(lambda: client.statistics().calls_waiting == CALLS - UNDER_WAY)
            stats = client.statistics()
            assert stats.in_flight == CONCURRENCY
            assert stats.attempts == CONCURRENCY
            # The waiting ones have not started: no call state of theirs exists.
            assert client._lifecycle.still_running() == UNDER_WAY
            server.open()
        assert client.statistics().calls_waiting == 0
    # First come, first served; each sent once (answers freed together may reach
    # the server in another order).
    assert server.arrivals[:CONCURRENCY] == PROMPTS[:CONCURRENCY]
    assert sorted(server.arrivals, key=int) == PROMPTS
    assert all(isinstance(outcomes[p], list) and len(outcomes[p]) == 1 for p in PROMPTS)


@pytest.mark.parametrize("call", ONE_OFF_CALLS)
async def test_close_ends_the_calls_waiting_to_start_and_sends_nothing_more(call: Call) -> None:
    outcomes: dict[str, Any] = {}
    async with GatedServer() as server:
        client = client_for(server.base_url)
        async with client:
            run_all = _gather(client, call, PROMPTS, outcomes)
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(run_all)
                await wait_until(lambda: client.statistics().calls_waiting == CALLS - UNDER_WAY)
                started = time.monotonic()
                await client.aclose()
                elapsed = time.monotonic() - started
        server.open()
        await anyio.sleep(0.05)
    assert elapsed < 1.0
    assert server.arrivals == PROMPTS[:CONCURRENCY]
    for prompt in PROMPTS:
        assert isinstance(outcomes[prompt], ClientStateError), (prompt, outcomes[prompt])
    assert client.statistics().calls_waiting == 0


async def test_a_call_cancelled_while_it_waits_to_start_leaves_its_place_to_the_next() -> None:
    outcomes: dict[str, Any] = {}
    leaving = PROMPTS[-2]

    async def img2img_or_leave(client: na.NebulaClient, prompt: str) -> Any:
        if prompt != leaving:
            return await _img2img(client, prompt)
        with anyio.move_on_after(0.1):
            return await _img2img(client, prompt)
        return "left"

    async with GatedServer() as server, client_for(server.base_url) as client:
        run_all = _gather(client, img2img_or_leave, PROMPTS, outcomes)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_all)
            await wait_until(lambda: outcomes.get(leaving) == "left")
            assert client.statistics().calls_waiting == CALLS - UNDER_WAY - 1
            server.open()
    assert sorted(server.arrivals, key=int) == [p for p in PROMPTS if p != leaving]
    assert all(isinstance(outcomes[p], list) for p in PROMPTS if p != leaving)


async def test_a_drain_lets_the_calls_already_waiting_to_start_run() -> None:
    # They were called before the drain: as before there was a queue, they run; a
    # call made after the drain is refused at once.
    outcomes: dict[str, Any] = {}
    async with GatedServer() as server, client_for(server.base_url) as client:
        run_all = _gather(client, _img2img, PROMPTS, outcomes)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_all)
            await wait_until(lambda: client.statistics().calls_waiting == CALLS - UNDER_WAY)
            client.drain()
            with pytest.raises(ClientStateError, match="draining"):
                await client.img2img(request_for("late"))
            server.open()
    assert sorted(server.arrivals, key=int) == PROMPTS
    assert all(isinstance(outcomes[p], list) for p in PROMPTS)


@pytest.mark.parametrize("call", ONE_OFF_CALLS)
async def test_with_one_slot_the_calls_are_sent_in_the_order_they_were_made(call: Call) -> None:
    # One request in flight at a time: each send follows the answer before it, so
    # the arrivals are the admission order itself.
    outcomes: dict[str, Any] = {}
    async with GatedServer(opened=True) as server, client_for(server.base_url, 1) as client:
        await _gather(client, call, PROMPTS, outcomes)()
    assert server.arrivals == PROMPTS
    assert server.max_in_flight == 1


async def test_a_call_sleeping_in_a_backoff_lends_its_place_to_the_next() -> None:
    # One place: while "0" sleeps after its 503, "1" and "2" run in turn; "0"
    # retries once awake.
    outcomes: dict[str, Any] = {}
    server = GatedServer(opened=True, script=failing_first("0"))
    async with server, client_for(server.base_url, 1, **RETRIES) as client:
        started = time.monotonic()
        await _gather(client, _img2img, ["0", "1", "2"], outcomes)()
        elapsed = time.monotonic() - started
    assert server.arrivals == ["0", "1", "2", "0"]
    assert server.max_in_flight == 1
    assert all(isinstance(outcomes[p], list) for p in "012")
    assert BACKOFF <= elapsed < 2.0


async def test_no_more_places_are_lent_than_there_are_and_sleepers_go_first() -> None:
    # One place, lent by "0"; "1" fails too, and keeps it while it sleeps, so at
    # most two calls ever hold their state. Awake, "0" takes the place "1" frees
    # before "2", which was waiting since the start, gets one.
    outcomes: dict[str, Any] = {}
    server = GatedServer(opened=True, script=failing_first("0", "1"))
    async with server, client_for(server.base_url, 1, **RETRIES) as client:
        run_all = _gather(client, _img2img, ["0", "1", "2"], outcomes)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_all)
            await wait_until(lambda: client.statistics().retries == 2)
            assert client._lifecycle.still_running() == 2
            assert client.statistics().calls_waiting == 1
    assert server.arrivals == ["0", "1", "1", "0", "2"]
    assert all(isinstance(outcomes[p], list) for p in "012")


async def test_a_sleeper_cancelled_while_it_waits_for_its_place_again_gives_none_back() -> None:
    outcomes: dict[str, Any] = {}
    server = GatedServer(opened=True, script=failing_first("0"))

    async def img2img_or_leave(client: na.NebulaClient, prompt: str) -> Any:
        with anyio.move_on_after(3 * BACKOFF):
            return await _img2img(client, prompt)
        return "left"

    async with server, client_for(server.base_url, 1, **RETRIES) as client:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_gather(client, img2img_or_leave, ["0"], outcomes))
            await wait_until(lambda: client.statistics().retries == 1)
            server.close_gate()  # "1" takes the place "0" lent, and holds it
            task_group.start_soon(_gather(client, _img2img, ["1"], outcomes))
            await wait_until(lambda: server.in_flight == 1)
            await wait_until(lambda: client.statistics().calls_waiting == 1)  # "0", awake
            await wait_until(lambda: outcomes.get("0") == "left")
            assert client.statistics().calls_waiting == 0
            # Still one place, "1"'s: three more calls all wait.
            task_group.start_soon(_gather(client, _img2img, ["2", "3", "4"], outcomes))
            await wait_until(lambda: client.statistics().calls_waiting == 3)
            assert client._lifecycle.still_running() == 1
            server.open()
    assert server.arrivals == ["0", "1", "2", "3", "4"]
    assert all(isinstance(outcomes[p], list) for p in "1234")


async def test_a_place_handed_to_a_sleeper_cancelled_that_moment_goes_to_the_next() -> None:
    admission = Admission(1)
    lent = anyio.Event()
    order: list[str] = []
    tasks: list[asyncio.Task[Any]] = []

    async def sleeper() -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        place = await admission.take()
        try:
            lent.set()
            await place.sleep(0)  # wakes at once, and waits: the test holds the place
            order.append("sleeper ran")
        finally:
            place.leave()

    async def newcomer() -> None:
        (await admission.take()).leave()
        order.append("newcomer ran")

    with anyio.fail_after(5):  # a lost place hangs here, not at pytest's timeout
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(sleeper)
            await lent.wait()
            mine = await admission.take()  # the place the sleeper lent
            await wait_until(lambda: admission.waiting == 1)  # the sleeper, awake
            task_group.start_soon(newcomer)
            await wait_until(lambda: admission.waiting == 2)
            mine.leave()
            # Leaving handed the place to the sleeper; cancelled (natively, as
            # asyncio.wait_for does) before it runs, it passes the place on.
            tasks[0].cancel()
    assert order == ["newcomer ran"]
    assert admission.waiting == 0
    with anyio.fail_after(1):
        (await admission.take()).leave()


async def test_a_place_handed_to_a_waiter_cancelled_that_moment_goes_to_a_sleeper() -> None:
    admission = Admission(1)
    mine = await admission.take()
    order: list[str] = []

    async def waiter() -> None:
        (await admission.take()).leave()
        order.append("waiter ran")

    async def sleeper_back() -> None:
        await admission._take_back()  # the second half of Place.sleep: awake, no place free
        order.append("sleeper ran")
        admission._give()

    waiting = asyncio.create_task(waiter())
    await wait_until(lambda: admission.waiting == 1)
    with anyio.fail_after(1):
        back = asyncio.create_task(sleeper_back())  # its first step comes before the waiter's
        mine.leave()  # hands the place to the waiter...
        waiting.cancel()  # ...cancelled (natively, as asyncio.wait_for does) before it runs
        await back
    assert order == ["sleeper ran"]
    assert waiting.cancelled()
    assert admission.waiting == 0
    with anyio.fail_after(1):
        (await admission.take()).leave()


async def test_a_waiter_cancelled_just_before_a_place_comes_free_is_passed_over() -> None:
    admission = Admission(1)
    mine = await admission.take()
    order: list[str] = []

    async def waiter(name: str) -> None:
        (await admission.take()).leave()
        order.append(name)

    first = asyncio.create_task(waiter("first"))
    second = asyncio.create_task(waiter("second"))
    await wait_until(lambda: admission.waiting == 2)
    first.cancel()  # natively: its turn is cancelled, but its task has not run yet
    mine.leave()  # so the place goes to the second
    with anyio.fail_after(1):
        await second
    assert first.cancelled()
    assert order == ["second"]
    assert admission.waiting == 0
    with anyio.fail_after(1):
        (await admission.take()).leave()
