"""Tests of MockNebulaServer itself, with a plain aiohttp client on loopback.

Payloads here are written by hand, not by the client's codec: the server is the
independent check of that codec, so its tests must not lean on it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import pathlib
import re
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import orjson
import pytest

from nebula_async.testing import (
    FAULT_KINDS,
    IMG2IMG_PATH,
    PNG_SIGNATURE,
    TOKEN_PATH,
    MockNebulaServer,
    ReceivedRequest,
    add_mock_server_arguments,
    busiest_window,
    serve_mock_server,
)

pytestmark = pytest.mark.anyio

DTO = "batchImageGenerationDTO"
STATIC = "Bearer mock-token"
OMIT: Any = object()
DISCONNECTED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "doubao-seedream-4-0-250828",
        "prompt": "a fox",
        "n": 1,
        "size": "1K",
        "temperature": 1,
        "watermark": False,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not OMIT}


def dotted(**overrides: Any) -> dict[str, Any]:
    return {f"{DTO}.{k}": v for k, v in fields(**overrides).items()}


def nested(**overrides: Any) -> dict[str, Any]:
    return {DTO: fields(**overrides)}


def flat(**overrides: Any) -> dict[str, Any]:
    return fields(**overrides)


STYLES = {"dotted": dotted, "nested": nested, "flat": flat}


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def code(self) -> Any:
        return self.json["code"]


async def post(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any = None,
    *,
    auth: str | None = STATIC,
    data: bytes | None = None,
) -> Answer:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    body = data if data is not None else orjson.dumps(payload if payload is not None else dotted())
    async with session.post(url, data=body, headers=headers) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


@asynccontextmanager
async def serve(**knobs: Any) -> AsyncIterator[tuple[MockNebulaServer, aiohttp.ClientSession, str]]:
    async with MockNebulaServer(**knobs) as server, aiohttp.ClientSession() as session:
        yield server, session, server.base_url + IMG2IMG_PATH


async def login(session: aiohttp.ClientSession, server: MockNebulaServer, **creds: Any) -> Any:
    body = {"username": "demo", "password": "demo-password", **creds}
    async with session.post(server.base_url + TOKEN_PATH, json=body) as resp:
        assert resp.status == 200
        return orjson.loads(await resp.read())


def check_png(data: bytes) -> tuple[int, int]:
    """Check signature, IHDR (with CRC) and IDAT size; return (width, height)."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    ihdr = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(b"IHDR" + ihdr)
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", ihdr)
    assert (depth, colour) == (8, 2)
    idat_len, idat_kind = struct.unpack(">I4s", data[33:41])
    assert idat_kind == b"IDAT"
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)
    assert data.endswith(b"IEND\xaeB`\x82")
    return width, height


# --------------------------------------------------------------------------- auth


async def test_login_right_and_wrong() -> None:
    async with serve(token=None) as (server, session, url):
        ok = await login(session, server)
        assert ok["code"] == 200
        assert ok["msg"] == "Operation successful"
        assert ok["data"].startswith("Bearer ")
        wrong = await login(session, server, password="nope")
        assert wrong == {"code": 401, "msg": "username or password incorrect", "data": None}
        async with session.post(server.base_url + TOKEN_PATH, data=b"not json") as resp:
            assert orjson.loads(await resp.read())["code"] == 400
        assert (server.logins, server.login_attempts) == (1, 3)

        assert (await post(session, url, auth=ok["data"])).code == 200
        # token=None: the static token is not accepted.
        refused = await post(session, url, auth=STATIC)
        assert (refused.status, refused.code) == (200, 401)
        assert server.requests[-1].fault == "auth"


async def test_token_expires_after_n_uses() -> None:
    async with serve(token_ttl_uses=2) as (server, session, url):
        token = (await login(session, server))["data"]
        assert [(await post(session, url, auth=token)).code for _ in range(3)] == [200, 200, 401]
        assert [r.fault for r in server.requests] == [None, None, "auth"]
        # The static token never expires; a fresh login gets a fresh token.
        assert (await post(session, url, auth=STATIC)).code == 200
        fresh = (await login(session, server))["data"]
        assert fresh != token
        assert (await post(session, url, auth=fresh)).code == 200
        server.expire_tokens()
        assert (await post(session, url, auth=fresh)).code == 401


async def test_auth_failure_style_http() -> None:
    async with serve(auth_failure_style="http") as (server, session, url):
        answer = await post(session, url, auth="Bearer wrong")
        assert (answer.status, answer.code) == (401, 401)
        record = server.requests[0]
        assert (record.status, record.code, record.fault) == (401, 401, "auth")


@pytest.mark.parametrize(
    "auth", [None, "mock-token", "Bearer Bearer mock-token", "bearer mock-token", "Bearer wrong"]
)
async def test_bad_authorization_refused(auth: str | None) -> None:
    async with serve() as (server, session, url):
        answer = await post(session, url, auth=auth)
        assert answer.status == 200
        assert answer.json == {"code": 401, "msg": "token invalid or expired", "data": None}
        assert server.requests[0].authorization == auth


