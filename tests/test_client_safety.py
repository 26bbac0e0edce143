"""The client's failure modes found in review, each against a real loopback server.

Auth that must not loop, pauses that must hold every caller, secrets that must not
leak, errors that must not pin memory, and input that must be refused up front.
Where ``MockNebulaServer`` has no knob for a misbehaviour (a login refused with
body code 500, a token with a line break, a redirect), a purpose-built aiohttp
server answers instead.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web

import nebula_async as na
from nebula_async._protocol import HttpRequest
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio

FAST = na.RetryPolicy(max_attempts=4, backoff_base=0.001, backoff_max=0.01)
REQUEST = na.Img2ImgRequest(model="m", prompt="a fox")
LOGIN = "/prod-api/v3/auth/getToken"
SUBMIT = "/prod-api/nebula/v4/api/img2imgSubmit"
OK_BODY = {"code": 200, "msg": "ok", "data": {"images": [{"url": "https://x/1.png"}]}}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def tiny_server(routes: dict[str, Handler]) -> AsyncIterator[tuple[str, list[str]]]:
    """An aiohttp server on 127.0.0.1 answering POSTs with ``routes``; yields
    (base URL, the paths it received in order)."""
    received: list[str] = []

    def recording(handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            received.append(request.path)
            return await handler(request)

        return handle

    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, recording(handler))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


def answer(body: dict[str, Any], status: int = 200) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(body, status=status)

    return handle


def client_for(base_url: str, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 5.0)
    return na.NebulaClient(base_url=base_url, **options)


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NEBULA_TOKEN", "NEBULA_USERNAME", "NEBULA_PASSWORD", "NEBULA_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


# -- credentials ---------------------------------------------------------------------


async def test_each_credential_falls_back_to_its_own_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEBULA_USERNAME", "demo")
    monkeypatch.setenv("NEBULA_PASSWORD", "demo-password")
    async with MockNebulaServer(token="current") as server:
        # The token comes from code; the login that renews it from the environment.
        async with client_for(server.base_url, token="stale") as client:
            result = await client.img2img(REQUEST)
    assert result.urls
    assert server.logins == 1
    assert [r.fault for r in server.requests] == ["auth", None]


async def test_half_a_login_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(na.ValidationError, match="NEBULA_PASSWORD") as info:
        na.NebulaClient(username="u")
    assert info.value.field == "password"
    monkeypatch.setenv("NEBULA_PASSWORD", "pw")
    with pytest.raises(na.ValidationError, match="NEBULA_USERNAME") as info:
        na.NebulaClient(token="t")
    assert info.value.field == "username"


@pytest.mark.parametrize("token", ["abc\r\nX-Evil: 1", "abc\ndef", "a\x00b", "Bearer ", "  "])
async def test_a_token_that_cannot_be_a_header_is_refused_up_front(token: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        na.NebulaClient(token=token)
    assert info.value.field == "token"
    assert "X-Evil" not in str(info.value)


async def test_a_login_answer_with_a_line_break_in_the_token_is_a_decode_error() -> None:
    login = answer({"code": 200, "msg": "ok", "data": "tok\r\nX-Evil: 1"})
    async with tiny_server({LOGIN: login, SUBMIT: answer(OK_BODY)}) as (base_url, received):
        async with client_for(base_url, token=None, username="u", password="p") as client:
            with pytest.raises(na.ResponseDecodeError) as info:
                await client.img2img(REQUEST)
    assert info.value.path == "$.data"
    assert SUBMIT not in received  # nothing was sent with it


async def test_a_login_refused_with_body_code_500_is_not_retried() -> None:
    # RuoYi backends often answer a wrong password with HTTP 200 and code 500.
    login = answer({"code": 500, "msg": "wrong user name or password"})
    async with tiny_server({LOGIN: login, SUBMIT: answer(OK_BODY)}) as (base_url, received):
        async with client_for(base_url, token=None, username="u", password="p") as client:
            with pytest.raises(na.AuthenticationError) as info:
                await client.img2img(REQUEST)
            stats = client.statistics()
    assert info.value.code == 500
    assert received == [LOGIN]
    # Nothing reached img2imgSubmit, so no attempt is counted.
    assert (stats.attempts, stats.retries) == (0, 0)


async def test_a_service_that_refuses_every_token_costs_one_login_per_call() -> None:
    async with MockNebulaServer(token=None) as server:
        server.fault_script = ["body_401"] * 10
        async with client_for(
            server.base_url, token=None, username="demo", password="demo-password"
        ) as client:
            with pytest.raises(na.AuthenticationError):
                await client.img2img(REQUEST)
    # The lazy first login, then one re-login: the fresh token refused again is final.
    assert server.logins == 2
    assert len(server.requests) == 2


async def test_requests_started_during_a_relogin_wait_for_the_new_token() -> None:
    async with MockNebulaServer(token=None, token_ttl_uses=3) as server:
        server.latency = 0.02
        async with client_for(
            server.base_url,
            token=None,
            username="demo",
            password="demo-password",
            max_concurrency=1,
        ) as client:
            await client.img2img(REQUEST)  # one of the first token's three uses
            async with anyio.create_task_group() as group:
                for i in range(5):
                    group.start_soon(client.img2img, na.Img2ImgRequest(model="m", prompt=f"p{i}"))
    refused = [r for r in server.requests if r.fault == "auth"]
    # With one slot the requests go one by one: once the first is refused, none of
    # the others is sent with the refused token.
    assert len(refused) == 1


def test_http_request_repr_hides_the_authorization_header() -> None:
    request = HttpRequest("POST", "https://h/x", {"Authorization": "Bearer SECRET"}, b"{}")
    assert "SECRET" not in repr(request)
    assert "redacted" in repr(request)


def test_credentials_in_base_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(na.ValidationError) as info:
        na.NebulaClient(token="t", base_url="https://user:SECRET@ai-nebula.com")
    assert info.value.field == "base_url"
    assert "SECRET" not in str(info.value)


# -- retries, pauses, redirects --------------------------------------------------------


async def test_retry_after_holds_callers_already_waiting_for_a_rate_slot() -> None:
    async with MockNebulaServer(retry_after=0.5, fault_script=["http_429"]) as server:
        limit = na.RateLimit(20, burst=1, adaptive=False)
        async with client_for(server.base_url, rate_limit=limit, max_concurrency=8) as client:
            async with anyio.create_task_group() as group:
                for i in range(8):
                    group.start_soon(client.img2img, na.Img2ImgRequest(model="m", prompt=f"p{i}"))
    refused_at = server.requests[0].received_at
    assert server.requests[0].fault == "http_429"
    during_pause = [
        r.received_at - refused_at for r in server.requests[1:] if r.received_at - refused_at < 0.48
    ]
    # Without the gate re-check, slots at +50, +100, ... ms would be sent into the pause.
    assert during_pause == []
    assert len(server.requests) == 9


async def test_retry_after_on_the_last_attempt_still_pauses_the_client() -> None:
    sent: list[float] = []

    async def busy_once(request: web.Request) -> web.StreamResponse:
        await request.read()
        sent.append(time.monotonic())
        if len(sent) == 1:
            return web.json_response({"code": 503}, status=503, headers={"Retry-After": "0.4"})
        return web.json_response(OK_BODY)

    async with tiny_server({SUBMIT: busy_once}) as (base_url, _):
        policy = na.RetryPolicy(max_attempts=1)
        async with client_for(base_url, retry=policy) as client:
            with pytest.raises(na.ServerError):
                await client.img2img(REQUEST)
            await client.img2img(REQUEST)
    assert sent[1] - sent[0] >= 0.35


async def test_a_429_does_not_use_up_max_attempts() -> None:
    # A refusal for the rate is the limiter's to fix: even with no retries allowed,
    # the submission is repeated (the limiter paced it) instead of failing the job.
    async with MockNebulaServer(retry_after=0.05, fault_script=["http_429", "body_429"]) as server:
        async with client_for(server.base_url, retry=na.RetryPolicy(max_attempts=1)) as client:
            result = await client.img2img(REQUEST)
    assert len(result.urls) == 1
    assert [r.fault for r in server.requests] == ["http_429", "body_429", None]


async def test_redirects_are_not_followed() -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    routes = {SUBMIT: redirect, "/elsewhere": answer(OK_BODY)}
    async with tiny_server(routes) as (base_url, received):
        async with client_for(base_url) as client:
            with pytest.raises(na.APIStatusError) as info:
                await client.img2img(REQUEST)
    assert info.value.status_code == 307
    assert "/elsewhere" in str(info.value)
    assert received == [SUBMIT]  # the token never went to the other address


async def test_aclose_stops_a_request_that_is_retrying() -> None:
    async with MockNebulaServer(faults={"http_502": 1.0}) as server:
        slow = na.RetryPolicy(max_attempts=50, backoff_base=0.2, backoff_max=0.2)
        client = client_for(server.base_url, retry=slow)
        async with client:
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await client.img2img(REQUEST)
                except BaseException as exc:
                    outcome.append(exc)

            task = asyncio.get_running_loop().create_task(call())
            with anyio.fail_after(2):
                while server.request_count < 2:
                    await anyio.sleep(0.01)
        with anyio.fail_after(1):
            await task
    assert isinstance(outcome[0], RuntimeError)
    assert "closed" in str(outcome[0])
    assert server.request_count < 6


# -- batches ---------------------------------------------------------------------------


async def test_duplicate_ids_in_a_batch_are_refused_not_merged() -> None:
    async with MockNebulaServer() as server:
        async with client_for(server.base_url) as client:
            report = await client.run_batch(
                [na.Job(REQUEST, id="a"), na.Job(REQUEST, id="b"), na.Job(REQUEST, id="a")]
            )
    assert [r.ok for r in report.results] == [True, True, False]
    error = report.results[2].error
    assert isinstance(error, na.ValidationError)
    assert error.field == "id"
    assert len(server.requests) == 2
    assert report.urls_by_job["a"] == list(server.requests[0].urls)


async def test_stored_errors_do_not_pin_frames() -> None:
    async with MockNebulaServer(faults={"body_400": 1.0}) as server:
        async with client_for(server.base_url) as client:
            report = await client.run_batch([REQUEST, REQUEST])
    for result in report.results:
        error = result.error
        assert error is not None
        assert error.__traceback__ is None
        cause = error.__cause__ or error.__context__
        assert cause is None or cause.__traceback__ is None


async def test_a_mapping_is_not_taken_for_a_list_of_jobs() -> None:
    async with MockNebulaServer() as server:
        async with client_for(server.base_url) as client:
            with pytest.raises(na.ValidationError, match="mapping") as info:
                await client.run_batch({"model": "m", "prompt": "p"})
            assert info.value.field == "jobs"
            with pytest.raises(na.ValidationError) as info:
                async for _ in client.stream([REQUEST], ordered=True, window=0):
                    pass
            assert info.value.field == "window"
    assert server.requests == []


async def test_a_huge_job_runs_on_a_bounded_number_of_tasks() -> None:
    async with MockNebulaServer(latency=0.01) as server:
        async with client_for(server.base_url, max_concurrency=2) as client:
            peak = 0
            done = anyio.Event()

            async def watch() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, len(asyncio.all_tasks()))
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                result = await client.run_batch([na.Job(REQUEST, id="big", images=60)])
                done.set()
    assert result.results[0].ok
    assert len(result.results[0].urls) == 60
    # Before: one task per submission (60); now two submitters plus the pipeline.
    assert peak < 20


def _exception_instances() -> list[na.NebulaError]:
    return [
        na.NebulaError("plain"),
        na.ValidationError("bad n", field="n"),
        na.APIConnectionError("reset", request_sent=False),
        na.APITimeoutError("slow"),
        na.ResponseDecodeError("junk", status_code=200, path="$.data.images"),
        na.APIStatusError("odd", status_code=302, code=None, msg="moved"),
        na.AuthenticationError("no", status_code=200, code=401, msg="expired"),
        na.RateLimitError("slow down", status_code=429, code=429, retry_after=2.5),
        na.BadRequestError("bad", status_code=200, code=400, msg="prompt"),
        na.ServerError("boom", status_code=502),
    ]


@pytest.mark.parametrize("error", _exception_instances(), ids=lambda e: type(e).__name__)
def test_every_exception_pickles_with_its_fields(error: na.NebulaError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


async def test_trust_env_sends_through_the_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen_by_proxy: list[str] = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        # A forward proxy gets the absolute URL; this one answers in the target's place.
        seen_by_proxy.append(str(request.url))
        await request.read()
        return web.json_response(OK_BODY)

    async with tiny_server({SUBMIT: proxy}) as (proxy_url, _):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # A loopback port nobody listens on: only the proxy can answer for it.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            target = f"http://127.0.0.1:{probe.getsockname()[1]}"
        async with client_for(target, trust_env=True) as client:
            result = await client.img2img(REQUEST)
            again = await client.img2img(REQUEST)  # the remembered proxy answer
        assert result.urls == again.urls == ["https://x/1.png"]
        assert seen_by_proxy == [target + SUBMIT] * 2
        async with client_for(
            target, trust_env=False, retry=na.RetryPolicy(max_attempts=1)
        ) as client:
            with pytest.raises(na.APIConnectionError):
                await client.img2img(REQUEST)
        assert len(seen_by_proxy) == 2


# -- review round 2 --------------------------------------------------------------------


async def test_a_rate_slot_is_not_held_through_a_login() -> None:
    async def slow_login(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(0.5)
        return web.json_response({"code": 200, "msg": "ok", "data": "Bearer good"})

    routes = {LOGIN: slow_login, SUBMIT: answer(OK_BODY)}
    async with tiny_server(routes) as (base_url, received):
        limit = na.RateLimit(10, burst=1, adaptive=False)
        async with client_for(
            base_url, token=None, username="u", password="p", rate_limit=limit, max_concurrency=6
        ) as client:
            sent: list[float] = []

            async def call(i: int) -> None:
                await client.img2img(na.Img2ImgRequest(model="m", prompt=f"p{i}"))
                sent.append(anyio.current_time())

            async with anyio.create_task_group() as group:
                for i in range(6):
                    group.start_soon(call, i)
    assert received.count(LOGIN) == 1
    finished = sorted(sent)
    gaps = [b - a for a, b in itertools.pairwise(finished)]
    # Slots taken during the login would all be sent the moment it ends.
    assert min(gaps) >= 0.07, gaps


async def test_repeated_ids_are_refused_in_input_order() -> None:
    async def jobs() -> AsyncIterator[na.Job]:
        for i in range(400):
            if i % 3 == 0:
                await anyio.lowlevel.checkpoint()  # lets workers interleave as they take jobs
            yield na.Job(na.Img2ImgRequest(model="m", prompt=f"p{i}"), id=str(i // 2))

    async with MockNebulaServer(latency=(0.0, 0.003)) as server:
        async with client_for(server.base_url, max_concurrency=16) as client:
            report = await client.run_batch(jobs())
    firsts, seconds = report.results[0::2], report.results[1::2]
    assert all(r.ok for r in firsts)
    assert not any(r.ok for r in seconds)
    assert all(urls for urls in report.urls_by_job.values())
    assert len(server.requests) == 200


async def test_aclose_wakes_a_caller_sleeping_through_a_retry_after() -> None:
    async with MockNebulaServer(retry_after=5, faults={"http_429": 1.0}) as server:
        client = client_for(server.base_url, retry=na.RetryPolicy(max_attempts=3))
        async with client:
            task = asyncio.get_running_loop().create_task(client.img2img(REQUEST))
            with anyio.fail_after(2):
                while server.request_count < 1:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
        with anyio.fail_after(1), pytest.raises(RuntimeError, match="closed"):
            await task
    assert server.request_count == 1


async def test_trust_env_does_not_add_netrc_credentials_for_the_api_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login corp password corp-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    seen: list[str | None] = []

    async def submit(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        await request.read()
        return web.json_response(OK_BODY)

    async with tiny_server({SUBMIT: submit}) as (base_url, _):
        async with client_for(base_url, token="tok", trust_env=True) as client:
            result = await client.img2img(REQUEST)
    assert result.urls
    assert seen == ["Bearer tok"]


async def test_a_bad_item_error_does_not_pin_the_item() -> None:
    async with MockNebulaServer() as server:
        async with client_for(server.base_url) as client:
            report = await client.run_batch([{"model": "m", "prompt": "p", "n": 99}])
    error = report.results[0].error
    assert isinstance(error, na.ValidationError)
    assert error.__traceback__ is None


async def test_default_headers_go_with_every_request_login_included() -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    def recording(body: dict[str, Any]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            seen.append(
                (
                    request.path,
                    request.headers.get("X-Gateway-Key"),
                    request.headers.get("User-Agent"),
                )
            )
            await request.read()
            return web.json_response(body)

        return handle

    login = recording({"code": 200, "msg": "ok", "data": "Bearer good"})
    routes = {LOGIN: login, SUBMIT: recording(OK_BODY)}
    async with tiny_server(routes) as (base_url, _):
        headers = {"X-Gateway-Key": "gw-1", "User-Agent": "pipeline/2"}
        async with client_for(
            base_url, token=None, username="u", password="p", default_headers=headers
        ) as client:
            await client.img2img(REQUEST)
    assert seen == [(LOGIN, "gw-1", "pipeline/2"), (SUBMIT, "gw-1", "pipeline/2")]


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({"Authorization": "Bearer x"}, "token="),
        ({"content-type": "text/plain"}, "set by the client"),
        ({"Bad Name": "v"}, "not a valid header name"),
        ({"X-Key": "SECRET\r\nX-Evil: 1"}, "control characters"),
        (["X-Key"], "mapping"),
    ],
)
def test_bad_default_headers_are_refused_up_front(headers: Any, fragment: str) -> None:
    with pytest.raises(na.ValidationError, match=fragment) as info:
        na.NebulaClient(token="t", default_headers=headers)
    assert info.value.field == "default_headers"
    assert "SECRET" not in str(info.value)
