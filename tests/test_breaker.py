"""Fail fast on systemic failure (issue 9, point 7): the circuit breaker.

Unit tests of :class:`CircuitBreaker` and :func:`systemic_kind`; then end to end:
a wrong token and an unreachable service stop a batch after a handful of
requests, every job still gets a result, and the jobs never started say why.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from typing import Any

import pytest

import nebula_async as na
from nebula_async._batch import worker_count
from nebula_async._breaker import DEFAULT_BREAKER_THRESHOLD, CircuitBreaker, systemic_kind
from nebula_async._exceptions import NotAttemptedError
from nebula_async.testing import MockNebulaServer

MODEL = "doubao-seedream-4-0-250828"
FAST = na.RetryPolicy(max_attempts=3, backoff_base=0.005, backoff_max=0.02)

# What may still start once the breaker opens: a submission per worker that has
# already begun (measured: 23 or 24 requests for 300 jobs at concurrency 16).
AT_MOST = DEFAULT_BREAKER_THRESHOLD + worker_count(16)

REFUSED = na.AuthenticationError("token invalid", status_code=200, code=401)
FORBIDDEN = na.AuthenticationError("forbidden", status_code=403)
UNREACHABLE = na.APIConnectionError("connection refused", request_sent=False)
CUT_OFF = na.APIConnectionError("connection reset mid-answer", request_sent=True)
TIMED_OUT = na.APITimeoutError("read timeout")
BAD = na.BadRequestError("bad parameter", status_code=400)
BUSY = na.ServerError("busy", status_code=503)
OK = object()  # a successful submission: any outcome that is not a NebulaError


def request(prompt: str) -> na.Img2ImgRequest:
    return na.Img2ImgRequest(model=MODEL, prompt=prompt, image="https://example.com/a.png")


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (REFUSED, "credentials refused"),
        (FORBIDDEN, "credentials refused"),
        (UNREACHABLE, "service unreachable"),
        (CUT_OFF, None),  # it reached the service: may be this request's fault
        (TIMED_OUT, None),
        (BAD, None),
        (BUSY, None),
        (na.RateLimitError("slow down", status_code=429), None),
        (na.ResponseDecodeError("half a body"), None),
    ],
)
def test_systemic_kind(error: na.NebulaError, kind: str | None) -> None:
    assert systemic_kind(error) == kind


def test_opens_after_threshold_consecutive_failures_of_one_kind() -> None:
    breaker = CircuitBreaker(3)
    breaker.record(REFUSED)
    breaker.record(FORBIDDEN)  # the same kind: credentials refused
    assert breaker.opened is None
    breaker.record(REFUSED)
    opened = breaker.opened
    assert isinstance(opened, NotAttemptedError)
    assert isinstance(opened, na.NebulaError)
    assert opened.reason == "circuit_open"
    assert opened.cause is REFUSED
    assert "3 consecutive" in str(opened)
    assert "credentials refused" in str(opened)
    # Open for good within the batch: a success does not close it.
    breaker.record(OK)
    assert breaker.opened is opened


@pytest.mark.parametrize("interruption", [OK, BAD, BUSY, CUT_OFF, UNREACHABLE])
def test_anything_else_in_between_starts_the_count_again(interruption: object) -> None:
    breaker = CircuitBreaker(3)
    for _ in range(5):
        breaker.record(REFUSED)
        breaker.record(REFUSED)
        breaker.record(interruption)
    assert breaker.opened is None
    breaker.record(REFUSED)
    breaker.record(REFUSED)
    # After an UNREACHABLE, a third REFUSED is only the second in a row.
    breaker.record(REFUSED)
    assert breaker.opened is not None


def test_unreachable_opens_it_too_and_none_never_opens() -> None:
    breaker = CircuitBreaker(2)
    breaker.record(UNREACHABLE)
    breaker.record(UNREACHABLE)
    assert breaker.opened is not None
    assert breaker.opened.cause is UNREACHABLE
    assert "service unreachable" in str(breaker.opened)
    never = CircuitBreaker(None)
    for _ in range(1000):
        never.record(REFUSED)
    assert never.opened is None


def test_default_threshold() -> None:
    assert DEFAULT_BREAKER_THRESHOLD == 10
    breaker = CircuitBreaker()
    for _ in range(DEFAULT_BREAKER_THRESHOLD - 1):
        breaker.record(REFUSED)
    assert breaker.opened is None
    breaker.record(REFUSED)
    assert breaker.opened is not None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_a_bad_threshold_is_refused(bad: Any) -> None:
    with pytest.raises(na.ValidationError, match="circuit_breaker"):
        na.NebulaClient(token="t", base_url="http://127.0.0.1:1", circuit_breaker=bad)


# -- end to end ------------------------------------------------------------------------------


def client_for(base_url: str, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 5.0)
    return na.NebulaClient(base_url=base_url, **options)


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def check_stopped(report: na.BatchReport, jobs: int, cause: type[na.NebulaError]) -> int:
    """Every job has a result; each either failed with ``cause`` or was not attempted
    because the circuit opened on a ``cause``. Returns how many were not attempted."""
    assert len(report.results) == jobs
    assert [r.job_id for r in report.results] == [str(i) for i in range(jobs)]
    not_attempted = 0
    for result in report.results:
        assert not result.ok
        if isinstance(result.error, NotAttemptedError):
            not_attempted += 1
            assert result.error.reason == "circuit_open"
            assert isinstance(result.error.cause, cause)
            assert result.attempts == 0
        else:
            assert isinstance(result.error, cause)
    return not_attempted


@pytest.mark.anyio
async def test_a_wrong_token_stops_a_300_job_batch_after_a_few_requests() -> None:
    async with MockNebulaServer(latency=0.005) as server:
        async with client_for(server.base_url, token="wrong-token", max_concurrency=16) as c:
            stream = c.stream(request(f"job{i}") for i in range(300))
            async with stream:
                results = [r async for r in stream]
            assert stream.stopped_by is not None
            report = await c.run_batch(request(f"job{i}") for i in range(300))
    # Each run: at most the threshold plus the submissions under way when it opened.
    assert server.request_count <= 2 * AT_MOST
    assert len(results) == 300
    not_attempted = check_stopped(report, 300, na.AuthenticationError)
    assert not_attempted >= 300 - AT_MOST
    assert report.attempts == 300 - not_attempted  # no retries of a refused token
    assert isinstance(stream.stopped_by.cause, na.AuthenticationError)


@pytest.mark.anyio
async def test_an_unreachable_service_stops_quickly() -> None:
    base_url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    async with client_for(base_url, max_concurrency=16) as client:
        report = await client.run_batch(request(f"job{i}") for i in range(300))
    elapsed = time.monotonic() - started
    not_attempted = check_stopped(report, 300, na.APIConnectionError)
    attempted = 300 - not_attempted
    assert attempted <= AT_MOST
    # At most max_attempts per attempted job: ~50 attempts in 0.2 s, not ~1,300 in 24 s.
    assert report.attempts <= attempted * FAST.max_attempts
    assert elapsed < 3.0
    for result in report.results:
        if isinstance(result.error, NotAttemptedError):
            assert "service unreachable" in str(result.error)


@pytest.mark.anyio
async def test_circuit_breaker_none_attempts_every_job() -> None:
    async with MockNebulaServer() as server:
        async with client_for(
            server.base_url, token="wrong-token", circuit_breaker=None, max_concurrency=8
        ) as client:
            report = await client.run_batch(request(f"job{i}") for i in range(60))
    assert server.request_count == 60
    assert check_stopped(report, 60, na.AuthenticationError) == 0


@pytest.mark.anyio
async def test_a_success_in_between_resets_the_count() -> None:
    # One slot: outcomes arrive in script order. Runs of 4 refusals, then a success.
    script = (["body_403"] * 4 + [None]) * 8
    async with MockNebulaServer(fault_script=script) as server:
        async with client_for(server.base_url, max_concurrency=1, circuit_breaker=5) as client:
            report = await client.run_batch(request(f"job{i}") for i in range(40))
            # Five in a row now open it: the rest of this batch is not attempted.
            server.fault_script = ["body_403"] * 5
            stopped = await client.run_batch(request(f"again{i}") for i in range(40))
    assert server.request_count == 45
    kinds = Counter(type(r.error).__name__ for r in report.results)
    assert kinds == {"AuthenticationError": 32, "NoneType": 8}
    assert check_stopped(stopped, 40, na.AuthenticationError) == 35


@pytest.mark.anyio
async def test_a_job_level_failure_never_opens_the_circuit() -> None:
    async with MockNebulaServer(faults={"body_400": 1.0}) as server:
        async with client_for(server.base_url, circuit_breaker=2) as client:
            report = await client.run_batch(request(f"job{i}") for i in range(30))
    assert server.request_count == 30
    assert all(isinstance(r.error, na.BadRequestError) for r in report.results)