async def test_doubled_bearer_of_issued_token_refused() -> None:
    async with serve() as (server, session, url):
        token = (await login(session, server))["data"]
        assert (await post(session, url, auth="Bearer " + token)).code == 401
        assert (await post(session, url, auth=token)).code == 200


async def test_authorization_redacted_in_repr() -> None:
    async with serve() as (server, session, url):
        await post(session, url, auth="Bearer Bearer secret-value")
        text = repr(server.requests[0])
        assert "secret-value" not in text
        assert "'Bearer Bearer ***'" in text


# --------------------------------------------------------------------------- payloads


@pytest.mark.parametrize("style", ["dotted", "nested", "flat"])
async def test_each_payload_style_accepted_and_others_refused(style: str) -> None:
    async with serve(payload_style=style) as (server, session, url):
        for other, make in STYLES.items():
            answer = await post(session, url, make(n=2, score=0.5, promptOptions={"a": 1}))
            assert answer.code == (200 if other == style else 400), other
        assert server.requests[0].field("n") == 2


async def test_any_style_accepts_all_three() -> None:
    async with serve(payload_style="any") as (_, session, url):
        for make in STYLES.values():
            assert (await post(session, url, make())).code == 200
        assert (await post(session, url, dotted(bogus=1))).code == 400


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"prompt": OMIT}, f"missing required field {DTO}.prompt"),
        ({"watermark": OMIT}, f"missing required field {DTO}.watermark"),
        ({"bogus": 1}, f"unknown field {DTO}.bogus"),
        ({"response_format": "url"}, f"unknown field {DTO}.response_format"),
        ({"n": "2"}, f"{DTO}.n must be an integer from 1 to 15"),
        ({"n": True}, f"{DTO}.n must be an integer from 1 to 15, got true"),
        ({"n": 0}, f"{DTO}.n must be"),
        ({"n": 16}, f"{DTO}.n must be"),
        ({"n": 1.0}, f"{DTO}.n must be"),
        ({"temperature": True}, f"{DTO}.temperature must be an integer, got true"),
        ({"temperature": 0.7}, f"{DTO}.temperature must be an integer"),
        ({"watermark": 0}, f"{DTO}.watermark must be a boolean"),
        ({"model": ""}, f"{DTO}.model must be a non-empty string"),
        ({"size": 1024}, f"{DTO}.size must be a string"),
        ({"image": None}, f"{DTO}.image must be a string, got null"),
        ({"responseFormat": "png"}, f'{DTO}.responseFormat must be "url" or "b64_json"'),
        ({"score": True}, f"{DTO}.score must be a number"),
        ({"score": "1"}, f"{DTO}.score must be a number"),
        ({"promptOptions": "x"}, f"{DTO}.promptOptions must be an object"),
        ({"sequentialImageGenerationOptions": []}, f"{DTO}.sequentialImageGenerationOptions"),
        ({"optimizePrompt": 1}, f"{DTO}.optimizePrompt must be a string"),
    ],
)
async def test_dotted_rejection_names_the_key(overrides: dict[str, Any], expected: str) -> None:
    async with serve() as (server, session, url):
        answer = await post(session, url, dotted(**overrides))
        assert answer.status == 200
        assert answer.code == 400
        assert answer.json["data"] is None
        assert expected in answer.json["msg"]
        assert server.requests[0].code == 400
        assert server.requests[0].fault is None


async def test_optional_fields_accepted() -> None:
    optional = {
        "image": "https://example.com/in.png",
        "promptOptions": {"mode": "x"},
        "optimizePrompt": "standard",
        "quality": "high",
        "responseFormat": "url",
        "score": 3,
        "sequentialImageGeneration": "auto",
        "sequentialImageGenerationOptions": {"max_images": 3},
    }
    async with serve() as (_, session, url):
        assert (await post(session, url, dotted(**optional))).code == 200


async def test_unprefixed_key_in_dotted_style_refused() -> None:
    async with serve() as (_, session, url):
        answer = await post(session, url, {**dotted(), "model": "m"})
        assert "unknown field model" in answer.json["msg"]


@pytest.mark.parametrize(
    ("style", "payload", "expected"),
    [
        ("nested", nested(prompt=OMIT), f"missing required field {DTO}.prompt"),
        ("nested", nested(n=True), f"{DTO}.n must be"),
        ("nested", {DTO: "x"}, f"{DTO} must be an object"),
        ("nested", {**nested(), "extra": 1}, "unknown field extra"),
        ("flat", flat(prompt=OMIT), "missing required field prompt"),
        ("flat", flat(temperature=False), "temperature must be an integer"),
        ("flat", flat(bogus=1), "unknown field bogus"),
    ],
)
async def test_nested_and_flat_rejections(style: str, payload: Any, expected: str) -> None:
    async with serve(payload_style=style) as (_, session, url):
        answer = await post(session, url, payload)
        assert answer.code == 400
        assert expected in answer.json["msg"]


@pytest.mark.parametrize("body", [b"not json", b"", b"[1, 2]", b'"text"'])
async def test_non_object_body_refused(body: bytes) -> None:
    async with serve() as (server, session, url):
        answer = await post(session, url, data=body)
        assert (answer.status, answer.code) == (200, 400)
        assert server.requests[0].payload is None


