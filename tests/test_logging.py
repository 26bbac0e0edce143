"""The ``nebula_async`` logger: pauses, rate cuts, re-logins and circuit trips at INFO
or above, retries at DEBUG, and never a secret."""

from __future__ import annotations

import logging

import pytest

import nebula_async as na
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio

FAST = na.RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.01)
REQUEST = na.Img2ImgRequest(model="m", prompt="p")


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "nebula_async" and r.levelno == level
    ]


async def test_pause_rate_cut_retry_and_relogin_are_logged_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="nebula_async")
    async with MockNebulaServer(
        retry_after=0.05, fault_script=["http_429", "http_502"], token_ttl_uses=2
    ) as server:
        async with na.NebulaClient(
            username="demo",
            password="demo-password",
            base_url=server.base_url,
            rate_limit=50,
            retry=FAST,
        ) as client:
            for _ in range(4):
                await client.img2img(REQUEST)
    info = _messages(caplog, logging.INFO)
    assert any(m.startswith("Retry-After: pausing every request for 0.05s") for m in info)
    assert any(m.startswith("refused for the rate: sending at") for m in info)
    assert any(m.startswith("token refused") for m in info)
    assert any(m.startswith("retrying in") for m in _messages(caplog, logging.DEBUG))
    text = caplog.text
    assert "demo-password" not in text
    assert "Bearer" not in text


async def test_an_open_circuit_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nebula_async")
    async with MockNebulaServer() as server:
        async with na.NebulaClient(
            token="revoked", base_url=server.base_url, max_concurrency=2, circuit_breaker=3
        ) as client:
            await client.run_batch([REQUEST] * 20)
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith("circuit open: not attempted: the batch stopped after 3")
    assert "revoked" not in caplog.text
