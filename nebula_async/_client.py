"""``NebulaClient``: the public face of the library.

Each HTTP attempt takes, in this order: a concurrency slot (``FifoLimiter``,
first come first served), the client-wide pause gate (``Retry-After``), a rate slot
(GCRA), then sends at once. Taking the rate slot last, while holding the
concurrency slot, is what keeps sends spaced: slots freed together by answers
that arrive together cannot turn into a burst. Backoff sleeps hold no slot.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random as _random
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Final, Self

import anyio
import attrs
import orjson

from ._auth import Authenticator
from ._batch import (
    aggregate,
    backoff_sleep,
    coerce_job,
    default_window,
    job_id_of,
    run_pipeline,
    worker_count,
)
from ._codec import payload_encoder
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    NebulaError,
    ValidationError,
)
from ._limits import FifoLimiter, PauseGate, RateLimiter
from ._models import (
    BatchReport,
    ImageResult,
    Img2ImgRequest,
    Job,
    JobResult,
    RateLimit,
    RetryPolicy,
    Timeout,
)
from ._protocol import (
    DEFAULT_BASE_URL,
    IMG2IMG_PATH,
    JSON_HEADERS,
    HttpRequest,
    decipher_img2img,
    normalize_base_url,
)
from ._retry import decide_retry
from ._stats import ClientStatistics, Counters, percentile
from ._transport import AiohttpTransport, RawResponse

__all__ = ["NebulaClient"]

# Log records carry error classes, messages and delays: never a header or a secret.
_log = logging.getLogger("nebula_async")

# A caller may repeat after a refused token at most this often (the stale-token
# repeat plus one re-login of its own), so a token refused at once never loops.
_MAX_AUTH_REPEATS: Final = 2


class _Tally:
    """Per-submission attempt counts, kept even when the submission fails."""

    __slots__ = ("attempts", "rate_limited", "retries")

    def __init__(self) -> None:
        self.attempts = 0
        self.retries = 0
        self.rate_limited = 0


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _rate_limit(value: float | RateLimit | None) -> RateLimit | None:
    if value is None or isinstance(value, RateLimit):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(
            f"rate_limit: must be requests per second or a RateLimit, got {value!r}",
            field="rate_limit",
        )
    return RateLimit(float(value))


def _timeout(value: float | Timeout | None) -> Timeout:
    if isinstance(value, Timeout):
        return value
    if value is None:
        return Timeout(attempt=None)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValidationError(
            f"timeout: must be positive seconds or a Timeout, got {value!r}", field="timeout"
        )
    return Timeout(attempt=float(value))


class NebulaClient:
    """An asyncio client for Nebula v4 image-to-image, built for bulk work.

    Use it as an async context manager; one client serves any number of
    concurrent calls and batches under one set of limits.

    >>> import nebula_async as na
    >>> async def main(jobs):  # doctest: +SKIP
    ...     async with na.NebulaClient(token="...", max_concurrency=32, rate_limit=20) as client:
    ...         report = await client.run_batch(jobs)
    ...         print(report.succeeded, report.urls_by_job)

    Credentials: ``token`` (with or without ``Bearer ``), or ``username`` and
    ``password`` to log in through getToken (both may be given: the token is used
    first, the login renews it). Unset, they come from ``NEBULA_TOKEN``,
    ``NEBULA_USERNAME`` and ``NEBULA_PASSWORD``; ``base_url`` from
    ``NEBULA_BASE_URL``. Secrets never appear in a repr, a log line or an error.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        base_url: str | None = None,
        max_concurrency: int = 16,
        rate_limit: float | RateLimit | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | Timeout | None = 120.0,
        payload_style: str = "dotted",
        random: Callable[[], float] | None = None,
    ) -> None:
        if token is None and username is None and password is None:
            token = _env("NEBULA_TOKEN")
            username, password = _env("NEBULA_USERNAME"), _env("NEBULA_PASSWORD")
        if (username is None) != (password is None):
            raise ValidationError("username and password must be given together", field="password")
        if not token and username is None:
            raise ValidationError(
                "no credentials: pass token= or username=/password=, or set NEBULA_TOKEN "
                "(or NEBULA_USERNAME and NEBULA_PASSWORD)",
                field="token",
            )
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ValidationError(
                f"max_concurrency: must be an integer, got {max_concurrency!r}",
                field="max_concurrency",
            )
        if max_concurrency < 1:
            raise ValidationError(
                f"max_concurrency: must be at least 1, got {max_concurrency}",
                field="max_concurrency",
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ValidationError(f"retry: must be a RetryPolicy, got {retry!r}", field="retry")
        self._base_url = normalize_base_url(base_url or _env("NEBULA_BASE_URL") or DEFAULT_BASE_URL)
        self._url = self._base_url + IMG2IMG_PATH
        self._token = token or None
        self._username = username
        self._password = password
        self._max_concurrency = max_concurrency
        self._rate_limit = _rate_limit(rate_limit)
        self._retry = retry or RetryPolicy()
        self._timeout = _timeout(timeout)
        self._payload_style = payload_style
        self._encode = payload_encoder(payload_style)
        self._random = random or _random.random
        self._counters = Counters()
        self._tasks: set[asyncio.Task[None]] = set()
        self._state = "new"
        self._headers: dict[str, str] = {}
        self._headers_for = ""
        # Made in __aenter__, inside the running loop.
        # One connection beyond the cap for a re-login, which runs outside a slot:
        # requests never wait in aiohttp's pool, so the attempt timeout never counts a wait.
        self._transport = AiohttpTransport(
            connection_limit=max_concurrency + 1, timeout=self._timeout
        )
        self._auth: Authenticator | None = None
        self._concurrency: FifoLimiter | None = None
        self._rate: RateLimiter | None = None
        self._gate: PauseGate | None = None

    def __repr__(self) -> str:
        rate = "None" if self._rate_limit is None else f"{self._rate_limit.per_second:g}/s"
        auth = "token" if self._token else "login"
        return (
            f"<NebulaClient base_url={self._base_url!r} max_concurrency={self._max_concurrency} "
            f"rate_limit={rate} payload_style={self._payload_style!r} auth={auth} "
            f"state={self._state}>"
        )

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError(f"this NebulaClient is {self._state}; create a new one")
        self._concurrency = FifoLimiter(self._max_concurrency)
        self._gate = PauseGate()
        self._rate = RateLimiter(self._rate_limit) if self._rate_limit is not None else None
        await self._transport.open()
        self._auth = Authenticator(
            base_url=self._base_url,
            token=self._token,
            username=self._username,
            password=self._password,
            send=self._transport.send,
        )
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel running batches, wait for them, and close the HTTP session."""
        if self._state == "closed":
            return
        self._state = "closed"
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            if tasks:
                await asyncio.wait(tasks)
            await self._transport.aclose()

    def _require_open(self) -> None:
        if self._state != "open":
            hint = (
                "use 'async with NebulaClient(...) as client:'"
                if self._state == "new"
                else "it was closed; create a new client"
            )
            raise RuntimeError(f"NebulaClient is not open: {hint}")

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of the client's counters, at any moment."""
        counters = self._counters
        gate = self._gate
        return ClientStatistics(
            attempts=counters.attempts,
            retries=counters.retries,
            rate_limited=counters.rate_limited,
            in_flight=counters.in_flight,
            submissions_ok=counters.submissions_ok,
            submissions_failed=counters.submissions_failed,
            images=counters.images,
            jobs_ok=counters.jobs_ok,
            jobs_failed=counters.jobs_failed,
            logins=self._auth.logins if self._auth else 0,
            current_rate=self._rate.current_rate if self._rate else None,
            paused_until=gate.resume_at if gate and gate.is_paused() else None,
        )

    # -- one submission -----------------------------------------------------------------

    async def img2img(self, request: Img2ImgRequest) -> ImageResult:
        """Submit one request, with retries, and return its images; raises on failure.

        >>> async def main():  # doctest: +SKIP
        ...     async with NebulaClient(token="...") as client:
        ...         result = await client.img2img(Img2ImgRequest(model="m", prompt="a fox",
        ...                                                       image="https://.../in.png"))
        ...         print(result.urls)
        """
        self._require_open()
        if not isinstance(request, Img2ImgRequest):
            raise ValidationError(
                f"request: expected an Img2ImgRequest, got {type(request).__name__}",
                field="request",
            )
        outcome = await self._submission(request, _Tally())
        if isinstance(outcome, NebulaError):
            raise outcome
        return outcome

    async def _submission(
        self, request: Img2ImgRequest, tally: _Tally
    ) -> ImageResult | NebulaError:
        try:
            body = orjson.dumps(self._encode(request))
        except TypeError as exc:  # valid by type, yet not JSON (a set, an int over 64 bits)
            self._counters.submissions_failed += 1
            return ValidationError(f"request cannot be encoded as JSON: {exc}", field="request")
        try:
            result = await self._submit(body, tally)
        except NebulaError as exc:
            self._counters.submissions_failed += 1
            return exc
        self._counters.submissions_ok += 1
        self._counters.images += len(result.images)
        return result

    def _request_headers(self, authorization: str) -> dict[str, str]:
        # Rebuilt only when the token changes, not per request.
        if authorization != self._headers_for:
            self._headers = {**JSON_HEADERS, "Authorization": authorization}
            self._headers_for = authorization
        return self._headers

    async def _exchange(self, body: bytes) -> tuple[RawResponse, int, float]:
        """One HTTP attempt under the limits: (response, token generation, send time)."""
        assert self._concurrency is not None
        assert self._gate is not None
        assert self._auth is not None
        counters = self._counters
        concurrency = self._concurrency
        # Fast path without a checkpoint (an extra event-loop round trip per request);
        # the send below is the cancellation point.
        if not concurrency.try_acquire():
            await concurrency.acquire()
        try:
            if self._gate.is_paused():
                await self._gate.wait()
            sent_at = await self._rate.acquire() if self._rate is not None else 0.0
            authorization, generation = await self._auth.authorization()
            request = HttpRequest("POST", self._url, self._request_headers(authorization), body)
            counters.in_flight += 1
            try:
                response = await self._transport.send(request)
            finally:
                counters.in_flight -= 1
        finally:
            concurrency.release()
        return response, generation, sent_at

    async def _submit(self, body: bytes, tally: _Tally) -> ImageResult:
        """Attempt until success, a final error, or attempts run out."""
        assert self._auth is not None
        assert self._gate is not None
        counters = self._counters
        counted_attempts = 0  # attempts that use up max_attempts (re-login repeats do not)
        auth_repeats = 0
        while True:
            tally.attempts += 1
            counters.attempts += 1
            counted_attempts += 1
            generation: int | None = None
            sent_at = 0.0
            try:
                (status, headers, data), generation, sent_at = await self._exchange(body)
                return decipher_img2img(status, headers, data)
            except AuthenticationError as exc:
                error: NebulaError = exc
                if (
                    exc.effective_code == 401
                    and generation is not None
                    and self._auth.can_login
                    and auth_repeats < _MAX_AUTH_REPEATS
                ):
                    auth_repeats += 1
                    counted_attempts -= 1
                    _log.info("token refused (%s); logging in again", exc.msg or exc.status_code)
                    try:
                        await self._auth.refresh(generation)
                    except AuthenticationError:
                        raise
                    except NebulaError as login_error:
                        error = login_error  # a transient login failure: retry below
                    else:
                        continue
            except NebulaError as exc:
                error = exc

            if isinstance(error, APIStatusError) and error.effective_code == 429:
                tally.rate_limited += 1
                counters.rate_limited += 1
                if self._rate is not None and generation is not None:
                    self._rate.on_rate_limited(sent_at)
            decision = decide_retry(
                error, attempts_made=counted_attempts, policy=self._retry, random=self._random
            )
            if not decision.retry:
                _log.debug("giving up: %s (%s)", decision.reason, error)
                raise error
            retry_after = error.retry_after if isinstance(error, APIStatusError) else None
            if retry_after is not None:
                self._gate.pause_for(retry_after)
            tally.retries += 1
            counters.retries += 1
            _log.debug("retrying in %.3fs: %s (%s)", decision.delay, decision.reason, error)
            await backoff_sleep(decision.delay)  # lends a batch worker's slot meanwhile

    # -- jobs and batches ----------------------------------------------------------------

    async def _run_item(self, index: int, item: object) -> JobResult:
        """One input item of a batch: a bad item fails its own job, nothing is sent."""
        try:
            job = coerce_job(item, index)
        except ValidationError as exc:
            self._counters.jobs_failed += 1
            return JobResult(job_id=job_id_of(item, index), errors=[exc])
        return await self._run_job(job)

    async def _run_job(self, job: Job) -> JobResult:
        """All submissions of one job, concurrently under the client's limits."""
        started = time.perf_counter()
        sizes = job.submission_sizes()
        tallies = [_Tally() for _ in sizes]
        outcomes: list[ImageResult | NebulaError] = []
        if len(sizes) == 1:
            request = (
                job.request if sizes[0] == job.request.n else attrs.evolve(job.request, n=sizes[0])
            )
            outcomes.append(await self._submission(request, tallies[0]))
        else:
            slots: list[ImageResult | NebulaError | None] = [None] * len(sizes)

            async def one(index: int, request: Img2ImgRequest) -> None:
                slots[index] = await self._submission(request, tallies[index])

            async with anyio.create_task_group() as task_group:
                for index, size in enumerate(sizes):
                    request = (
                        job.request if size == job.request.n else attrs.evolve(job.request, n=size)
                    )
                    task_group.start_soon(one, index, request)
            outcomes = [outcome for outcome in slots if outcome is not None]
        result = aggregate(
            job.id or "",
            outcomes,
            attempts=sum(t.attempts for t in tallies),
            retries=sum(t.retries for t in tallies),
            rate_limited=sum(t.rate_limited for t in tallies),
            elapsed_s=time.perf_counter() - started,
            requested_images=job.total_images,
        )
        if result.ok:
            self._counters.jobs_ok += 1
        else:
            self._counters.jobs_failed += 1
        return result

    def _pipeline(
        self,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool,
        window: int | None,
    ) -> AsyncGenerator[tuple[int, JobResult]]:
        self._require_open()
        return run_pipeline(
            jobs,
            self._run_item,
            workers=worker_count(self._max_concurrency),
            ordered=ordered,
            window=window or default_window(self._max_concurrency),
            track=self._track,
        )

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stream(
        self,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = False,
        window: int | None = None,
    ) -> AsyncGenerator[JobResult]:
        """Run ``jobs`` and yield a :class:`JobResult` for each as it finishes.

        ``jobs`` is any iterable or async iterable of :class:`Job`,
        :class:`Img2ImgRequest` (ids ``"0"``, ``"1"``, ... by position) or dicts of
        request fields that may also hold ``id`` and ``images``. It is read lazily,
        as workers free up, so memory stays flat however many jobs there are.

        A failing job never raises here: its result carries the error. With
        ``ordered=True`` results come in input order; at most ``window`` jobs
        (default ``max(64, 4 * max_concurrency)``) run ahead of the oldest
        unfinished one, which bounds the reorder buffer. Leaving the loop early
        (``break``, cancellation) cancels the jobs still running.

        >>> async def main(client):  # doctest: +SKIP
        ...     async for result in client.stream(requests):
        ...         print(result.job_id, result.ok, result.urls)
        """
        pipeline = self._pipeline(jobs, ordered=ordered, window=window)
        try:
            async for _, result in pipeline:
                yield result
        finally:
            await pipeline.aclose()

    async def run_batch(
        self,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        on_result: Callable[[JobResult], Awaitable[None] | None] | None = None,
    ) -> BatchReport:
        """Run every job and return a :class:`BatchReport` with results in input order.

        ``on_result`` (plain or async function) is called as each job finishes,
        for progress or to write results out as they come.
        """
        started = time.perf_counter()
        by_index: dict[int, JobResult] = {}
        pipeline = self._pipeline(jobs, ordered=False, window=None)
        try:
            async for index, result in pipeline:
                by_index[index] = result
                if on_result is not None:
                    maybe = on_result(result)
                    if inspect.isawaitable(maybe):
                        await maybe
        finally:
            await pipeline.aclose()
        results = [by_index[index] for index in range(len(by_index))]
        latencies = sorted(result.elapsed_s for result in results)
        return BatchReport(
            results=results,
            elapsed_s=time.perf_counter() - started,
            attempts=sum(result.attempts for result in results),
            retries=sum(result.retries for result in results),
            rate_limited=sum(result.rate_limited for result in results),
            latency_p50_s=percentile(latencies, 0.50),
            latency_p95_s=percentile(latencies, 0.95),
            latency_p99_s=percentile(latencies, 0.99),
        )