# --------------------------------------------------------------------------- faults

JSON_FAULTS = {
    "http_500": (500, 500),
    "http_503": (503, 503),
    "http_504": (504, 504),
    "http_400": (400, 400),
    "http_429": (429, 429),
    "body_500": (200, 500),
    "body_429": (200, 429),
    "body_400": (200, 400),
    "body_401": (200, 401),
    "body_403": (200, 403),
}
OTHER_FAULTS = {"http_502", "drop", "malformed", "empty", "not_object", "slow"}


def test_fault_expectations_cover_every_kind() -> None:
    assert set(JSON_FAULTS) | OTHER_FAULTS == set(FAULT_KINDS)


@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_each_fault_kind(kind: str) -> None:
    async with serve(fault_script=[kind], slow_s=0.1) as (server, session, url):
        started = time.monotonic()
        if kind == "drop":
            with pytest.raises(DISCONNECTED):
                await post(session, url)
            record = server.requests[0]
            assert (record.fault, record.status, record.code) == ("drop", 0, None)
        else:
            answer = await post(session, url)
            record = server.requests[0]
            assert record.fault == kind
            assert record.status == answer.status
            if kind in JSON_FAULTS:
                assert (answer.status, answer.code) == JSON_FAULTS[kind]
                assert answer.headers["Content-Type"] == "application/json"
                assert record.code == answer.code
                assert ("Retry-After" in answer.headers) == (kind == "http_429")
                if kind == "http_429":
                    assert answer.headers["Retry-After"] == "1"
            elif kind == "http_502":
                assert answer.status == 502
                assert answer.headers["Content-Type"].startswith("text/html")
                assert b"502 Bad Gateway" in answer.body
            elif kind == "malformed":
                assert answer.status == 200
                assert answer.body.startswith(b'{"code":200')
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(answer.body)
            elif kind == "empty":
                assert (answer.status, answer.body) == (200, b"")
            elif kind == "not_object":
                assert answer.status == 200
                assert isinstance(answer.json, list)
            else:
                assert kind == "slow"
                assert time.monotonic() - started >= 0.1
                assert answer.code == 200
                assert [i["url"] for i in answer.json["data"]["images"]] == list(record.urls)
            if kind != "slow":
                assert record.urls == ()
        # The fault was one-shot: the next request is answered normally.
        assert (await post(session, url)).code == 200


async def test_fault_script_order_then_random() -> None:
    script = ["http_500", None, "body_429", "drop", "empty"]
    async with serve(fault_script=iter(script), faults={"http_503": 1.0}) as (s, session, url):
        # A refused token consumes no script entry.
        assert (await post(session, url, auth="Bearer nope")).code == 401
        for _ in range(len(script) + 1):
            with suppress(*DISCONNECTED):
                await post(session, url)
        assert [r.fault for r in s.requests] == ["auth", *script, "http_503"]
        assert s.requests[2].code == 200


async def test_endless_fault_script() -> None:
    def every_other() -> Any:
        while True:
            yield "body_500"
            yield None

    async with serve(fault_script=every_other()) as (server, session, url):
        codes = [(await post(session, url)).code for _ in range(4)]
        assert codes == [500, 200, 500, 200]
        assert [r.index for r in server.requests] == [0, 1, 2, 3]


async def test_seeded_fault_rates_and_determinism() -> None:
    faults = {"http_500": 0.2, "body_429": 0.1, "empty": 0.05}
    sequences = []
    for _ in range(2):
        async with serve(faults=faults, seed=7) as (server, session, url):
            await asyncio.gather(*(post(session, url) for _ in range(400)))
            sequences.append([r.fault for r in server.requests])
    assert sequences[0] == sequences[1]
    counts = {kind: sequences[0].count(kind) for kind in [*faults, None]}
    assert 55 <= counts["http_500"] <= 105  # expected 80
    assert 22 <= counts["body_429"] <= 60  # expected 40
    assert 8 <= counts["empty"] <= 35  # expected 20
    assert sum(counts.values()) == 400


async def test_knobs_change_mid_run() -> None:
    async with serve() as (server, session, url):
        assert (await post(session, url)).status == 200
        server.faults = {"http_503": 1.0}
        assert (await post(session, url)).status == 503
        server.faults = None
        server.fault_script = ["body_403"]
        assert (await post(session, url)).code == 403
        assert (await post(session, url)).code == 200


