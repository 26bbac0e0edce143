"""``NebulaClient``: the public face of the library.

Each HTTP attempt takes, in this order: a concurrency slot (an anyio semaphore,
first come first served), the token (waiting out a re-login), a send slot from
the rate limiter (which also holds everyone through a ``Retry-After`` pause),
then sends at once, and tells the limiter what came of it. Taking the rate slot
last, while holding the concurrency slot, keeps sends spaced: slots freed
together by answers that arrive together cannot turn into a burst. Backoff sleeps
hold no slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import random as _random
import re
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Self

import anyio
import attrs
import orjson

from ._admission import Admission, Place
from ._aggregate import aggregate, detach_error
from ._auth import Authenticator
from ._batch import BatchControl, JobStream, default_window, worker_count
from ._breaker import DEFAULT_BREAKER_THRESHOLD
from ._codec import payload_encoder
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    NebulaError,
    NotAttemptedError,
    ResponseDecodeError,
    ServerError,
    ValidationError,
)
from ._jobs import RefusedItem, RepeatedIdCheck, coerce_job, job_id_of
from ._lifecycle import CLOSE_GRACE_S, Lifecycle
from ._limiter import Limiter, LimiterFactory, Outcome
from ._limits import in_process_limiter
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
    DEFAULT_MAX_RESPONSE_BYTES,
    RawResponse,
    authorization_value,
    build_img2img_request,
    decipher_img2img,
    has_control_characters,
    normalize_base_url,
)
from ._retry import backoff_delay, decide_retry
from ._stats import ClientStatistics, Counters, percentile
from ._transport import AiohttpTransport

__all__ = ["NebulaClient"]

# Log records carry error classes, messages and delays: never a header or a secret.
_log = logging.getLogger("nebula_async")
#: The detached stream pipeline (see NebulaClient._detach) this task runs in, if any.
_DETACHED: contextvars.ContextVar[asyncio.Task[None] | None] = contextvars.ContextVar(
    "nebula_async_detached", default=None
)

# After a refused token a caller logs in again itself at most once; it may also
# repeat this often with a token another caller fetched, so that a service
# refusing every token never loops.
_MAX_STALE_REPEATS: Final = 3
#: Refusals for the rate (429) a submission repeats without using up
#: ``max_attempts``: the limiter slows down on each, so a rate set too high never
#: fails a job, while a service that refuses everything still ends each one.
MAX_RATE_LIMITED_REPEATS: Final = 10

RateLimitOption = float | RateLimit | Limiter | LimiterFactory | None


class _Tally:
    """A job's attempt counts, kept even when a submission fails; its submissions
    share one (each count moves with no await in between)."""

    __slots__ = ("attempts", "rate_limited", "retries")

    def __init__(self) -> None:
        self.attempts = 0
        self.retries = 0
        self.rate_limited = 0


class _Tries:
    """Where one submission's retry loop stands."""

    __slots__ = ("counted", "logged_in", "rate_limited", "stale_repeats")

    def __init__(self) -> None:
        self.counted = 0  # tries that use up max_attempts
        self.rate_limited = 0  # 429s repeated apart from them
        self.logged_in = False  # this call logs in again at most once
        self.stale_repeats = 0


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _credentials(
    token: str | None, username: str | None, password: str | None
) -> tuple[str | None, str | None, str | None]:
    # Each credential falls back to its own variable: a token passed in code may
    # still be renewed by a login whose password comes from the environment.
    token = _env("NEBULA_TOKEN") if token is None else token
    username = _env("NEBULA_USERNAME") if username is None else username
    password = _env("NEBULA_PASSWORD") if password is None else password
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
    if token:
        authorization_value(token)  # a bad token fails here, not mid-batch
    return token or None, username, password


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name}: must be an integer, got {value!r}", field=name)
    if value < 1:
        raise ValidationError(f"{name}: must be at least 1, got {value}", field=name)
    return value


def _rate_limit(value: object) -> RateLimit | Limiter | LimiterFactory | None:
    if value is None or isinstance(value, RateLimit | Limiter | LimiterFactory):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(
            "rate_limit: must be requests per second, a RateLimit, a SharedRateLimit "
            f"or a Limiter, got {value!r}",
            field="rate_limit",
        )
    return RateLimit(value)


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
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValidationError(
            f"timeout: must be positive seconds or a Timeout, got {value!r}", field="timeout"
        )
    return Timeout(attempt=float(value))


