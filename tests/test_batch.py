"""End-to-end tests of ``client.stream()`` and ``client.run_batch()``.

Every test runs the real client against a real :class:`MockNebulaServer` on
127.0.0.1: nothing in aiohttp or in the client is mocked. What the client reports
is checked against what the server recorded (``server.requests``): which
attempts arrived, which faults they were given, which URLs were issued for
which prompt. Prompts are unique per job, so a server record names its job.
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import nebula_async as na
from nebula_async.testing import MockNebulaServer, ReceivedRequest

pytestmark = pytest.mark.anyio

MODEL = "doubao-seedream-4-0-250828"
IMAGE = "https://example.com/in.png"
FAST = na.RetryPolicy(max_attempts=10, backoff_base=0.005, backoff_max=0.05)

# Every retried fault kind but "slow" (which only adds latency).
MIXED_FAULTS = {
    "http_500": 0.03,
    "http_502": 0.03,
    "http_503": 0.03,
    "body_500": 0.03,
    "body_429": 0.02,
    "http_429": 0.02,
    "drop": 0.02,
    "malformed": 0.01,
    "empty": 0.01,
}
RATE_LIMIT_FAULTS = frozenset({"http_429", "body_429", "rate_limited"})


# --------------------------------------------------------------------------- helpers


def request(prompt: str, n: int = 1, **fields: Any) -> na.Img2ImgRequest:
    return na.Img2ImgRequest(model=MODEL, prompt=prompt, image=IMAGE, n=n, **fields)


def client_for(server: MockNebulaServer, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 10.0)
    return na.NebulaClient(base_url=server.base_url, **options)


def issued_urls(server: MockNebulaServer) -> dict[str, list[str]]:
    """Prompt -> every URL the server handed out for it (successful answers only)."""
    issued: dict[str, list[str]] = defaultdict(list)
    for record in server.requests:
        if record.fault is None and record.status == 200 and record.code == 200:
            issued[record.field("prompt")].extend(record.urls)
    return issued


def records_by_prompt(server: MockNebulaServer) -> dict[str, list[ReceivedRequest]]:
    grouped: dict[str, list[ReceivedRequest]] = defaultdict(list)
    for record in server.requests:
        grouped[record.field("prompt")].append(record)
    return grouped


def _code_file(task: asyncio.Task[Any]) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return code.co_filename if code is not None else ""


def stray_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since ``before``, other than the running one."""
    return asyncio.all_tasks() - before - {asyncio.current_task()}


def client_side_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Stray tasks that are not the (still running) mock server's request handlers."""
    return {
        task
        for task in stray_tasks(before)
        if not _code_file(task).endswith(("web_protocol.py", "_mock_server.py"))
    }