def test_bad_knobs_raise() -> None:
    with pytest.raises(ValueError, match="unknown fault kind 'nope'"):
        MockNebulaServer(faults={"nope": 0.1})
    with pytest.raises(ValueError, match="unknown fault kind 'nope'"):
        MockNebulaServer(fault_script=[None, "nope"])
    with pytest.raises(ValueError, match="sum"):
        MockNebulaServer(faults={"http_500": 0.6, "drop": 0.5})
    with pytest.raises(ValueError, match="probability"):
        MockNebulaServer(faults={"http_500": -0.1})
    with pytest.raises(ValueError, match="latency"):
        MockNebulaServer(latency=(0.3, 0.1))
    with pytest.raises(ValueError, match="payload_style"):
        MockNebulaServer(payload_style="camel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_limit_burst"):
        MockNebulaServer(rate_limit_burst=0)
    server = MockNebulaServer()
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.faults = {"http_501": 0.5}
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.fault_script = ["http_501"]
    with pytest.raises(AttributeError, match="fualts"):
        server.fualts = {}
    with pytest.raises(TypeError):
        server.faults["drop"] = 1.0  # type: ignore[index]
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.base_url


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_http_style() -> None:
    async with serve(rate_limit=5, rate_limit_burst=2) as (server, session, url):
        answers = [await post(session, url) for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 429, 429]
        assert answers[2].headers["Retry-After"] == "1"
        assert answers[2].code == 429
        assert [r.fault for r in server.requests] == [None, None, "rate_limited", "rate_limited"]
        await asyncio.sleep(0.25)  # one emission interval (0.2 s) later a slot is free again
        assert (await post(session, url)).status == 200


@pytest.mark.parametrize(("retry_after", "header"), [(0.5, "0.5"), (2, "2"), (None, None)])
async def test_rate_limit_retry_after_header(retry_after: float | None, header: str | None) -> None:
    async with serve(rate_limit=1, retry_after=retry_after) as (_, session, url):
        await post(session, url)
        answer = await post(session, url)
        assert answer.status == 429
        assert answer.headers.get("Retry-After") == header


async def test_rate_limit_body_style() -> None:
    async with serve(rate_limit=1, rate_limit_style="body") as (server, session, url):
        await post(session, url)
        answer = await post(session, url)
        assert (answer.status, answer.code) == (200, 429)
        assert "Retry-After" not in answer.headers
        assert server.requests[1].fault == "rate_limited"


async def burst(session: aiohttp.ClientSession, url: str, n: int) -> list[Answer]:
    return list(await asyncio.gather(*(post(session, url) for _ in range(n))))


def replay_sliding(
    records: Sequence[ReceivedRequest], capacity: int, window_s: float
) -> list[bool]:
    """Which requests a sliding-window limit admits, replayed from the server's own record
    of arrival times: the server's decisions must match, however the clock ran."""
    passed: list[float] = []
    decisions = []
    for record in records:
        t = record.received_at
        ok = sum(1 for a in passed if a <= t < a + window_s) < capacity
        if ok:
            passed.append(t)
        decisions.append(ok)
    return decisions


REFUSAL_STYLES = [
    # (rate_limit_style, retry_after, HTTP status, Retry-After header)
    ("http", 2, 429, "2"),
    ("http", 0.5, 429, "0.5"),
    ("http", None, 429, None),
    ("body", 1.0, 200, None),
]


@pytest.mark.parametrize(("style", "retry_after", "status", "header"), REFUSAL_STYLES)
async def test_sliding_window_refusal_styles(
    style: str, retry_after: float | None, status: int, header: str | None
) -> None:
    # floor(2.5 * 2.0) = 5 requests in any 2 s window.
    knobs = {"rate_limit": 2.5, "rate_limit_window_s": 2.0, "rate_limit_style": style}
    async with serve(rate_limit_algorithm="sliding_window", retry_after=retry_after, **knobs) as (
        server,
        session,
        url,
    ):
        answers = await burst(session, url, 8)
        refused = [a for a in answers if a.code == 429]
        assert (len(answers) - len(refused), len(refused)) == (5, 3)
        for answer in refused:
            assert answer.status == status
            assert answer.headers.get("Retry-After") == header
            assert answer.json == {"code": 429, "msg": "too many requests", "data": None}
        records = server.requests
        assert [not r.rate_limited for r in records] == replay_sliding(records, 5, 2.0)
        assert {(r.fault, r.status, r.code) for r in records if r.rate_limited} == {
            ("rate_limited", status, 429)
        }


async def test_sliding_window_reopens_when_the_oldest_leaves() -> None:
    async with serve(rate_limit=2, rate_limit_algorithm="sliding_window") as (s, session, url):
        codes = [(await post(session, url)).code for _ in range(3)]
        assert codes == [200, 200, 429]
        await asyncio.sleep(max(0.0, s.requests[0].received_at + 1.0 - time.monotonic()) + 0.02)
        assert (await post(session, url)).code == 200
        assert [not r.rate_limited for r in s.requests] == replay_sliding(s.requests, 2, 1.0)


async def test_fixed_window_counts_from_the_start() -> None:
    # floor(4 * 0.5) = 2 per window [start + 0.5k, start + 0.5(k+1)).
    knobs = {"rate_limit": 4, "rate_limit_algorithm": "fixed_window", "rate_limit_window_s": 0.5}
    async with serve(**knobs) as (server, session, url):
        for _ in range(2):
            await burst(session, url, 4)
            await asyncio.sleep(0.3)
        started = server.started_at
        assert started is not None
        windows: dict[int, list[bool]] = {}
        for record in server.requests:
            key = math.floor((record.received_at - started) / 0.5)
            windows.setdefault(key, []).append(not record.rate_limited)
        # In each window the first two pass and the rest are refused.
        for decisions in windows.values():
            assert decisions == [True] * min(2, len(decisions)) + [False] * (len(decisions) - 2)
        assert any(r.rate_limited for r in server.requests)


