"""``NebulaClient``: the public face of the library.

Each HTTP attempt takes, in this order: a concurrency slot (``FifoLimiter``,
first come first served), the client-wide pause gate (``Retry-After``), the token
(waiting out a re-login), a rate slot (GCRA), then sends at once. Taking the rate
slot last, while holding the concurrency slot, is what keeps sends spaced: slots
freed together by answers that arrive together cannot turn into a burst. Backoff
sleeps hold no slot.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random as _random
import re
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from types import TracebackType
from typing import Any, Final, Self

import anyio
import attrs
import orjson

from ._aggregate import aggregate, detach_error
from ._auth import Authenticator
from ._batch import backoff_sleep, default_window, run_pipeline, worker_count
from ._codec import payload_encoder
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    NebulaError,
    ValidationError,
)
from ._jobs import RefusedItem, RepeatedIdCheck, coerce_job, job_id_of
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
    authorization_value,
    decipher_img2img,
    has_control_characters,
    normalize_base_url,
)
from ._retry import decide_retry
from ._stats import ClientStatistics, Counters, percentile
from ._transport import AiohttpTransport, RawResponse

__all__ = ["NebulaClient"]

# Log records carry error classes, messages and delays: never a header or a secret.
_log = logging.getLogger("nebula_async")

# After a refused token a caller logs in again itself at most once; it may also
# repeat this often with a token another caller fetched, so that a service
# refusing every token never loops.
_MAX_STALE_REPEATS: Final = 3


def _closed_error() -> RuntimeError:
    return RuntimeError("NebulaClient was closed while this request was retrying")


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


_OWN_HEADERS: Final = frozenset({"authorization", "content-type", "content-length", "host"})


def _default_headers(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(
            f"default_headers: must be a mapping of header names to values, got {value!r}",
            field="default_headers",
        )
    headers: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValidationError(
                f"default_headers: {name!r} is not a valid header name", field="default_headers"
            )
        if name.lower() in _OWN_HEADERS:
            raise ValidationError(
                f"default_headers: {name} is set by the client (pass token= for Authorization)",
                field="default_headers",
            )
        if not isinstance(text, str) or has_control_characters(text):
            # Not echoed: a header value may be a secret (an API gateway key).
            raise ValidationError(
                f"default_headers: the value of {name} must be a string without control characters",
                field="default_headers",
            )
        headers[name] = text
    return headers


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
    first, the login renews it). Each one not passed comes from its variable,
    ``NEBULA_TOKEN``, ``NEBULA_USERNAME`` or ``NEBULA_PASSWORD``; ``base_url`` from
    ``NEBULA_BASE_URL``. Secrets never appear in a repr, a log line or an error.

    ``default_headers`` are sent with every request (an API gateway's key, a
    tracing header; ``User-Agent`` may be replaced); ``Authorization`` and the
    content headers are the client's own.

    ``trust_env=True`` takes proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
    ``NO_PROXY`` (a proxy's credentials may come from ``~/.netrc``; the API host's
    never do), as behind a corporate proxy; off by default, so that an
    environment variable never reroutes the token.
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
        trust_env: bool = False,
        default_headers: Mapping[str, str] | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        # Each credential falls back to its own variable: a token passed in code may
        # still be renewed by a login whose password comes from the environment.
        if token is None:
            token = _env("NEBULA_TOKEN")
        if username is None:
            username = _env("NEBULA_USERNAME")
        if password is None:
            password = _env("NEBULA_PASSWORD")
        if (username is None) != (password is None):
            missing = "password" if password is None else "username"
            raise ValidationError(
                f"username and password must be given together: {missing} is missing "
                f"(pass {missing}= or set NEBULA_{missing.upper()})",
                field=missing,
            )
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
        if token:
            authorization_value(token)  # a bad token fails here, not mid-batch
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
            connection_limit=max_concurrency + 1,
            timeout=self._timeout,
            trust_env=trust_env,
            headers=_default_headers(default_headers),
        )
        self._auth: Authenticator | None = None
        self._concurrency: FifoLimiter | None = None
        self._rate: RateLimiter | None = None
        self._gate: PauseGate | None = None
        self._closed: anyio.Event | None = None

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
        # Waits for a pause, a rate slot or a backoff end early when the client closes.
        self._closed = anyio.Event()
        self._gate = PauseGate(sleep=self._sleep)
        self._rate = (
            RateLimiter(self._rate_limit, sleep=self._sleep)
            if self._rate_limit is not None
            else None
        )
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
        # After the cancels, so batch tasks end cancelled; this wakes direct callers
        # sleeping in a backoff, a pause or a rate wait.
        if self._closed is not None:
            self._closed.set()
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

    async def _exchange(self, body: bytes, tally: _Tally) -> tuple[RawResponse, int, float]:
        """One HTTP attempt under the limits: (response, token generation, send time).

        The attempt is counted only once it is about to be sent.
        """
        assert self._concurrency is not None
        assert self._gate is not None
        assert self._auth is not None
        counters = self._counters
        concurrency = self._concurrency
        gate = self._gate
        rate = self._rate
        auth = self._auth
        # Fast path without a checkpoint (an extra event-loop round trip per request);
        # the send below is the cancellation point.
        if not concurrency.try_acquire():
            await concurrency.acquire()
        try:
            sent_at = 0.0
            while True:
                if gate.is_paused():
                    await gate.wait()
                if auth.needs_login:
                    # Wait for the token before the rate slot: a slot held through a
                    # login would be sent, with all the others, the moment it ends.
                    await auth.authorization()
                    continue
                if rate is None:
                    break
                sent_at = await rate.acquire()
                # A Retry-After or a refused token may have come in while this caller
                # waited for its slot: the slot is forfeited (erring slow) and taken anew.
                if not gate.is_paused() and not auth.needs_login:
                    break
            if self._state != "open":
                raise _closed_error()
            authorization, generation = auth.current()  # no await from here to the send
            request = HttpRequest("POST", self._url, self._request_headers(authorization), body)
            tally.attempts += 1
            counters.attempts += 1
            counters.in_flight += 1
            try:
                response = await self._transport.send(request)
            except ValidationError:
                # Refused by aiohttp before anything went out: not an attempt.
                tally.attempts -= 1
                counters.attempts -= 1
                raise
            finally:
                counters.in_flight -= 1
        finally:
            concurrency.release()
        return response, generation, sent_at

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once, with the closed-client error, when :meth:`aclose` runs."""
        closed = self._closed
        assert closed is not None
        with anyio.move_on_after(seconds):
            await closed.wait()
        if closed.is_set():
            raise _closed_error()

    def _pause(self, seconds: float) -> None:
        """Honour a ``Retry-After``: hold every caller, and push the rate schedule past it."""
        assert self._gate is not None
        self._gate.pause_for(seconds)
        if self._rate is not None:
            self._rate.defer_until(self._gate.resume_at)

    async def _submit(self, body: bytes, tally: _Tally) -> ImageResult:
        """Attempt until success, a final error, or attempts run out."""
        auth = self._auth
        assert auth is not None
        counters = self._counters
        policy = self._retry
        counted_attempts = 0  # tries that use up max_attempts (re-login repeats do not)
        logged_in = False  # this call logs in again at most once
        stale_repeats = 0
        while True:
            if self._state != "open":
                raise _closed_error()
            counted_attempts += 1
            generation: int | None = None
            sent_at = 0.0
            try:
                (status, headers, data), generation, sent_at = await self._exchange(body, tally)
                return decipher_img2img(status, headers, data)
            except AuthenticationError as exc:
                error: NebulaError = exc
                if exc.effective_code == 401 and generation is not None and auth.can_login:
                    auth.mark_refused(generation)
                    if auth.is_current(generation) and not logged_in:
                        _log.info("token refused (%s); logging in again", exc.msg or exc.code)
                        try:
                            logged_in = await auth.refresh(generation)
                        except AuthenticationError:
                            raise
                        except NebulaError as login_error:
                            error = login_error  # a transient login failure: retry below
                        else:
                            # False: another caller logged in meanwhile (a stale repeat).
                            if logged_in or stale_repeats < _MAX_STALE_REPEATS:
                                stale_repeats += not logged_in
                                counted_attempts -= 1
                                continue
                    elif not auth.is_current(generation) and stale_repeats < _MAX_STALE_REPEATS:
                        # Another caller already logged in again: repeat with its token.
                        stale_repeats += 1
                        counted_attempts -= 1
                        continue
            except NebulaError as exc:
                error = exc

            retry_after: float | None = None
            if isinstance(error, APIStatusError):
                retry_after = error.retry_after
                if error.effective_code == 429:
                    tally.rate_limited += 1
                    counters.rate_limited += 1
                    if self._rate is not None and generation is not None:
                        self._rate.on_rate_limited(sent_at)
            if retry_after is not None and retry_after <= policy.retry_after_max:
                # The service asked every caller to wait, whether or not this one retries.
                self._pause(retry_after)
            decision = decide_retry(
                error, attempts_made=counted_attempts, policy=policy, random=self._random
            )
            if not decision.retry:
                _log.debug("giving up: %s (%s)", decision.reason, error)
                raise error
            tally.retries += 1
            counters.retries += 1
            _log.debug("retrying in %.3fs: %s (%s)", decision.delay, decision.reason, error)
            # Lends a batch worker's slot meanwhile; wakes early if the client closes.
            await backoff_sleep(decision.delay, self._sleep)

    # -- jobs and batches ----------------------------------------------------------------

    async def _run_item(self, index: int, item: object) -> JobResult:
        """One input item of a batch: a bad item fails its own job, nothing is sent."""
        if isinstance(item, RefusedItem):
            self._counters.jobs_failed += 1
            return JobResult(job_id=item.job_id, errors=[item.error])
        try:
            job = coerce_job(item, index)
        except ValidationError as exc:
            detach_error(exc)  # its frames hold the raw item
            self._counters.jobs_failed += 1
            return JobResult(job_id=job_id_of(item, index), errors=[exc])
        return await self._run_job(job)

    async def _run_job(self, job: Job) -> JobResult:
        """All submissions of one job, concurrently under the client's limits."""
        started = time.perf_counter()
        request = job.request
        total = job.total_images
        if total <= request.n:
            # One submission, the common case: no task group, no per-submission lists.
            tally = _Tally()
            if total != request.n:
                request = attrs.evolve(request, n=total)
            outcome = await self._submission(request, tally)
            result = aggregate(
                job.id or "",
                [outcome],
                attempts=tally.attempts,
                retries=tally.retries,
                rate_limited=tally.rate_limited,
                elapsed_s=time.perf_counter() - started,
                requested_images=total,
            )
        else:
            result = await self._run_fanned_out(job, started)
        if result.ok:
            self._counters.jobs_ok += 1
        else:
            self._counters.jobs_failed += 1
        return result

    async def _run_fanned_out(self, job: Job, started: float) -> JobResult:
        """A job of several submissions, on at most ``max_concurrency`` tasks of its own."""
        sizes = job.submission_sizes()
        tallies = [_Tally() for _ in sizes]
        slots: list[ImageResult | NebulaError | None] = [None] * len(sizes)
        pending = iter(enumerate(sizes))

        async def submit_pending() -> None:
            # Shared iterator: a job of 1,000 submissions runs on a few tasks, not 1,000.
            for index, size in pending:
                request = (
                    job.request if size == job.request.n else attrs.evolve(job.request, n=size)
                )
                slots[index] = await self._submission(request, tallies[index])

        async with anyio.create_task_group() as task_group:
            for _ in range(min(len(sizes), self._max_concurrency)):
                task_group.start_soon(submit_pending)
        outcomes = [outcome for outcome in slots if outcome is not None]
        return aggregate(
            job.id or "",
            outcomes,
            attempts=sum(t.attempts for t in tallies),
            retries=sum(t.retries for t in tallies),
            rate_limited=sum(t.rate_limited for t in tallies),
            elapsed_s=time.perf_counter() - started,
            requested_images=job.total_images,
        )

    def _pipeline(
        self,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool,
        window: int | None,
        admit: Callable[[int, object], object] | None = None,
    ) -> AsyncGenerator[tuple[int, JobResult]]:
        self._require_open()
        return run_pipeline(
            jobs,
            self._run_item,
            admit=admit,
            workers=worker_count(self._max_concurrency),
            ordered=ordered,
            window=default_window(self._max_concurrency) if window is None else window,
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
        for progress or to write results out as they come. Job ids must be unique
        within a batch (they key ``BatchReport.urls_by_job``): a job repeating an
        earlier id fails with a :class:`ValidationError` on ``id`` and is not sent.
        """
        started = time.perf_counter()
        # Results arrive nearly in input order: a list indexed by position, grown as
        # needed (a dict of every result also made glibc churn its heap top).
        slots: list[JobResult | None] = []
        admit = RepeatedIdCheck().check  # in the feeder: "earlier" is in input order
        pipeline = self._pipeline(jobs, ordered=False, window=None, admit=admit)
        try:
            async for index, result in pipeline:
                if index >= len(slots):
                    slots.extend([None] * (index + 1 - len(slots)))
                slots[index] = result
                if on_result is not None:
                    maybe = on_result(result)
                    if inspect.isawaitable(maybe):
                        await maybe
        finally:
            await pipeline.aclose()
        results = [result for result in slots if result is not None]
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