async def settle() -> None:
    """Let callbacks scheduled by a close (connection_lost...) run."""
    for _ in range(5):
        await asyncio.sleep(0)


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect what the event loop reports (e.g. "Task exception was never retrieved").

    The collector runs before the loop's handler is restored, so a task freed late,
    through a reference cycle, is still reported here.
    """
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        yield reported
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


@contextmanager
def nothing_reported_by_the_loop() -> Iterator[None]:
    """Fail on anything the event loop reports (e.g. a task exception never retrieved)."""
    with loop_errors() as reported:
        yield
    assert reported == []


# --------------------------------------------------------------------------- 1. bulk


async def test_2000_jobs_through_mixed_faults_every_job_answered_once_with_its_own_urls() -> None:
    jobs = [request(f"bulk-{i}") for i in range(2000)]
    async with MockNebulaServer(
        faults=MIXED_FAULTS, retry_after=0.01, latency=(0.0, 0.004), seed=7
    ) as server:
        # A fixed rate far above what the mock serves: these 429s are injected at
        # random, not a limit, and an adaptive rate would read them as one (it would
        # crawl; docs/concepts/limits.md says so). This test is about accounting.
        fixed = na.RateLimit(100_000, adaptive=False)
        async with client_for(server, max_concurrency=32, rate_limit=fixed) as client:
            report = await client.run_batch(jobs)
            stats = client.statistics()

    results = report.results
    assert len(results) == 2000
    assert [r.job_id for r in results] == [str(i) for i in range(2000)]  # input order
    assert len({r.job_id for r in results}) == 2000
    failed = [(r.job_id, r.error) for r in results if not r.ok]
    assert failed == []
    assert (report.succeeded, report.failed, report.images) == (2000, 0, 2000)

    # The faults really were there, every kind of them.
    faults = Counter(record.fault for record in server.requests if record.fault is not None)
    assert set(faults) == set(MIXED_FAULTS), faults
    assert 300 < sum(faults.values()) < 800  # ~20% of ~2,500 attempts

    # Each job's URLs are exactly those the server issued for its prompt.
    issued = issued_urls(server)
    assert set(issued) == {job.prompt for job in jobs}
    for job, result in zip(jobs, results, strict=True):
        assert len(result.urls) == 1
        assert Counter(result.urls) == Counter(issued[job.prompt]), result.job_id
    all_result_urls = [url for result in results for url in result.urls]
    all_issued_urls = [url for urls in issued.values() for url in urls]
    assert Counter(all_result_urls) == Counter(all_issued_urls)
    assert len(set(all_result_urls)) == 2000  # nothing duplicated, nothing lost

    # Every attempt is counted, per job and in total.
    by_prompt = records_by_prompt(server)
    for job, result in zip(jobs, results, strict=True):
        records = by_prompt[job.prompt]
        assert result.attempts == len(records)
        assert result.retries == sum(1 for r in records if r.fault is not None)
        assert result.rate_limited == sum(1 for r in records if r.fault in RATE_LIMIT_FAULTS)
        assert result.submissions == 1
    assert report.attempts == len(server.requests) == server.request_count
    # All jobs ended well, so every faulted attempt was retried, and only those.
    assert report.retries == sum(faults.values())
    assert report.rate_limited == faults["http_429"] + faults["body_429"]

    assert stats.attempts == report.attempts
    assert stats.retries == report.retries
    assert stats.rate_limited == report.rate_limited
    assert (stats.jobs_ok, stats.jobs_failed) == (2000, 0)
    assert (stats.submissions_ok, stats.submissions_failed, stats.images) == (2000, 0, 2000)
    assert stats.in_flight == 0
    assert server.max_in_flight <= 32


# --------------------------------------------------------------------------- 2. fan-out


async def test_fan_out_splits_a_job_into_submissions_and_gathers_their_urls() -> None:
    jobs = [
        na.Job(request("five", n=2), id="five", images=5),
        na.Job(request("one-of-fifteen", n=15), id="one", images=1),
        na.Job(request("exact", n=4), id="exact", images=4),
        na.Job(request("default", n=3), id="default"),
    ]
    assert jobs[0].submission_sizes() == [2, 2, 1]
    assert jobs[1].submission_sizes() == [1]
    async with MockNebulaServer(latency=(0.0, 0.02), seed=3) as server:
        async with client_for(server, max_concurrency=8) as client:
            report = await client.run_batch(jobs)

    by_prompt = records_by_prompt(server)
    assert sorted(r.field("n") for r in by_prompt["five"]) == [1, 2, 2]
    assert [r.field("n") for r in by_prompt["one-of-fifteen"]] == [1]
    assert [r.field("n") for r in by_prompt["exact"]] == [4]
    assert [r.field("n") for r in by_prompt["default"]] == [3]

    five, one, exact, default = report.results
    assert (five.submissions, one.submissions, exact.submissions, default.submissions) == (
        3,
        1,
        1,
        1,
    )
    assert [len(r.urls) for r in report.results] == [5, 1, 4, 3]
    assert all(r.ok for r in report.results)
    assert five.requested_images == 5
    assert five.attempts == 3
    issued = issued_urls(server)
    for job, result in zip(jobs, report.results, strict=True):
        assert Counter(result.urls) == Counter(issued[job.request.prompt])
    # URLs in submission order: the two n=2 answers, then the n=1 answer.
    answers = {tuple(r.urls) for r in by_prompt["five"]}
    assert tuple(five.urls[0:2]) in answers
    assert tuple(five.urls[2:4]) in answers
    assert tuple(five.urls[4:]) in answers
    assert report.images == 13


async def test_fan_out_with_a_single_slot_does_not_deadlock() -> None:
    jobs = [na.Job(request(f"solo-{i}", n=1), images=4) for i in range(5)]
    async with MockNebulaServer() as server:
        async with client_for(server, max_concurrency=1) as client:
            with anyio.fail_after(10):
                report = await client.run_batch(jobs)
    assert [len(r.urls) for r in report.results] == [4] * 5
    assert report.succeeded == 5
    assert server.max_in_flight == 1


# --------------------------------------------------------------------------- 3. partial failure


async def test_partial_failure_keeps_the_urls_of_the_other_submissions() -> None:
    # The first two arrivals: one success, then a non-retryable refusal.
    async with MockNebulaServer(fault_script=[None, "body_400"]) as server:

        async def jobs() -> AsyncIterator[Any]:
            yield na.Job(request("split", n=1), id="split", images=3)
            # Hold the other jobs back until the split job's three submissions have
            # arrived, so the scripted refusal surely lands on one of them.
            with anyio.fail_after(5):
                while len(server.requests) < 3:
                    await anyio.sleep(0.001)
            for i in range(20):
                yield request(f"other-{i}")

        async with client_for(server, max_concurrency=4) as client:
            report = await client.run_batch(jobs())
            stats = client.statistics()

    split, *others = report.results
    assert split.job_id == "split"
    assert split.ok is False
    assert split.submissions == 3
    assert split.attempts == 3  # a 400 is never retried
    assert len(split.errors) == 1
    assert isinstance(split.error, na.BadRequestError)
    assert split.error is split.errors[0]
    assert split.error.code == 400
    assert len(split.urls) == 2
    assert Counter(split.urls) == Counter(issued_urls(server)["split"])
    assert [r.job_id for r in others] == [str(i) for i in range(1, 21)]
    assert all(r.ok and len(r.urls) == 1 for r in others)
    assert (report.succeeded, report.failed, report.images) == (20, 1, 22)
    assert report.urls_by_job["split"] == split.urls
    assert (stats.submissions_ok, stats.submissions_failed) == (22, 1)
    assert (stats.jobs_ok, stats.jobs_failed) == (20, 1)


async def test_random_refusals_fail_only_their_own_submissions() -> None:
    jobs = [na.Job(request(f"mix-{i}", n=1), images=3) for i in range(150)]
    faults = {"body_400": 0.08, "http_503": 0.08, "body_500": 0.04}
    async with MockNebulaServer(faults=faults, latency=(0.0, 0.003), seed=11) as server:
        async with client_for(server, max_concurrency=16) as client:
            report = await client.run_batch(jobs)

    issued = issued_urls(server)
    by_prompt = records_by_prompt(server)
    for job, result in zip(jobs, report.results, strict=True):
        prompt = job.request.prompt
        refusals = sum(1 for r in by_prompt[prompt] if r.fault == "body_400")
        assert len(result.errors) == refusals
        assert all(isinstance(e, na.BadRequestError) for e in result.errors)
        assert result.ok is (refusals == 0)
        assert result.submissions == 3
        assert len(result.urls) == 3 - refusals
        assert Counter(result.urls) == Counter(issued[prompt])
        assert result.attempts == len(by_prompt[prompt])
    assert len(report.results) == 150
    assert 0 < report.failed < 150
    assert report.succeeded + report.failed == 150
    assert report.attempts == len(server.requests)


# --------------------------------------------------------------------------- 4. ordering


async def test_ordered_stream_yields_in_input_order_under_random_latency() -> None:
    async with MockNebulaServer(latency=(0.0, 0.05), seed=5) as server:
        async with client_for(server, max_concurrency=16) as client:
            ids = [r.job_id async for r in client.stream(
                (request(f"ord-{i}") for i in range(150)), ordered=True
            )]  # fmt: skip
    assert ids == [str(i) for i in range(150)]


async def test_unordered_stream_yields_every_job_as_it_finishes() -> None:
    async with MockNebulaServer(latency=(0.0, 0.05), seed=5) as server:
        async with client_for(server, max_concurrency=16) as client:
            results = [r async for r in client.stream(request(f"u-{i}") for i in range(150))]
    ids = [r.job_id for r in results]
    assert sorted(ids, key=int) == [str(i) for i in range(150)]
    assert ids != sorted(ids, key=int)  # random latency reorders completions
    issued = issued_urls(server)
    assert all(r.urls == issued[f"u-{r.job_id}"] for r in results)


async def test_ordered_window_bounds_the_jobs_running_ahead() -> None:
    window = 8
    produced = 0
    worst_ahead = 0

    def jobs() -> Iterator[na.Img2ImgRequest]:
        nonlocal produced
        for i in range(120):
            produced += 1
            yield request(f"win-{i}")

    async with MockNebulaServer(latency=(0.0, 0.03), seed=9) as server:
        async with client_for(server, max_concurrency=32) as client:
            consumed = 0
            async for result in client.stream(jobs(), ordered=True, window=window):
                assert result.job_id == str(consumed)
                consumed += 1
                worst_ahead = max(worst_ahead, produced - consumed)
    assert consumed == 120
    # At most `window` jobs started beyond the oldest one not yet yielded, so far
    # fewer requests in flight than the concurrency of 32 would allow.
    assert server.max_in_flight <= window
    assert worst_ahead <= window + 1


# --------------------------------------------------------------------------- 5. backpressure


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_input_is_read_lazily(kind: str) -> None:
    concurrency = 8
    produced = 0
    worst_ahead = 0

    def sync_jobs() -> Iterator[na.Img2ImgRequest]:
        nonlocal produced
        for i in range(400):
            produced += 1
            yield request(f"lazy-{i}")

    async def async_jobs() -> AsyncIterator[na.Img2ImgRequest]:
        for item in sync_jobs():
            yield item

    source = sync_jobs() if kind == "sync" else async_jobs()
    async with MockNebulaServer(latency=(0.0, 0.005), seed=2) as server:
        async with client_for(server, max_concurrency=concurrency) as client:
            consumed = 0
            async for _ in client.stream(source):
                consumed += 1
                worst_ahead = max(worst_ahead, produced - consumed)
    assert (produced, consumed) == (400, 400)
    assert worst_ahead <= 4 * concurrency + 8, worst_ahead


async def test_breaking_out_of_a_million_job_stream_stops_promptly() -> None:
    concurrency = 8
    produced = 0
    worst_ahead = 0

    def endless() -> Iterator[na.Img2ImgRequest]:
        nonlocal produced
        for i in range(1_000_000):
            produced += 1
            yield request(f"big-{i}")

    before = asyncio.all_tasks()
    with nothing_reported_by_the_loop():
        async with MockNebulaServer(latency=(0.0, 0.005), seed=4) as server:
            async with client_for(server, max_concurrency=concurrency) as client:
                consumed = 0
                async for _ in client.stream(endless()):
                    consumed += 1
                    worst_ahead = max(worst_ahead, produced - consumed)
                    if consumed == 300:
                        break
                broke_at = len(server.requests)
                await anyio.sleep(0.3)
                after_pause = len(server.requests)
                assert client.statistics().in_flight == 0
                assert client_side_tasks(before) == set()
            await settle()
    assert produced <= 300 + 4 * concurrency + 8
    assert worst_ahead <= 4 * concurrency + 8
    # Only requests already on the wire when we left may still have arrived.
    assert after_pause - broke_at <= concurrency
    assert after_pause < 300 + 2 * concurrency
    assert stray_tasks(before) == set()


async def test_an_exception_in_the_consumer_stops_the_stream() -> None:
    before = asyncio.all_tasks()
    with nothing_reported_by_the_loop():
        async with MockNebulaServer(latency=(0.0, 0.005)) as server:
            async with client_for(server, max_concurrency=4) as client:

                async def consume() -> None:
                    async for _ in client.stream(request(f"exc-{i}") for i in range(10_000)):
                        if len(server.requests) > 40:
                            raise KeyError("stop here")

                with pytest.raises(KeyError, match="stop here"):
                    await consume()
                stopped_at = len(server.requests)
                await anyio.sleep(0.2)
                assert len(server.requests) - stopped_at <= 4
                assert client_side_tasks(before) == set()
            await settle()
    assert stray_tasks(before) == set()


async def test_an_exception_in_on_result_stops_the_batch() -> None:
    before = asyncio.all_tasks()
    seen: list[str] = []

    def on_result(result: na.JobResult) -> None:
        seen.append(result.job_id)
        if len(seen) == 25:
            raise LookupError("callback failed")

    with nothing_reported_by_the_loop():
        async with MockNebulaServer(latency=(0.0, 0.005)) as server:
            async with client_for(server, max_concurrency=4) as client:
                with pytest.raises(LookupError, match="callback failed"):
                    await client.run_batch(
                        (request(f"cb-{i}") for i in range(10_000)), on_result=on_result
                    )
                stopped_at = len(server.requests)
                await anyio.sleep(0.2)
                assert len(server.requests) - stopped_at <= 4
                assert client_side_tasks(before) == set()
            await settle()
    assert len(seen) == 25
    assert stray_tasks(before) == set()


# --------------------------------------------------------------------------- 6. inputs


async def test_requests_get_ids_by_position() -> None:
    jobs = [request(f"pos-{i}") for i in range(5)]
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            report = await client.run_batch(jobs)
    assert [r.job_id for r in report.results] == ["0", "1", "2", "3", "4"]
    issued = issued_urls(server)
    assert report.urls_by_job == {str(i): issued[f"pos-{i}"] for i in range(5)}


async def test_dict_inputs_in_every_key_style() -> None:
    dto = "batchImageGenerationDTO"
    jobs: list[Any] = [
        {"id": "snake", "model": MODEL, "prompt": "snake", "response_format": "url", "n": 2},
        {
            "id": 7,
            "model": MODEL,
            "prompt": "camel",
            "responseFormat": "url",
            "optimizePrompt": "x",
            "quality": "hd",
        },
        {"model": MODEL, "prompt": "no-id", "images": 3},
        {"id": "dotted", f"{dto}.model": MODEL, f"{dto}.prompt": "dotted", f"{dto}.n": 2},
        {"id": "nested", "images": 2, dto: {"model": MODEL, "prompt": "nested"}},
        na.Job(request("job-no-id")),
        na.Job(request("job-with-id"), id="mine"),
    ]
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            report = await client.run_batch(jobs)

    assert [r.job_id for r in report.results] == [
        "snake",
        "7",
        "2",
        "dotted",
        "nested",
        "5",
        "mine",
    ]
    assert all(r.ok for r in report.results)
    assert [len(r.urls) for r in report.results] == [2, 1, 3, 2, 2, 1, 1]
    assert [r.submissions for r in report.results] == [1, 1, 3, 1, 2, 1, 1]
    by_prompt = records_by_prompt(server)
    assert by_prompt["snake"][0].field("response_format") == "url"
    assert by_prompt["camel"][0].field("response_format") == "url"
    assert by_prompt["camel"][0].field("quality") == "hd"
    assert by_prompt["camel"][0].field("optimize_prompt") == "x"
    assert by_prompt["dotted"][0].field("n") == 2
    issued = issued_urls(server)
    prompts = ["snake", "camel", "no-id", "dotted", "nested", "job-no-id", "job-with-id"]
    for prompt, result in zip(prompts, report.results, strict=True):
        assert Counter(result.urls) == Counter(issued[prompt])


async def test_invalid_inputs_become_failed_results_and_nothing_is_sent_for_them() -> None:
    jobs: list[Any] = [
        {"model": MODEL, "prompt": "good-0"},
        {"id": "zero-n", "model": MODEL, "prompt": "bad-n", "n": 0},
        {"id": "typo", "model": MODEL, "prompt": "bad-key", "bogus": 1},
        {"id": "no-images", "model": MODEL, "prompt": "bad-images", "images": 0},
        {"model": MODEL},
        42,
        {"model": MODEL, "prompt": "good-6"},
    ]
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            results = [r async for r in client.stream(jobs, ordered=True)]

    assert [r.job_id for r in results] == ["0", "zero-n", "typo", "no-images", "4", "5", "6"]
    assert [r.ok for r in results] == [True, False, False, False, False, False, True]
    expected_fields = {"zero-n": "n", "typo": "bogus", "no-images": "images", "4": "prompt"}
    for result in results[1:6]:
        assert isinstance(result.error, na.ValidationError)
        assert result.errors == [result.error]
        assert (result.submissions, result.attempts, result.urls) == (0, 0, [])
        if result.job_id in expected_fields:
            field = expected_fields[result.job_id]
            assert result.error.field == field
            assert field in str(result.error)
    assert sorted(r.field("prompt") for r in server.requests) == ["good-0", "good-6"]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("ordered", [False, True])
async def test_input_that_raises_delivers_the_started_jobs_then_raises(
    kind: str, ordered: bool
) -> None:
    def sync_jobs() -> Iterator[na.Img2ImgRequest]:
        for i in range(5):
            yield request(f"before-{i}")
        raise OSError("input broke")

    async def async_jobs() -> AsyncIterator[na.Img2ImgRequest]:
        for item in sync_jobs():
            yield item

    async with MockNebulaServer(latency=(0.0, 0.02)) as server:
        async with client_for(server) as client:
            got: list[na.JobResult] = []

            async def consume() -> None:
                source = sync_jobs() if kind == "sync" else async_jobs()
                async for result in client.stream(source, ordered=ordered):
                    got.append(result)

            with pytest.raises(OSError, match="input broke"):
                await consume()
            assert sorted(r.job_id for r in got) == ["0", "1", "2", "3", "4"]
            assert all(r.ok for r in got)

            with pytest.raises(OSError, match="input broke"):
                await client.run_batch(sync_jobs() if kind == "sync" else async_jobs())
    assert len(server.requests) == 10


async def test_jobs_must_be_an_iterable() -> None:
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            with pytest.raises(na.ValidationError):
                await client.run_batch("not jobs")
            with pytest.raises(na.ValidationError):
                await client.run_batch(42)  # type: ignore[arg-type]
    assert server.requests == []


# --------------------------------------------------------------------------- 7. cancellation


@pytest.mark.parametrize("api", ["run_batch", "stream"])
async def test_cancelling_a_batch_returns_promptly_and_leaves_nothing_behind(api: str) -> None:
    before = asyncio.all_tasks()
    got: list[na.JobResult] = []
    with warnings.catch_warnings(record=True) as caught, nothing_reported_by_the_loop():
        warnings.simplefilter("always")
        async with MockNebulaServer(latency=(0.2, 0.5), seed=1) as server:
            client = client_for(server, max_concurrency=16)
            async with client:
                jobs = [request(f"cancel-{i}") for i in range(200)]
                started = time.perf_counter()
                with anyio.move_on_after(0.3) as scope:
                    if api == "run_batch":
                        await client.run_batch(jobs)
                    else:
                        async for result in client.stream(jobs):
                            got.append(result)
                elapsed = time.perf_counter() - started
                assert scope.cancelled_caught
                assert elapsed < 2.0
                assert client.statistics().in_flight == 0
                assert client_side_tasks(before) == set()
                sent = len(server.requests)
                await anyio.sleep(0.3)
                assert len(server.requests) == sent  # nothing new is sent
                # Each of the 16 slots sent one request, then one more per answer.
                assert sent <= 16 + client.statistics().submissions_ok
            # The client closed cleanly (no warning about unclosed sessions either).
            assert "closed" in repr(client)
        await settle()
    assert [str(w.message) for w in caught] == []
    assert stray_tasks(before) == set()


async def test_closing_the_client_cancels_a_stream_consumed_in_another_task() -> None:
    before = asyncio.all_tasks()
    got: list[na.JobResult] = []
    ending: list[BaseException | None] = []
    with nothing_reported_by_the_loop():
        async with MockNebulaServer(latency=(0.2, 0.5), seed=1) as server:
            client = client_for(server, max_concurrency=8)
            await client.__aenter__()

            async def consume() -> None:
                try:
                    async for result in client.stream(request(f"bg-{i}") for i in range(200)):
                        got.append(result)
                except BaseException as exc:
                    ending.append(exc)
                    raise
                ending.append(None)

            consumer = asyncio.get_running_loop().create_task(consume())
            await anyio.sleep(0.4)
            started = time.perf_counter()
            await client.aclose()
            with anyio.fail_after(2):
                await asyncio.wait({consumer})
            assert time.perf_counter() - started < 2.0
            if not consumer.cancelled():
                consumer.exception()  # retrieved, so asyncio does not report it
            # The stream was stopped, not run to its end, and the consumer let go.
            assert len(got) < 200
            assert len(ending) == 1
            assert ending[0] is None or isinstance(
                ending[0], asyncio.CancelledError | RuntimeError | na.NebulaError
            )
            sent = len(server.requests)
            await anyio.sleep(0.3)
            assert len(server.requests) == sent
            assert client_side_tasks(before) == set()
        await settle()
    assert stray_tasks(before) == set()


async def test_a_closed_client_refuses_work_with_a_clear_error() -> None:
    async with MockNebulaServer() as server:
        client = client_for(server)
        async with client:
            await client.img2img(request("while-open"))
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in client.stream([request("late")]):
                pass
        with pytest.raises(RuntimeError, match="closed"):
            await client.run_batch([request("late")])
        with pytest.raises(RuntimeError, match="closed"):
            await client.img2img(request("late"))
        await client.aclose()  # idempotent
    assert [r.field("prompt") for r in server.requests] == ["while-open"]


# --------------------------------------------------------------------------- 8. the report


async def test_batch_report_figures_and_callbacks() -> None:
    jobs: list[Any] = [
        na.Job(request(f"rep-{i}", n=2), id=f"job-{i}", images=3 if i % 4 == 0 else None)
        for i in range(60)
    ]
    faults = {"body_400": 0.05, "http_503": 0.1, "http_429": 0.05}
    sync_seen: list[str] = []
    async_seen: list[str] = []

    def on_result_sync(result: na.JobResult) -> None:
        sync_seen.append(result.job_id)

    async def on_result_async(result: na.JobResult) -> None:
        await anyio.lowlevel.checkpoint()
        async_seen.append(result.job_id)

    async with MockNebulaServer(
        faults=faults, latency=(0.0, 0.02), retry_after=None, seed=13
    ) as server:
        async with client_for(server, max_concurrency=8) as client:
            first = await client.run_batch(jobs, on_result=on_result_sync)
            second = await client.run_batch(
                [na.Job(request(f"again-{i}")) for i in range(20)], on_result=on_result_async
            )
            stats = client.statistics()

    ids = [f"job-{i}" for i in range(60)]
    assert [r.job_id for r in first.results] == ids
    assert sorted(sync_seen) == sorted(ids)
    assert len(sync_seen) == 60
    assert sorted(async_seen, key=int) == [str(i) for i in range(20)]

    assert first.urls_by_job == {r.job_id: r.urls for r in first.results}
    issued = issued_urls(server)
    for i, result in enumerate(first.results):
        assert Counter(result.urls) == Counter(issued[f"rep-{i}"])
    assert first.succeeded == sum(r.ok for r in first.results)
    assert first.failed == 60 - first.succeeded
    assert 0 < first.failed < 30
    assert first.images == sum(len(r.urls) for r in first.results)
    assert first.attempts == sum(r.attempts for r in first.results)
    assert first.retries == sum(r.retries for r in first.results)
    assert first.rate_limited == sum(r.rate_limited for r in first.results) > 0

    _assert_latency_figures(first, jobs=60)
    _assert_statistics_add_up(stats, first, second, server)


def _assert_latency_figures(report: na.BatchReport, *, jobs: int) -> None:
    latencies = sorted(r.elapsed_s for r in report.results)
    assert 0 < report.latency_p50_s <= report.latency_p95_s <= report.latency_p99_s
    assert latencies[0] <= report.latency_p50_s
    assert report.latency_p99_s <= latencies[-1]
    assert report.elapsed_s >= latencies[-1]
    assert report.throughput_per_s > 0
    assert report.throughput_per_s == pytest.approx(jobs / report.elapsed_s)


def _assert_statistics_add_up(
    stats: na.ClientStatistics,
    first: na.BatchReport,
    second: na.BatchReport,
    server: MockNebulaServer,
) -> None:
    """statistics(): a frozen snapshot whose counters add up over both batches."""
    assert isinstance(stats, na.ClientStatistics)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.attempts = 0  # type: ignore[misc]
    assert stats.attempts == first.attempts + second.attempts == len(server.requests)
    assert stats.retries == first.retries + second.retries
    assert stats.rate_limited == first.rate_limited + second.rate_limited
    assert stats.jobs_ok == first.succeeded + second.succeeded
    assert stats.jobs_failed == first.failed + second.failed
    assert stats.images == first.images + second.images
    all_results = first.results + second.results
    assert stats.submissions_ok + stats.submissions_failed == sum(
        r.submissions for r in all_results
    )
    assert stats.submissions_failed == sum(len(r.errors) for r in all_results)
    assert stats.in_flight == 0


async def test_empty_batch() -> None:
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            report = await client.run_batch([])
            assert [r async for r in client.stream([])] == []
    assert report.results == []
    assert (report.succeeded, report.failed, report.images, report.attempts) == (0, 0, 0, 0)
    assert report.latency_p50_s == report.latency_p99_s == 0.0
    assert server.requests == []


# --------------------------------------------------------------------------- 9. concurrency


async def test_max_concurrency_is_respected_under_a_batch() -> None:
    jobs = [na.Job(request(f"cc-{i}", n=1), images=1 + i % 3) for i in range(200)]
    async with MockNebulaServer(latency=(0.005, 0.02), faults={"http_503": 0.1}, seed=8) as server:
        async with client_for(server, max_concurrency=12) as client:
            report = await client.run_batch(jobs)
    assert report.succeeded == 200
    assert server.max_in_flight <= 12
    assert server.max_in_flight >= 6  # the limit was actually used


async def test_a_job_in_backoff_does_not_hold_up_the_others() -> None:
    # One slot: job 0's first attempt fails and it sleeps 0.4 s before retrying. The
    # other jobs go through that slot meanwhile, and the concurrency still holds.
    slow_retry = na.RetryPolicy(max_attempts=3, backoff_base=0.4, backoff_max=0.4)
    async with MockNebulaServer(fault_script=["http_500"]) as server:
        async with client_for(
            server, max_concurrency=1, retry=slow_retry, random=lambda: 1.0
        ) as client:
            finished = [
                result.job_id
                async for result in client.stream(request(f"bo-{i}") for i in range(8))
            ]
    assert finished == ["1", "2", "3", "4", "5", "6", "7", "0"]
    prompts = [record.field("prompt") for record in server.requests]
    assert prompts == ["bo-0", *(f"bo-{i}" for i in range(1, 8)), "bo-0"]
    assert server.max_in_flight == 1


# --------------------------------------------------------------------------- known bugs


async def test_dict_with_a_null_id_gets_its_position_and_does_not_stop_the_batch() -> None:
    jobs: list[Any] = [
        {"model": MODEL, "prompt": "n0"},
        {"model": MODEL, "prompt": "n1"},
        {"id": None, "model": MODEL, "prompt": "null-id"},
        {"model": MODEL, "prompt": "n3"},
    ]
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            report = await client.run_batch(jobs)
    assert [r.job_id for r in report.results] == ["0", "1", "2", "3"]
    assert [r.ok for r in report.results] == [True, True, True, True]


@pytest.mark.parametrize(
    "bad_field",
    [{"temperature": 2**70}, {"prompt_options": {"tags": {"a", "b"}}}],
    ids=["int-beyond-64-bit", "set-in-prompt-options"],
)
async def test_an_unencodable_request_fails_its_job_only(bad_field: dict[str, Any]) -> None:
    # Such a request cannot be built (ValidationError): as a dict, its job fails alone.
    unencodable = {"model": MODEL, "prompt": "unencodable", **bad_field}
    jobs: list[Any] = [request("enc-0"), unencodable, request("enc-2")]
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            report = await client.run_batch(jobs)
    good_0, bad, good_2 = report.results
    assert good_0.ok
    assert good_2.ok
    assert not bad.ok
    assert isinstance(bad.error, na.ValidationError)
    assert str(bad.error.field).startswith(next(iter(bad_field)))
    assert "unencodable" not in {r.field("prompt") for r in server.requests}


async def test_statistics_count_jobs_refused_by_validation() -> None:
    jobs: list[Any] = [{"model": MODEL, "prompt": "ok"}, {"model": MODEL, "prompt": "x", "n": 0}]
    async with MockNebulaServer() as server:
        async with client_for(server) as client:
            report = await client.run_batch(jobs)
            stats = client.statistics()
    assert (report.succeeded, report.failed) == (1, 1)
    assert (stats.jobs_ok, stats.jobs_failed) == (report.succeeded, report.failed)


async def test_leaving_a_stream_early_closes_the_callers_async_generator() -> None:
    cleaned: list[str] = []

    async def jobs() -> AsyncIterator[na.Img2ImgRequest]:
        try:
            for i in range(1_000_000):
                yield request(f"agen-{i}")
        finally:
            await anyio.lowlevel.checkpoint()  # an async clean-up, like closing a cursor
            cleaned.append("closed")

    source = jobs()
    with nothing_reported_by_the_loop():
        gc_was_enabled = gc.isenabled()
        gc.disable()  # the outcome must not depend on when the cyclic collector runs
        try:
            async with MockNebulaServer() as server:
                async with client_for(server, max_concurrency=4) as client:
                    async for _ in client.stream(source):
                        break
            cleaned_when_client_closed = list(cleaned)
        finally:
            if gc_was_enabled:
                gc.enable()
            await source.aclose()  # do what the pipeline should have done
    assert cleaned_when_client_closed == ["closed"]


async def test_leaving_a_busy_stream_early_never_leaves_a_failed_pipeline_behind() -> None:
    with loop_errors() as reported:
        async with MockNebulaServer(latency=(0.0, 0.005), seed=6) as server:
            async with client_for(server, max_concurrency=16) as client:
                # Leave in the steady state, while other jobs are finishing, so that a
                # worker completes a job in the very tick the consumer leaves.
                for round_ in range(12):
                    taken = 0
                    jobs = (request(f"busy-{round_}-{i}") for i in range(1000))
                    async for _ in client.stream(jobs):
                        taken += 1
                        if taken == 40:
                            break
                    await settle()
    assert [repr(c.get("exception") or c.get("message")) for c in reported] == []


@pytest.mark.parametrize("kind", ["plain", "async"])
@pytest.mark.parametrize("ordered", [False, True])
async def test_a_cancelled_error_from_the_input_is_its_failure_not_the_end(
    kind: str, ordered: bool
) -> None:
    # An iterable handed a CancelledError (a cancelled future it awaited) must not
    # end the stream quietly as if the input were exhausted.
    def plain() -> Iterator[na.Img2ImgRequest]:
        for i in range(10):
            if i == 4:
                raise asyncio.CancelledError
            yield na.Img2ImgRequest(model="m", prompt=f"p{i}")

    async def from_async() -> AsyncIterator[na.Img2ImgRequest]:
        for i in range(10):
            if i == 4:
                cancelled = asyncio.get_running_loop().create_future()
                cancelled.cancel()
                await cancelled
            yield na.Img2ImgRequest(model="m", prompt=f"p{i}")

    async with MockNebulaServer(latency=0.01) as server:
        async with client_for(server, max_concurrency=2) as client:
            got: list[str] = []

            async def consume() -> None:
                async for result in client.stream(
                    plain() if kind == "plain" else from_async(), ordered=ordered
                ):
                    got.append(result.job_id)

            with pytest.raises(RuntimeError, match="CancelledError"):
                await consume()
    assert sorted(got, key=int) == ["0", "1", "2", "3"]
    assert sorted(r.field("prompt") for r in server.requests) == ["p0", "p1", "p2", "p3"]


class _ExplodingMapping(dict[str, Any]):
    """A job dict whose ``get`` fails: the id check then fails as the input would."""

    def get(self, key: str, default: Any = None) -> Any:
        raise KeyError("bad item")


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_a_failing_id_check_keeps_the_jobs_already_started(kind: str) -> None:
    items: list[Any] = [na.Img2ImgRequest(model="m", prompt=f"p{i}") for i in range(3)]
    items.append(_ExplodingMapping(model="m", prompt="p3"))

    async def from_async() -> AsyncIterator[Any]:
        for item in items:
            yield item

    async with MockNebulaServer(latency=0.01) as server:
        async with client_for(server, max_concurrency=4) as client:
            seen: list[str] = []
            with pytest.raises(KeyError, match="bad item"):
                await client.run_batch(
                    items if kind == "plain" else from_async(),
                    on_result=lambda result: seen.append(result.job_id),
                )
    assert sorted(seen) == ["0", "1", "2"]
    assert len(server.requests) == 3