async def test_rate_limit_changes_mid_run_by_assignment() -> None:
    # A sliding window of 2 s, far longer than the test: nothing leaves it.
    async with serve(
        rate_limit=2.5, rate_limit_algorithm="sliding_window", rate_limit_window_s=2.0
    ) as (server, session, url):
        assert [a.code for a in await burst(session, url, 6)].count(200) == 5
        server.rate_limit = 1.5  # 3 per window: the 5 already in keep it shut
        assert (await post(session, url)).code == 429
        server.rate_limit = 5  # 10 per window: 5 more
        assert [a.code for a in await burst(session, url, 7)].count(200) == 5
        assert server.rate_limit == 5
        server.rate_limit = None
        assert (await post(session, url)).code == 200


async def test_rate_limit_schedule() -> None:
    # 2 per 10 s window at first; from 0.5 s after the start, 5; from 0.8 s, no limit.
    knobs = {"rate_limit_algorithm": "sliding_window", "rate_limit_window_s": 10.0}
    schedule = [(0.5, 0.5), (0.8, None)]
    async with serve(rate_limit=0.2, rate_limit_schedule=schedule, **knobs) as (s, session, url):
        assert s.rate_limit_schedule == ((0.5, 0.5), (0.8, None))
        assert [a.code for a in await burst(session, url, 3)].count(200) == 2
        assert s.started_at is not None
        await asyncio.sleep(max(0.0, s.started_at + 0.55 - time.monotonic()))
        assert s.rate_limit == 0.2  # an entry applies at the first arrival after its time
        assert [a.code for a in await burst(session, url, 4)].count(200) == 3
        assert s.rate_limit == 0.5
        await asyncio.sleep(max(0.0, s.started_at + 0.85 - time.monotonic()))
        assert [a.code for a in await burst(session, url, 3)] == [200] * 3
        assert s.rate_limit is None
        # Assigning a schedule restarts it (times still count from the start).
        s.rate_limit_schedule = [(0.0, 0.1)]
        assert (await post(session, url)).code == 429
        assert s.rate_limit == 0.1


async def test_changing_the_algorithm_starts_the_limit_afresh() -> None:
    async with serve(rate_limit=1) as (server, session, url):
        assert [(await post(session, url)).code for _ in range(2)] == [200, 429]
        server.rate_limit_algorithm = "sliding_window"
        assert [(await post(session, url)).code for _ in range(2)] == [200, 429]
        server.rate_limit_window_s = 5.0  # 5 per 5 s window, from a clean log
        assert [(await post(session, url)).code for _ in range(6)].count(200) == 5


async def test_records_hold_monotonic_receive_times() -> None:
    async with serve(rate_limit=50, rate_limit_burst=3) as (server, session, url):
        before = time.monotonic()
        await burst(session, url, 10)
        after = time.monotonic()
        times = [r.received_at for r in server.requests]
        assert server.started_at is not None
        assert server.started_at <= before <= times[0]
        assert times == sorted(times)  # index order is arrival order
        assert times[-1] <= after
        refused = [r for r in server.requests if r.rate_limited]
        assert refused
        assert all((r.fault, r.code, r.urls) == ("rate_limited", 429, ()) for r in refused)