def _is_rate_refusal(error: NebulaError) -> bool:
    return isinstance(error, APIStatusError) and error.effective_code == 429


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

    ``allow_insecure_http=True`` accepts an ``http://`` base URL to a host that is
    not loopback (the token and password then travel unencrypted).
    ``max_response_bytes`` caps one answer, before and after decompression (default
    1 GiB: 15 ``b64_json`` images at 4096x4096); a bigger one is a
    ``ResponseDecodeError``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        base_url: str | None = None,
        max_concurrency: int = 16,
        rate_limit: RateLimitOption = None,
        retry: RetryPolicy | None = None,
        timeout: float | Timeout | None = 120.0,
        payload_style: str = "dotted",
        trust_env: bool = False,
        default_headers: Mapping[str, str] | None = None,
        circuit_breaker: int | None = DEFAULT_BREAKER_THRESHOLD,
        random: Callable[[], float] | None = None,
        allow_insecure_http: bool = False,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._token, self._username, self._password = _credentials(token, username, password)
        self._max_concurrency = _positive_int("max_concurrency", max_concurrency)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ValidationError(f"retry: must be a RetryPolicy, got {retry!r}", field="retry")
        if circuit_breaker is not None:
            _positive_int("circuit_breaker", circuit_breaker)
        self._base_url = normalize_base_url(
            base_url or _env("NEBULA_BASE_URL") or DEFAULT_BASE_URL,
            allow_insecure_http=allow_insecure_http,
        )
        self._rate_limit = _rate_limit(rate_limit)
        self._retry = retry or RetryPolicy()
        self._timeout = _timeout(timeout)
        self._payload_style = payload_style
        self._encode = payload_encoder(payload_style)
        self._breaker_threshold = circuit_breaker
        self._random = random or _random.random
        self._counters = Counters()
        self._lifecycle = Lifecycle()
        self._tasks: set[asyncio.Task[None]] = set()
        # One connection beyond the cap for a re-login, which runs outside a slot:
        # requests never wait in aiohttp's pool, so the attempt timeout never counts a wait.
        self._transport = AiohttpTransport(
            connection_limit=self._max_concurrency + 1,
            timeout=self._timeout,
            trust_env=trust_env,
            headers=_default_headers(default_headers),
            max_response_bytes=max_response_bytes,
        )
        # Made in __aenter__, inside the running loop.
        self._auth: Authenticator | None = None
        self._concurrency: anyio.Semaphore | None = None
        # One-off calls (img2img, run_job) under way at once, at most: as many as a
        # batch has workers. Calls gathered beyond it wait here before they build
        # anything (a cancel scope, the body, the call's frames): 100,000 gathered
        # calls hold 100,000 coroutines, not 100,000 calls' state, and the first
        # sends go out before the last call has started. A call admitted after
        # close() raises ClientStateError and lets the next one in.
        self._admission: Admission | None = None
        self._limiter: Limiter | None = None
        self._owns_limiter = False

    def __repr__(self) -> str:
        limit = self._rate_limit
        rate = (
            "None"
            if limit is None
            else f"{limit.per_second:g}/s"
            if isinstance(limit, RateLimit)
            else type(limit).__name__
        )
        auth = "token" if self._token else "login"
        return (
            f"<NebulaClient base_url={self._base_url!r} max_concurrency={self._max_concurrency} "
            f"rate_limit={rate} payload_style={self._payload_style!r} auth={auth} "
            f"state={self._lifecycle.state.value}>"
        )

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._lifecycle.open()
        # A free permit is taken without anyio's checkpoint: the call's send is one
        # anyway, and one call awaited at a time would pay a turn of the event loop
        # for each (whole client, one call at a time: 776.6k -> 686.0k instructions).
        self._concurrency = anyio.Semaphore(self._max_concurrency, fast_acquire=True)
        self._admission = Admission(self._max_concurrency)
        self._limiter, self._owns_limiter = self._make_limiter()
        await self._transport.open()
        self._auth = Authenticator(
            base_url=self._base_url,
            token=self._token,
            username=self._username,
            password=self._password,
            send=self._transport.send,
        )
        return self

    def _make_limiter(self) -> tuple[Limiter, bool]:
        """The limiter for ``rate_limit=``, and whether this client owns (closes) it."""
        limit = self._rate_limit
        if limit is None or isinstance(limit, RateLimit):
            # None: unlimited until the first 429, which turns on an adaptive rate.
            return in_process_limiter(limit), True
        if isinstance(limit, LimiterFactory):
            return limit.create_limiter(), True
        return limit, False  # a Limiter instance: its owner closes it

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel every running call and stream, wait for them to end, and only then
        close the session and the limiter the client made.

        The callers get a :class:`~nebula_async.ClientStateError`. The wait is
        shielded and bounded by a grace deadline (10 s), past which the client closes
        anyway (a call stuck in a shielded section of a custom limiter). It does not
        wait for the calls it is itself called from (a limiter acting as a kill
        switch): they end as soon as it returns.
        """
        if not self._lifecycle.close():
            return
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLOSE_GRACE_S):
                await self._lifecycle.wait_for_calls()
                # Not the pipeline this close runs in (a custom limiter closing from
                # a worker): it waits for that worker, which would wait for it.
                pipelines = self._tasks - {_DETACHED.get()}
                if pipelines:
                    await asyncio.wait(pipelines)
            if left := self._lifecycle.still_running():
                _log.warning(
                    "closing with %d call(s) still running %gs after they were cancelled",
                    left,
                    CLOSE_GRACE_S,
                )
            await self._transport.aclose()
            if self._owns_limiter and self._limiter is not None:
                await self._limiter.aclose()

    def drain(self) -> None:
        """Stop taking new work; let what is in flight finish.

        Every running :meth:`stream` and :meth:`run_batch` stops reading jobs and
        starts no more submissions (those not started end as
        :class:`~nebula_async.NotAttemptedError`); the jobs in flight finish and are
        yielded or reported. New calls are refused with
        :class:`~nebula_async.ClientStateError`. Closing stays the immediate stop.
        """
        self._lifecycle.drain()

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of the client's counters, at any moment."""
        counters = self._counters
        limits = self._limiter.statistics() if self._limiter is not None else None
        paused = limits is not None and limits.paused_for_s > 0
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
            current_rate=limits.current_rate if limits else None,
            paused_until=time.monotonic() + limits.paused_for_s if limits and paused else None,
            estimated_limit=limits.estimated_limit if limits else None,
            calls_waiting=self._admission.waiting if self._admission else 0,
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
        self._lifecycle.require_open()
        if not isinstance(request, Img2ImgRequest):
            raise ValidationError(
                f"request: expected an Img2ImgRequest, got {type(request).__name__}",
                field="request",
            )
        assert self._admission is not None
        place = await self._admission.take()
        try:
            with self._lifecycle.call():
                outcome = await self._submission(request, _Tally(), None, place)
        finally:
            place.leave()
        if isinstance(outcome, NebulaError):
            raise outcome
        return outcome

    async def _submission(
        self,
        request: Img2ImgRequest,
        tally: _Tally,
        control: BatchControl | None,
        place: Place | None = None,
    ) -> ImageResult | NebulaError:
        """One submission to its final outcome; never raises a :class:`NebulaError`.

        ``place``: the one-off call's admission, lent out while it sleeps in a backoff.
        """
        if control is not None and (not_started := control.not_started()) is not None:
            return not_started
        try:
            body = orjson.dumps(self._encode(request))
        except TypeError as exc:  # valid by type, yet not JSON (a set, an int over 64 bits)
            self._counters.submissions_failed += 1
            return ValidationError(f"request cannot be encoded as JSON: {exc}", field="request")
        try:
            result = await self._submit(body, tally, control, place)
        except NotAttemptedError as exc:
            return exc  # stopped before its first send: not a failure of the service
        except NebulaError as exc:
            self._counters.submissions_failed += 1
            if control is not None:
                control.record(exc)
            return exc
        self._counters.submissions_ok += 1
        self._counters.images += len(result.images)
        if control is not None:
            control.record(result)
        return result

    async def _submit(
        self, body: bytes, tally: _Tally, control: BatchControl | None, place: Place | None
    ) -> ImageResult:
        """Attempt until success, a final error, or attempts run out."""
        tries = _Tries()
        last_error: NebulaError | None = None
        while True:
            outcome, generation = await self._try_once(body, tally, control)
            if isinstance(outcome, ImageResult):
                return outcome
            if isinstance(outcome, NotAttemptedError):
                # Drained (or the circuit opened) while it waited for its slots.
                raise outcome if last_error is None else last_error
            last_error = outcome
            error = await self._after_refused_token(outcome, generation, tries)
            if error is None:
                continue  # repeat with the new token: not a retry
            delay = self._retry_delay(error, tries)
            if control is not None and control.draining:
                raise error  # draining: a retry would be a new submission
            tally.retries += 1
            self._counters.retries += 1
            _log.debug("retrying in %.3fs after %s", delay, type(error).__name__)
            await (anyio.sleep(delay) if place is None else place.sleep(delay))

    async def _try_once(
        self, body: bytes, tally: _Tally, control: BatchControl | None
    ) -> tuple[ImageResult | NebulaError, int | None]:
        """One attempt and its decoded answer, with the token generation it was sent with."""
        try:
            exchanged = await self._exchange(body, tally, control)
            (status, headers, data), generation, ticket = exchanged
        except NebulaError as error:
            return error, None
        assert self._limiter is not None
        try:
            result = decipher_img2img(status, headers, data)
        except NebulaError as error:
            if _is_rate_refusal(error):
                tally.rate_limited += 1
                self._counters.rate_limited += 1
            await self._record(ticket, error)
            return error, generation
        await self._tell(ticket, Outcome.ACCEPTED)
        return result, generation

    async def _record(self, ticket: object, error: NebulaError) -> None:
        """Tell the limiter of a failed answer; a ``Retry-After`` pauses every caller."""
        assert self._limiter is not None
        retry_after = error.retry_after if isinstance(error, APIStatusError) else None
        if retry_after is not None and retry_after > self._retry.retry_after_max:
            retry_after = None  # the caller gives up at once; nobody need wait for it
        if _is_rate_refusal(error):
            outcome = Outcome.REFUSED
        elif isinstance(error, ServerError | ResponseDecodeError):
            outcome = Outcome.FAILED  # nothing usable came back: no news of the rate
        else:
            outcome = Outcome.ACCEPTED
        await self._tell(ticket, outcome, retry_after=retry_after)

    async def _tell(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """``limiter.record``; a limiter that fails to hear (Redis down) never costs
        the answer that already came back: it is logged, and the answer goes on."""
        assert self._limiter is not None
        try:
            await self._limiter.record(ticket, outcome, retry_after=retry_after)
        except NebulaError as exc:
            _log.warning("the rate limiter could not record an outcome: %s", exc)

    async def _exchange(
        self, body: bytes, tally: _Tally, control: BatchControl | None
    ) -> tuple[RawResponse, int, object]:
        """One HTTP attempt under the limits: (response, token generation, limiter ticket).

        The attempt is counted only once it is about to be sent. A batch drained (or
        stopped by its breaker) while this waited for its slots sends nothing: it
        raises :class:`NotAttemptedError`.
        """
        assert self._concurrency is not None
        assert self._limiter is not None
        assert self._auth is not None
        counters = self._counters
        async with self._concurrency:
            ticket = await self._send_slot()
            if control is not None and (stopped := control.not_started()) is not None:
                await self._tell(ticket, Outcome.UNUSED)
                raise stopped
            authorization, generation = self._auth.current()  # no await from here to the send
            request = build_img2img_request(self._base_url, authorization, body)
            tally.attempts += 1
            counters.attempts += 1
            counters.in_flight += 1
            try:
                response = await self._transport.send(request)
            except ValidationError:
                # Refused by aiohttp before anything went out: not an attempt.
                tally.attempts -= 1
                counters.attempts -= 1
                await self._tell(ticket, Outcome.UNUSED)
                raise
            except NebulaError:
                await self._tell(ticket, Outcome.FAILED)
                raise
            except asyncio.CancelledError:
                # Cancelled on the way (its answer, if any, is lost): the limiter hears
                # of the slot too, but is given no time. A record that needs I/O would
                # hold up the caller, since a native cancel is not delivered again.
                with anyio.move_on_after(0):
                    await self._tell(ticket, Outcome.FAILED)
                raise
            finally:
                counters.in_flight -= 1
        return response, generation, ticket

    async def _send_slot(self) -> object:
        """Wait for the token, then for a rate slot; a slot that a re-login overtook is
        forfeited (sent with all the others the moment the login ends, it would be a burst)."""
        auth, limiter = self._auth, self._limiter
        assert auth is not None
        assert limiter is not None
        while True:
            if auth.needs_login:  # none yet, or the token was refused
                await auth.authorization()
            ticket = await limiter.acquire()
            if not auth.needs_login:
                return ticket
            await self._tell(ticket, Outcome.UNUSED)

    async def _after_refused_token(
        self, error: NebulaError, generation: int | None, tries: _Tries
    ) -> NebulaError | None:
        """None to repeat at once with a renewed token; else the error to go on with.

        A 401 triggers one login for all callers refused with the same token (single
        flight); a caller refused with a token already replaced just repeats.
        """
        auth = self._auth
        assert auth is not None
        if not (
            isinstance(error, AuthenticationError)
            and error.effective_code == 401
            and generation is not None
            and auth.can_login
        ):
            return error
        auth.mark_refused(generation)
        if not auth.is_current(generation):
            # Another caller already logged in again: repeat with its token.
            if tries.stale_repeats < _MAX_STALE_REPEATS:
                tries.stale_repeats += 1
                return None
            return error
        if tries.logged_in:
            return error
        _log.info("token refused (%s); logging in again", error.msg or error.code)
        try:
            tries.logged_in = await auth.refresh(generation)
        except AuthenticationError:
            raise
        except NebulaError as login_error:
            return login_error  # a transient login failure: retried below
        # False: another caller logged in meanwhile (a stale repeat).
        if tries.logged_in or tries.stale_repeats < _MAX_STALE_REPEATS:
            tries.stale_repeats += not tries.logged_in
            return None
        return error

    def _retry_delay(self, error: NebulaError, tries: _Tries) -> float:
        """How long to wait before the next try; raises ``error`` when it is final.

        A refusal for the rate is the limiter's to fix (it slowed down already), so it
        is repeated up to :data:`MAX_RATE_LIMITED_REPEATS` times apart from
        ``max_attempts``, unless its ``Retry-After`` exceeds ``retry_after_max``.
        """
        policy = self._retry
        if _is_rate_refusal(error) and tries.rate_limited < MAX_RATE_LIMITED_REPEATS:
            tries.rate_limited += 1
            decision = decide_retry(error, attempts_made=0, policy=policy, random=self._random)
            if decision.retry and not (isinstance(error, APIStatusError) and error.retry_after):
                return backoff_delay(tries.rate_limited, policy, self._random)
        else:
            tries.counted += 1
            decision = decide_retry(
                error, attempts_made=tries.counted, policy=policy, random=self._random
            )
        if not decision.retry:
            _log.debug("giving up: %s (%s)", decision.reason, error)
            raise error
        return decision.delay

    # -- jobs and batches ----------------------------------------------------------------

    async def run_job(self, job: Job | Img2ImgRequest | Mapping[str, Any]) -> JobResult:
        """Run one job with its fan-out and return its :class:`JobResult`; never raises
        for the job's own failure (the result carries it).

        >>> async def main(client):  # doctest: +SKIP
        ...     result = await client.run_job(Job(request, images=6))   # 6 images, 3 calls of n=2
        ...     print(result.ok, result.urls)
        """
        self._lifecycle.require_open()
        assert self._admission is not None
        place = await self._admission.take()
        try:
            with self._lifecycle.call():
                return await self._run_item(0, job, None, place)
        finally:
            place.leave()

    async def _run_item(
        self, index: int, item: object, control: BatchControl | None, place: Place | None = None
    ) -> JobResult:
        """One input item: a bad item fails its own job, nothing is sent; anything
        unexpected in its processing becomes its error, never the batch's end."""
        try:
            if isinstance(item, RefusedItem):
                self._counters.jobs_failed += 1
                return JobResult(job_id=item.job_id, errors=[item.error])
            job = coerce_job(item, index)
        except ValidationError as exc:
            detach_error(exc)  # its frames hold the raw item
            self._counters.jobs_failed += 1
            return JobResult(job_id=job_id_of(item, index), errors=[exc])
        try:
            return await self._run_job(job, control, place)
        except Exception as exc:  # a bug, or a value nothing above foresaw
            _log.exception("unexpected error in job %r", job.id)
            error = NebulaError(f"unexpected {type(exc).__name__} in this job: {exc}")
            self._counters.jobs_failed += 1
            return JobResult(job_id=job.id or str(index), errors=[error])

    async def _run_job(
        self, job: Job, control: BatchControl | None, place: Place | None = None
    ) -> JobResult:
        """All submissions of one job, concurrently under the client's limits; a
        fanned-out one keeps its ``place`` while one submission sleeps (others run)."""
        started = time.perf_counter()
        sizes = job.submission_sizes()
        tally = _Tally()
        outcomes: list[ImageResult | NebulaError | None] = [None] * len(sizes)
        if len(sizes) == 1:
            request = self._request_of(job, sizes[0])
            outcomes[0] = await self._submission(request, tally, control, place)
        else:
            await self._fan_out(job, sizes, tally, outcomes, control)
        result = aggregate(
            job.id or "",
            [outcome for outcome in outcomes if outcome is not None],
            attempts=tally.attempts,
            retries=tally.retries,
            rate_limited=tally.rate_limited,
            elapsed_s=time.perf_counter() - started,
            requested_images=job.total_images,
        )
        if result.ok:
            self._counters.jobs_ok += 1
        else:
            self._counters.jobs_failed += 1
        return result

    @staticmethod
    def _request_of(job: Job, size: int) -> Img2ImgRequest:
        return job.request if size == job.request.n else attrs.evolve(job.request, n=size)

    async def _fan_out(
        self,
        job: Job,
        sizes: list[int],
        tally: _Tally,
        outcomes: list[ImageResult | NebulaError | None],
        control: BatchControl | None,
    ) -> None:
        """A job's submissions on at most ``max_concurrency`` tasks of its own."""
        pending = iter(enumerate(sizes))

        async def submit_pending() -> None:
            # Shared iterator: a job of 1,000 submissions runs on a few tasks, not 1,000.
            for index, size in pending:
                request = self._request_of(job, size)
                outcomes[index] = await self._submission(request, tally, control)

        async with anyio.create_task_group() as task_group:
            for _ in range(min(len(sizes), self._max_concurrency)):
                task_group.start_soon(submit_pending)

    def stream(
        self,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = False,
        window: int | None = None,
    ) -> JobStream:
        """Run ``jobs``; a :class:`~nebula_async.JobStream` of each :class:`JobResult`
        as it finishes.

        ``jobs`` is any iterable or async iterable of :class:`Job`,
        :class:`Img2ImgRequest` (ids ``"0"``, ``"1"``, ... by position) or dicts of
        request fields that may also hold ``id`` and ``images``. It is read lazily,
        as workers free up, so memory stays flat however many jobs there are.

        Use it as ``async with client.stream(jobs) as results: async for r in
        results: ...`` (the stream owns its task group; ``results.drain()`` stops
        taking jobs and lets the running ones finish), or iterate it directly.
        A failing job never raises here: its result carries the error. With
        ``ordered=True`` results come in input order; at most ``window`` jobs
        (default ``max(64, 4 * max_concurrency)``) run ahead of the oldest
        unfinished one, which bounds the reorder buffer. Leaving early (``break``,
        cancellation, leaving the block) cancels the jobs still running.

        >>> async def main(client):  # doctest: +SKIP
        ...     async for result in client.stream(requests):
        ...         print(result.job_id, result.ok, result.urls)
        """
        return self._stream(jobs, ordered=ordered, window=window, admit=None)

    def _stream(
        self,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool,
        window: int | None,
        admit: Callable[[int, object], object] | None,
    ) -> JobStream:
        self._lifecycle.require_open()
        if window is None:
            window = default_window(self._max_concurrency)
        elif isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValidationError(
                f"window: must be an integer >= 1, got {window!r}", field="window"
            )
        stream = JobStream(
            jobs,
            self._run_item,
            control=BatchControl(breaker_threshold=self._breaker_threshold),
            workers=worker_count(self._max_concurrency),
            ordered=ordered,
            window=window,
            admit=admit,
            call_scope=self._lifecycle.call,
            detach=self._detach,
        )
        self._lifecycle.watch(stream)
        return stream

    def _detach(self, run: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run a bare stream's pipeline in a task of the client's, awaited by aclose
        (unless aclose runs inside it: see _DETACHED)."""
        context = contextvars.copy_context()  # its workers inherit it
        task = asyncio.get_running_loop().create_task(run(), context=context)
        context.run(_DETACHED.set, task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        :meth:`drain` ends it early with the jobs that ran.
        """
        started = time.perf_counter()
        # Results arrive nearly in input order: a list indexed by position, grown as needed.
        slots: list[JobResult | None] = []
        stream = self._stream(jobs, ordered=False, window=None, admit=RepeatedIdCheck().check)
        async with stream:
            while True:
                try:
                    index, result = await stream.next_pair()
                except StopAsyncIteration:
                    break
                if index >= len(slots):
                    slots.extend([None] * (index + 1 - len(slots)))
                slots[index] = result
                if on_result is not None:
                    maybe = on_result(result)
                    if inspect.isawaitable(maybe):
                        await maybe
        return _report([result for result in slots if result is not None], started)


def _report(results: list[JobResult], started: float) -> BatchReport:
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
