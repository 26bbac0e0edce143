"""The client against a real MockNebulaServer over loopback: retries, auth, limits.

Nothing here mocks aiohttp or the client's internals: every test sends real HTTP
to 127.0.0.1 and checks what the server recorded.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import nebula_async as na
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio

FAST = na.RetryPolicy(max_attempts=4, backoff_base=0.001, backoff_max=0.01)
REQUEST = na.Img2ImgRequest(model="doubao-seedream-4-0-250828", prompt="a fox", n=2)


def client_for(server: MockNebulaServer, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "mock-token")
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 5.0)
    return na.NebulaClient(base_url=server.base_url, **options)


@pytest.fixture
async def server() -> AsyncIterator[MockNebulaServer]:
    async with MockNebulaServer(retry_after=None) as running:
        yield running


async def test_single_call_returns_urls(server: MockNebulaServer) -> None:
    async with client_for(server) as client:
        result = await client.img2img(REQUEST)
    assert len(result.urls) == 2
    assert list(result.urls) == list(server.requests[0].urls)
    assert result.code == 200
    assert server.requests[0].authorization == "Bearer mock-token"


RETRIED = [
    "http_500",
    "http_502",
    "http_503",
    "http_504",
    "body_500",
    "body_429",
    "http_429",
    "drop",
    "malformed",
    "empty",
    "not_object",
]


@pytest.mark.parametrize("fault", RETRIED)
async def test_retried_faults_recover(server: MockNebulaServer, fault: str) -> None:
    server.fault_script = [fault, fault]
    async with client_for(server) as client:
        result = await client.img2img(REQUEST)
        stats = client.statistics()
    assert len(result.urls) == 2
    assert [r.fault for r in server.requests] == [fault, fault, None]
    assert (stats.attempts, stats.retries) == (3, 2)
    assert stats.rate_limited == (2 if "429" in fault else 0)


NOT_RETRIED = [
    ("body_400", na.BadRequestError),
    ("http_400", na.BadRequestError),
    ("body_403", na.AuthenticationError),
    ("body_401", na.AuthenticationError),
]


@pytest.mark.parametrize(("fault", "error"), NOT_RETRIED)
async def test_refusals_are_not_retried(
    server: MockNebulaServer, fault: str, error: type[na.NebulaError]
) -> None:
    server.fault_script = [fault]
    async with client_for(server) as client:
        with pytest.raises(error):
            await client.img2img(REQUEST)
    assert len(server.requests) == 1


async def test_attempts_run_out_with_the_last_error(server: MockNebulaServer) -> None:
    server.fault_script = ["http_503"] * 10
    async with client_for(server) as client:
        with pytest.raises(na.ServerError) as info:
            await client.img2img(REQUEST)
    assert info.value.status_code == 503
    assert len(server.requests) == FAST.max_attempts


@pytest.mark.parametrize(
    ("fault", "retried"),
    [
        ("http_503", True),
        ("http_429", True),
        ("body_429", True),
        ("http_500", False),
        ("body_500", False),
        ("drop", False),
        ("malformed", False),
    ],
)
async def test_retry_ambiguous_false_only_repeats_unprocessed(
    server: MockNebulaServer, fault: str, retried: bool
) -> None:
    server.fault_script = [fault]
    policy = na.RetryPolicy(max_attempts=3, backoff_base=0.001, retry_ambiguous=False)
    async with client_for(server, retry=policy) as client:
        if retried:
            await client.img2img(REQUEST)
        else:
            with pytest.raises(na.NebulaError):
                await client.img2img(REQUEST)
    assert len(server.requests) == (2 if retried else 1)


async def test_connect_refused_is_a_connection_error_never_sent() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    policy = na.RetryPolicy(max_attempts=2, backoff_base=0.001, retry_ambiguous=False)
    async with na.NebulaClient(
        token="t", base_url=f"http://127.0.0.1:{port}", retry=policy
    ) as client:
        with pytest.raises(na.APIConnectionError) as info:
            await client.img2img(REQUEST)
        assert client.statistics().attempts == 2  # retried even with retry_ambiguous=False
    assert info.value.request_sent is False


async def test_timeout_per_attempt_then_recovery(server: MockNebulaServer) -> None:
    server.slow_s = 2.0
    server.fault_script = ["slow"]
    started = time.monotonic()
    async with client_for(server, timeout=0.3) as client:
        result = await client.img2img(REQUEST)
    assert len(result.urls) == 2
    assert time.monotonic() - started < 1.5
    assert [r.fault for r in server.requests] == ["slow", None]


async def test_timeout_exhausted_raises_api_timeout_error(server: MockNebulaServer) -> None:
    server.slow_s = 2.0
    server.fault_script = ["slow", "slow"]
    policy = na.RetryPolicy(max_attempts=2, backoff_base=0.001)
    async with client_for(server, timeout=na.Timeout(attempt=0.2), retry=policy) as client:
        with pytest.raises(na.APITimeoutError):
            await client.img2img(REQUEST)


async def test_timeout_does_not_count_waiting_for_a_slot(server: MockNebulaServer) -> None:
    # One slot, 0.25 s per answer, 0.4 s per attempt: the fourth call waits ~0.75 s
    # for its slot, longer than its timeout, and must still succeed.
    server.latency = 0.25
    async with client_for(server, max_concurrency=1, timeout=0.4) as client:
        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(client.img2img, REQUEST)
    assert all(r.fault is None for r in server.requests)
    assert len(server.requests) == 4


async def test_retry_after_above_cap_raises_at_once() -> None:
    async with MockNebulaServer(retry_after=30, fault_script=["http_429"]) as server:
        policy = na.RetryPolicy(max_attempts=5, retry_after_max=5.0)
        async with client_for(server, retry=policy) as client:
            started = time.monotonic()
            with pytest.raises(na.RateLimitError) as info:
                await client.img2img(REQUEST)
    assert time.monotonic() - started < 1.0
    assert info.value.retry_after == 30
    assert len(server.requests) == 1


async def test_retry_after_pauses_the_whole_client() -> None:
    async with MockNebulaServer(retry_after=0.5, fault_script=["http_429"]) as server:
        async with client_for(server, max_concurrency=4) as client:
            await_first = anyio.Event()

            async def first() -> None:
                await client.img2img(REQUEST)

            async def later() -> None:
                await await_first.wait()
                await client.img2img(na.Img2ImgRequest(model="m", prompt="later"))

            async with anyio.create_task_group() as group:
                group.start_soon(first)
                group.start_soon(later)
                with anyio.fail_after(2):
                    while not server.requests:
                        await anyio.sleep(0.005)
                    while client.statistics().rate_limited == 0:
                        await anyio.sleep(0.005)
                await_first.set()
    refused_at = server.requests[0].received_at
    later_sends = [r.received_at for r in server.requests if r.field("prompt") == "later"]
    # The other caller was held back by the pause, not just the one that got the 429.
    assert later_sends[0] - refused_at >= 0.45


async def test_server_rate_limit_adaptive_client_gets_everything_through() -> None:
    async with MockNebulaServer(rate_limit=40, rate_limit_burst=2, retry_after=None) as server:
        policy = na.RetryPolicy(max_attempts=20, backoff_base=0.02, backoff_max=0.2)
        limit = na.RateLimit(80, burst=2)  # deliberately above the server's cap
        async with client_for(server, rate_limit=limit, retry=policy, max_concurrency=16) as client:
            report = await client.run_batch(
                na.Img2ImgRequest(model="m", prompt=f"p{i}") for i in range(60)
            )
            current = client.statistics().current_rate
    assert report.succeeded == 60
    assert report.rate_limited > 0
    assert report.rate_limited == sum(1 for r in server.requests if r.fault == "rate_limited")
    assert current is not None
    assert current < 80  # the adaptive limiter backed off


async def test_client_rate_limit_spaces_sends(server: MockNebulaServer) -> None:
    async with client_for(
        server, rate_limit=na.RateLimit(50, burst=1), max_concurrency=8
    ) as client:
        await client.run_batch(na.Img2ImgRequest(model="m", prompt=f"p{i}") for i in range(26))
    times = sorted(r.received_at for r in server.requests)
    span = times[-1] - times[0]
    assert span >= 25 / 50 * 0.95  # 25 intervals of 20 ms


async def test_max_concurrency_is_respected(server: MockNebulaServer) -> None:
    server.latency = 0.02
    async with client_for(server, max_concurrency=5) as client:
        await client.run_batch(na.Img2ImgRequest(model="m", prompt=f"p{i}") for i in range(40))
    assert server.max_in_flight == 5


# -- auth ------------------------------------------------------------------------------


async def test_login_is_lazy_and_single_flight() -> None:
    async with (
        MockNebulaServer(token=None) as server,
        client_for(server, token=None, username="demo", password="demo-password") as client,
    ):
        assert server.login_attempts == 0
        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(client.img2img, REQUEST)
        assert client.statistics().logins == 1
    assert server.logins == 1


@pytest.mark.parametrize("style", ["body", "http"])
async def test_expired_token_single_flight_relogin(style: str) -> None:
    async with MockNebulaServer(token=None, token_ttl_uses=60, auth_failure_style=style) as server:
        server.latency = 0.01
        async with client_for(
            server, token=None, username="demo", password="demo-password", max_concurrency=50
        ) as client:
            # 60 uses of the first token, then 50 concurrent calls hit the expired token.
            await client.run_batch(na.Img2ImgRequest(model="m", prompt=f"a{i}") for i in range(60))
            assert server.logins == 1
            async with anyio.create_task_group() as group:
                for i in range(50):
                    group.start_soon(client.img2img, na.Img2ImgRequest(model="m", prompt=f"b{i}"))
            stats = client.statistics()
    assert server.logins == 2  # one re-login for all 50, not 50
    refused = [r for r in server.requests if r.fault == "auth"]
    assert refused
    # Every refused call was repeated: all 110 jobs succeeded.
    assert stats.submissions_ok == 110
    assert stats.submissions_failed == 0
    # The repeats are counted as attempts but did not use up max_attempts.
    assert stats.attempts == len(server.requests)


async def test_static_token_and_credentials_relogin_when_token_refused() -> None:
    async with (
        MockNebulaServer(token="other") as server,
        client_for(server, token="stale", username="demo", password="demo-password") as client,
    ):
        result = await client.img2img(REQUEST)
    assert len(result.urls) == 2
    assert [r.fault for r in server.requests] == ["auth", None]
    assert server.logins == 1


async def test_refused_static_token_without_credentials_raises() -> None:
    async with MockNebulaServer(token="other") as server:
        async with client_for(server, token="wrong") as client:
            with pytest.raises(na.AuthenticationError) as info:
                await client.img2img(REQUEST)
    assert len(server.requests) == 1
    assert "wrong" not in str(info.value)


async def test_wrong_password_is_not_a_retry_loop() -> None:
    async with MockNebulaServer(token=None) as server:
        async with client_for(server, token=None, username="demo", password="nope") as client:
            async with anyio.create_task_group() as group:
                errors: list[BaseException] = []

                async def call() -> None:
                    try:
                        await client.img2img(REQUEST)
                    except na.AuthenticationError as exc:
                        errors.append(exc)

                for _ in range(10):
                    group.start_soon(call)
    assert len(errors) == 10
    assert server.login_attempts == 1
    assert server.requests == []
    assert all("nope" not in str(e) for e in errors)


async def test_bearer_prefix_is_sent_once(server: MockNebulaServer) -> None:
    async with client_for(server, token="Bearer mock-token") as client:
        await client.img2img(REQUEST)
    assert server.requests[0].authorization == "Bearer mock-token"


async def test_env_vars(server: MockNebulaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEBULA_TOKEN", "mock-token")
    monkeypatch.setenv("NEBULA_BASE_URL", server.base_url)
    async with na.NebulaClient(retry=FAST) as client:
        await client.img2img(REQUEST)
    monkeypatch.delenv("NEBULA_TOKEN")
    monkeypatch.setenv("NEBULA_USERNAME", "demo")
    monkeypatch.setenv("NEBULA_PASSWORD", "demo-password")
    async with na.NebulaClient(retry=FAST) as client:
        await client.img2img(REQUEST)
        assert client.statistics().logins == 1


def test_no_credentials_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NEBULA_TOKEN", "NEBULA_USERNAME", "NEBULA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(na.ValidationError, match="NEBULA_TOKEN"):
        na.NebulaClient()


# -- payload styles, lifecycle, secrets -------------------------------------------------


@pytest.mark.parametrize("style", ["dotted", "nested", "flat"])
async def test_each_payload_style_is_accepted_by_a_strict_server(style: str) -> None:
    async with MockNebulaServer(payload_style=style) as server:
        request = na.Img2ImgRequest(
            model="m",
            prompt="p",
            image="https://x.example/in.png",
            prompt_options={"a": 1},
            response_format="url",
            score=0.5,
            sequential_image_generation="auto",
            sequential_image_generation_options={"max_images": 3},
            quality="hd",
            optimize_prompt="x",
        )
        async with client_for(server, payload_style=style) as client:
            result = await client.img2img(request)
    assert len(result.urls) == 1
    assert server.requests[0].fault is None


async def test_wrong_payload_style_is_refused_naming_the_key() -> None:
    async with MockNebulaServer(payload_style="nested") as server:
        async with client_for(server, payload_style="dotted") as client:
            with pytest.raises(na.BadRequestError, match="batchImageGenerationDTO"):
                await client.img2img(REQUEST)


async def test_b64_json_images(server: MockNebulaServer) -> None:
    async with client_for(server) as client:
        result = await client.img2img(
            na.Img2ImgRequest(model="m", prompt="p", response_format="b64_json")
        )
    assert result.urls == []
    assert result.images[0].b64_json


async def test_use_outside_async_with_is_a_clear_error(server: MockNebulaServer) -> None:
    client = client_for(server)
    with pytest.raises(RuntimeError, match="async with"):
        await client.img2img(REQUEST)
    async with client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await client.img2img(REQUEST)
    with pytest.raises(RuntimeError, match="closed"):
        async with client:
            pass
    await client.aclose()  # idempotent


async def test_secrets_never_leak() -> None:
    async with MockNebulaServer(token="tok-SECRET", password="pw-SECRET") as server:
        server.fault_script = ["body_401", None]  # forces a re-login with the password
        client = client_for(server, token="tok-SECRET", username="demo", password="pw-SECRET")
        assert "SECRET" not in repr(client)
        async with client:
            result = await client.img2img(REQUEST)
            assert "SECRET" not in repr(client)
            assert client.statistics().logins == 1
        assert "SECRET" not in repr(result)
        assert "SECRET" not in repr(client.statistics())
        assert "SECRET" not in repr(server.requests)


async def test_bad_client_options() -> None:
    with pytest.raises(na.ValidationError, match="max_concurrency"):
        na.NebulaClient(token="t", max_concurrency=0)
    with pytest.raises(na.ValidationError, match="payload_style"):
        na.NebulaClient(token="t", payload_style="xml")
    with pytest.raises(na.ValidationError, match="rate_limit"):
        na.NebulaClient(token="t", rate_limit="fast")  # type: ignore[arg-type]
    with pytest.raises(na.ValidationError, match="timeout"):
        na.NebulaClient(token="t", timeout=-1)
    with pytest.raises(na.ValidationError, match="password"):
        na.NebulaClient(username="u")


async def test_img2img_refuses_a_non_request(server: MockNebulaServer) -> None:
    async with client_for(server) as client:
        with pytest.raises(na.ValidationError, match="Img2ImgRequest"):
            await client.img2img({"model": "m"})  # type: ignore[arg-type]
    assert server.requests == []


async def test_logs_explain_retries_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="nebula_async")
    async with MockNebulaServer(token="tok-SECRET", password="pw-SECRET") as server:
        server.fault_script = ["http_502", "body_401", None]
        async with client_for(
            server, token="tok-SECRET", username="demo", password="pw-SECRET"
        ) as c:
            await c.img2img(REQUEST)
    assert "retrying in" in caplog.text
    assert "logging in again" in caplog.text
    assert "SECRET" not in caplog.text