async def test_busiest_window_read_back_from_the_record() -> None:
    # The issue-10 stand-in scaled down: at most 10 in any 0.25 s, offered about 3x that.
    knobs = {"rate_limit": 40, "rate_limit_algorithm": "sliding_window"}
    async with serve(rate_limit_window_s=0.25, **knobs) as (server, session, url):
        for _ in range(6):
            await burst(session, url, 8)
            await asyncio.sleep(0.02)
        passed = [r.received_at for r in server.requests if not r.rate_limited]
        assert busiest_window(passed, 0.25) <= 10
        assert [not r.rate_limited for r in server.requests] == replay_sliding(
            server.requests, 10, 0.25
        )
        assert sum(r.rate_limited for r in server.requests) > 0


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"rate_limit": 0}, "rate_limit must be finite and > 0"),
        ({"rate_limit": "fast"}, "rate_limit must be a number"),
        ({"rate_limit": math.inf}, "rate_limit"),
        ({"rate_limit_algorithm": "token_bucket"}, "rate_limit_algorithm must be one of"),
        ({"rate_limit_window_s": 0}, "rate_limit_window_s must be finite and > 0"),
        ({"rate_limit_burst": True}, "rate_limit_burst must be an integer >= 1"),
        ({"rate_limit_style": "json"}, "rate_limit_style must be one of"),
        ({"retry_after": -1}, "retry_after must be finite and >= 0"),
        ({"rate_limit_schedule": "5:10"}, "rate_limit_schedule must be a sequence"),
        ({"rate_limit_schedule": [(1.0,)]}, r"rate_limit_schedule\[0\] must be an \(at_s"),
        ({"rate_limit_schedule": [(1.0, 0)]}, r"rate_limit_schedule\[0\] must be finite and > 0"),
        ({"rate_limit_schedule": [(-1, 5)]}, r"rate_limit_schedule\[0\] must be finite and >= 0"),
        ({"rate_limit_schedule": [(2, 5), (1, 5)]}, "times must not decrease"),
        ({"latency": "0.1"}, "latency must be a number"),
        ({"latency": (0.1, 0.2, 0.3)}, "latency range must be"),
        ({"faults": [("drop", 1.0)]}, "faults must be a mapping"),
        ({"fault_script": 3}, "fault_script must be an iterable"),
        ({"token": ""}, "token must be a non-empty string"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"lean": 1}, "lean must be a bool"),
        ({"port": 70000}, "port must be an integer in 0..65535"),
    ],
)
def test_bad_knob_names_the_knob_in_init_and_on_assignment(
    knobs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        MockNebulaServer(**knobs)
    server = MockNebulaServer()
    ((name, value),) = knobs.items()
    before = getattr(server, name)
    with pytest.raises(ValueError, match=match):
        setattr(server, name, value)
    assert getattr(server, name) is before  # a refused assignment changes nothing


def test_knob_values_are_normalised() -> None:
    server = MockNebulaServer(latency=[0.1, 0.2], token="Bearer abc", rate_limit_schedule=[[1, 2]])
    assert server.latency == (0.1, 0.2)
    assert server.token == "abc"
    assert server.rate_limit_schedule == ((1, 2),)
    assert MockNebulaServer(rate_limit_schedule=None).rate_limit_schedule == ()
    assert list(MockNebulaServer(faults={"http_500": 0.1, "drop": 0.2}).faults) == [
        "drop",
        "http_500",
    ]


def test_repr_hides_credentials() -> None:
    server = MockNebulaServer(token="tok-SECRET", password="pw-SECRET")
    assert "SECRET" not in repr(server)
    assert repr(server) == "<MockNebulaServer not started requests=0 logins=0>"


# --------------------------------------------------------------------------- answers


async def test_latency_fixed_and_range() -> None:
    async with serve(latency=0.2) as (_, session, url):
        started = time.monotonic()
        assert (await post(session, url)).code == 200
        assert time.monotonic() - started >= 0.2
    async with serve(latency=(0.05, 0.1)) as (_, session, url):
        for _ in range(3):
            started = time.monotonic()
            await post(session, url)
            assert 0.05 <= time.monotonic() - started < 1.0


async def test_png_served_and_valid() -> None:
    async with serve() as (server, session, url):
        answer = await post(session, url, dotted(n=2))
        urls = [image["url"] for image in answer.json["data"]["images"]]
        assert urls == [f"{server.base_url}/files/0-0.png", f"{server.base_url}/files/0-1.png"]
        assert server.requests[0].urls == tuple(urls)
        bodies = []
        for image_url in urls:
            async with session.get(image_url) as resp:
                assert resp.status == 200
                assert resp.content_type == "image/png"
                bodies.append(await resp.read())
        assert all(check_png(body) == (8, 8) for body in bodies)
        assert bodies[0] != bodies[1]
        for missing in ("5-0.png", "0-2.png", "nope", "0-0.jpg"):
            async with session.get(f"{server.base_url}/files/{missing}") as resp:
                assert resp.status == 404


async def test_b64_json_answer() -> None:
    async with serve() as (server, session, url):
        answer = await post(session, url, dotted(n=2, responseFormat="b64_json"))
        images = answer.json["data"]["images"]
        assert len(images) == 2
        assert all(set(image) == {"b64_json"} for image in images)
        assert check_png(base64.b64decode(images[0]["b64_json"])) == (8, 8)
        assert server.requests[0].urls == ()


async def test_urls_unique() -> None:
    async with serve() as (server, session, url):
        answers = await asyncio.gather(*(post(session, url, dotted(n=3)) for _ in range(40)))
        urls = [image["url"] for a in answers for image in a.json["data"]["images"]]
        assert len(urls) == len(set(urls)) == 120
        assert sorted(urls) == sorted(u for r in server.requests for u in r.urls)


async def test_max_in_flight_and_counters() -> None:
    async with serve(latency=0.2) as (server, session, url):
        await asyncio.gather(*(post(session, url) for _ in range(6)))
        assert server.max_in_flight == 6
        assert server.in_flight == 0
        assert server.request_count == len(server.requests) == 6
        assert sorted(r.index for r in server.requests) == list(range(6))
        assert [r.index for r in server.requests] == list(range(6))  # arrival order


async def test_lean_mode() -> None:
    async with serve(lean=True, latency=0.05) as (server, session, url):
        answers = await asyncio.gather(*(post(session, url) for _ in range(10)))
        assert {a.body for a in answers} == {answers[0].body}
        assert answers[0].json["data"]["images"] == [{"url": f"{server.base_url}/files/lean-0.png"}]
        # No validation in lean mode, but auth is still checked.
        assert (await post(session, url, data=b"junk")).code == 200
        assert (await post(session, url, auth="Bearer nope")).code == 401
        token = (await login(session, server))["data"]
        assert (await post(session, url, auth=token)).code == 200
        assert server.requests == []
        assert server.request_count == 13
        assert server.max_in_flight == 10
        async with session.get(f"{server.base_url}/files/lean-0.png") as resp:
            check_png(await resp.read())


@pytest.mark.parametrize("style", ["dotted", "nested", "flat"])
async def test_field_helper(style: str) -> None:
    async with serve(payload_style="any") as (server, session, url):
        make = STYLES[style]
        await post(session, url, make(n=3, responseFormat="url", promptOptions={"k": 1}))
        record = server.requests[0]
        assert record.field("prompt") == "a fox"
        assert record.field("n") == 3
        assert record.field("watermark") is False
        assert record.field("response_format") == "url"
        assert record.field("responseFormat") == "url"
        assert record.field("prompt_options") == {"k": 1}
        assert record.field("image") is None
        with pytest.raises(KeyError, match="bogus"):
            record.field("bogus")


def test_field_helper_without_payload() -> None:
    record = ReceivedRequest(
        index=0,
        payload=None,
        authorization=None,
        fault=None,
        status=200,
        code=400,
        urls=(),
        received_at=0.0,
    )
    assert record.field("prompt") is None


# --------------------------------------------------------------------------- lifecycle


async def test_clean_close_with_requests_in_flight() -> None:
    # Two requests wait in the "slow" fault, the third in plain latency.
    server = MockNebulaServer(fault_script=["slow", "slow", None], slow_s=30, latency=30)
    async with aiohttp.ClientSession() as session:
        await server.start()
        url = server.base_url + IMG2IMG_PATH
        tasks = [asyncio.ensure_future(post(session, url)) for _ in range(3)]
        for _ in range(200):
            if server.in_flight == 3:
                break
            await asyncio.sleep(0.01)
        assert server.in_flight == 3
        started = time.monotonic()
        await server.aclose()
        assert time.monotonic() - started < 1.5
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, DISCONNECTED) for r in results), results
        assert [r.status for r in server.requests] == [0, 0, 0]
        await server.aclose()  # idempotent
    leftovers = [
        t for t in asyncio.all_tasks() if "web_protocol" in repr(t) or "_mock_server" in repr(t)
    ]
    assert leftovers == []
    with pytest.raises(RuntimeError):
        await server.start()


async def test_close_after_client_gave_up() -> None:
    # The client times out during latency: aiohttp forgets that connection, the server must not.
    async with serve(latency=30) as (server, session, url):
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.1):
                await post(session, url)
        await asyncio.sleep(0.05)
        assert server.in_flight == 1
    assert server.in_flight == 0


# --------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mock-server")
    add_mock_server_arguments(parser)
    return parser.parse_args(argv)


def test_parse_flags() -> None:
    args = parse(
        [
            "--port", "0", "--latency", "0.01:0.02", "--fault", "http_500=0.1",
            "--fault", "drop=0.05", "--rate-limit", "20", "--rate-limit-burst", "4",
            "--rate-limit-style", "body", "--retry-after", "none", "--token-ttl-uses", "3",
            "--auth-failure-style", "http", "--payload-style", "any", "--username", "u",
            "--password", "p", "--token", "", "--slow", "0.5", "--seed", "42", "--lean",
            "--duration", "1.5", "--host", "::1",
        ]
    )  # fmt: skip
    assert args.port == 0
    assert args.latency == (0.01, 0.02)
    assert args.faults == {"http_500": 0.1, "drop": 0.05}
    assert (args.rate_limit, args.rate_limit_burst, args.rate_limit_style) == (20, 4, "body")
    assert args.retry_after is None
    assert args.token_ttl_uses == 3
    assert (args.auth_failure_style, args.payload_style) == ("http", "any")
    assert (args.username, args.password, args.token) == ("u", "p", None)  # --token "": none
    assert (args.slow_s, args.seed, args.lean, args.duration) == (0.5, 42, True, 1.5)
    assert args.host == "::1"
    defaults = parse([])
    assert (defaults.host, defaults.port, defaults.latency) == ("127.0.0.1", 8000, 0.0)
    assert (defaults.faults, defaults.duration, defaults.seed) == (None, None, 0)
    assert parse(["--host", "localhost"]).host == "127.0.0.1"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--latency", "fast"], "--latency"),
        (["--latency", "0.3:0.1"], "--latency"),
        (["--latency", "-1"], "--latency"),
        (["--fault", "nope=0.1"], "--fault"),
        (["--fault", "http_500"], "--fault"),
        (["--fault", "http_500=1.5"], "--fault"),
        (["--fault", "http_500=0.7", "--fault", "drop=0.5"], "--fault"),
        (["--host", "0.0.0.0"], "--host"),
        (["--host", "example.com"], "--host"),
        (["--port", "70000"], "--port"),
        (["--rate-limit", "0"], "--rate-limit"),
        (["--rate-limit-burst", "0"], "--rate-limit-burst"),
        (["--rate-limit-style", "both"], "--rate-limit-style"),
        (["--retry-after", "soon"], "--retry-after"),
        (["--token-ttl-uses", "-1"], "--token-ttl-uses"),
        (["--seed", "x"], "--seed"),
        (["--duration", "nan"], "--duration"),
        (["--rate-limit-algorithm", "token_bucket"], "--rate-limit-algorithm"),
        (["--rate-limit-window", "0"], "--rate-limit-window"),
        (["--rate-limit-schedule", "5"], "--rate-limit-schedule"),
        (["--rate-limit-schedule", "5:0"], "--rate-limit-schedule"),
        (["--rate-limit-schedule", "5:10,2:20"], "--rate-limit-schedule"),
        (["--rate-limit-schedule", "x:10"], "--rate-limit-schedule"),
    ],
)
def test_bad_flag_values(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse(argv)
    assert exc_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


async def test_serve_mock_server(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--port", "0", "--duration", "0.5", "--fault", "body_500=1"])
    task = asyncio.ensure_future(serve_mock_server(args))
    out = ""
    for _ in range(200):
        out += capsys.readouterr().out
        if out:
            break
        await asyncio.sleep(0.01)
    match = re.fullmatch(r"nebula mock server listening on (http://127\.0\.0\.1:(\d+))\n", out)
    assert match, out
    assert int(match.group(2)) > 0
    async with aiohttp.ClientSession() as session:
        answer = await post(session, match.group(1) + IMG2IMG_PATH)
        assert answer.code == 500
    assert await asyncio.wait_for(task, 5) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "1 img2img requests (0 refused by the rate limit)" in captured.err


def test_parse_rate_limit_flags() -> None:
    args = parse(
        [
            "--rate-limit", "20", "--rate-limit-algorithm", "sliding_window",
            "--rate-limit-window", "0.5", "--rate-limit-schedule", "10:10, 20:30,25:none",
        ]
    )  # fmt: skip
    assert (args.rate_limit, args.rate_limit_algorithm) == (20, "sliding_window")
    assert args.rate_limit_window_s == 0.5
    assert args.rate_limit_schedule == ((10, 10), (20, 30), (25, None))
    defaults = parse([])
    assert (defaults.rate_limit, defaults.rate_limit_algorithm) == (None, "gcra")
    assert (defaults.rate_limit_window_s, defaults.rate_limit_schedule) == (1.0, None)
    assert (defaults.rate_limit_style, defaults.retry_after) == ("http", 1.0)


def test_help_describes_the_rate_limit_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse(["--help"])
    assert exc_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--rate-limit R",
        "--rate-limit-algorithm {gcra,sliding_window,fixed_window}",
        "--rate-limit-window W",
        "--rate-limit-burst B",
        "--rate-limit-schedule AT:R[,AT:R...]",
        "--rate-limit-style {http,body}",
        "--retry-after S",
    ):
        assert flag in text, flag
    assert "at most floor(R*W)" in text


async def test_flags_reach_the_server(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    argv = ["--port", "0", "--duration", "1", "--rate-limit", "2",
            "--rate-limit-algorithm", "sliding_window", "--rate-limit-window", "5",
            "--rate-limit-style", "body", "--record", str(tmp_path / "record.jsonl")]  # fmt: skip
    task = asyncio.ensure_future(serve_mock_server(parse(argv)))
    out = ""
    for _ in range(200):
        out += capsys.readouterr().out
        if out:
            break
        await asyncio.sleep(0.01)
    base_url = out.split()[-1]
    async with aiohttp.ClientSession() as session:
        codes = [(await post(session, base_url + IMG2IMG_PATH)).code for _ in range(12)]
    assert codes == [200] * 10 + [429] * 2  # floor(2 * 5) = 10 in the 5 s window
    assert await asyncio.wait_for(task, 5) == 0
    err = capsys.readouterr().err
    assert "12 img2img requests (2 refused by the rate limit)" in err
    assert "busiest 5 s window 10 admitted" in err
    lines = [orjson.loads(line) for line in (tmp_path / "record.jsonl").read_bytes().splitlines()]
    assert [line["index"] for line in lines] == list(range(12))
    assert [line["fault"] for line in lines] == [None] * 10 + ["rate_limited"] * 2
    assert {(line["status"], line["code"]) for line in lines[10:]} == {(200, 429)}
    assert all(0 <= line["received_s"] < 1 for line in lines)
    assert [line["received_s"] for line in lines] == sorted(line["received_s"] for line in lines)


async def test_unwritable_record_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    args = parse(["--port", "0", "--record", str(tmp_path / "no-such-dir" / "r.jsonl")])
    assert await asyncio.wait_for(serve_mock_server(args), 5) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "cannot write the record" in captured.err
    assert "No such file or directory" in captured.err


async def test_busy_port_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            await MockNebulaServer(port=port).start()
        code = await asyncio.wait_for(serve_mock_server(parse(["--port", str(port)])), 5)
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"nebula mock server: cannot listen on 127.0.0.1 port {port}: ")
    assert "in use" in lines[0]
