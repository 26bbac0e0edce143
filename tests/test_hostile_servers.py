"""Hostile answers against the client, each from a purpose-built server on 127.0.0.1.

A gzip bomb, an answer whose Content-Length is over the cap, a chunked answer that
never ends, a 5 MB ``msg``, an oversize getToken answer and image URLs that are not
http(s): each must end as a bounded error, never as memory or a stall.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cache
from typing import Any

import pytest
from aiohttp import web

import nebula_async as na

pytestmark = pytest.mark.anyio

REQUEST = na.Img2ImgRequest(model="m", prompt="a fox")
SUBMIT = "/prod-api/nebula/v4/api/img2imgSubmit"
LOGIN = "/prod-api/v3/auth/getToken"
ONCE = na.RetryPolicy(max_attempts=1)
MiB = 2**20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def server(routes: dict[str, Handler]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("POST", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def client_for(base_url: str, **options: Any) -> na.NebulaClient:
    options.setdefault("token", "t")
    options.setdefault("retry", ONCE)
    options.setdefault("timeout", 10.0)
    return na.NebulaClient(base_url=base_url, **options)


@cache
def gzip_bomb(inflated_mib: int = 400) -> bytes:
    """A valid gzip answer ``{"code":500,"msg":"   ...   "}`` of ``inflated_mib`` MiB.

    Built in ~0.2 s rather than by compressing 400 MiB: after a full flush, deflate
    restarts with an empty window, so one compressed MiB of spaces can be repeated.
    """
    block = b" " * MiB
    head, tail = b'{"code":500,"msg":"', b'"}'
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.compress(tail) + deflate.flush()
    crc = zlib.crc32(head)
    for _ in range(inflated_mib):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(tail, crc)
    size = (len(head) + inflated_mib * MiB + len(tail)) & 0xFFFFFFFF
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, size)
    return gzip_header + start + repeated * inflated_mib + end + trailer


def test_the_gzip_bomb_is_what_it_claims() -> None:
    # The construction, checked whole on a small one (gzip checks the CRC and size)...
    assert gzip.decompress(gzip_bomb(3)) == b'{"code":500,"msg":"' + b" " * 3 * MiB + b'"}'
    # ...and the big one: ~400 KB that start inflating as the same JSON.
    bomb = gzip_bomb()
    assert len(bomb) < 450_000
    first = zlib.decompressobj(31).decompress(bomb, MiB)
    assert first == b'{"code":500,"msg":"' + b" " * (MiB - 19)


async def test_a_gzip_bomb_stops_at_the_cap_without_inflating_whole() -> None:
    bomb = gzip_bomb()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=bomb, headers=headers)

    async with server({SUBMIT: handle}) as base_url:
        async with client_for(base_url, max_response_bytes=16 * MiB) as client:
            tracemalloc.start()
            try:
                started = time.perf_counter()
                with pytest.raises(na.ResponseDecodeError) as caught:
                    await client.img2img(REQUEST)
                elapsed = time.perf_counter() - started
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    error = caught.value
    assert "answer too large" in str(error)
    assert "after decompression" in str(error)
    assert "16,777,216" in str(error)
    # Read whole, the answer would take 400 MiB (and twice that while joined).
    assert peak < 60 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    assert len(str(error)) < 300
    assert not any(isinstance(v, bytes | bytearray) for v in vars(error).values())
    assert elapsed < 3


async def test_an_announced_oversize_answer_is_refused_before_reading() -> None:
    never = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 50 * MiB
        await response.prepare(request)
        await response.write(b'{"code":200,"msg":"')
        await never.wait()  # the rest never comes: only the header can end this
        return response

    async with server({SUBMIT: handle}) as base_url:
        async with client_for(base_url, max_response_bytes=MiB) as client:
            started = time.perf_counter()
            with pytest.raises(na.ResponseDecodeError, match="Content-Length is 52,428,800"):
                await client.img2img(REQUEST)
            assert time.perf_counter() - started < 2
        never.set()


async def test_an_endless_chunked_answer_stops_at_the_cap() -> None:
    sent = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"code":200,"msg":"')
        chunk = b"x" * 65536
        for _ in range(2000):  # 125 MiB if nobody stops reading: bounded all the same
            await response.write(chunk)
            sent += len(chunk)
        return response

    async with server({SUBMIT: handle}) as base_url:
        async with client_for(base_url, max_response_bytes=2 * MiB) as client:
            with pytest.raises(na.ResponseDecodeError, match="answer too large") as caught:
                await client.img2img(REQUEST)
    assert "after decompression" not in str(caught.value)
    assert sent < 20 * MiB  # the client hung up soon after the cap


async def test_an_answer_of_exactly_the_cap_is_read() -> None:
    body = json.dumps(
        {"code": 200, "msg": "ok", "data": {"images": [{"url": "https://cdn.example/1.png"}]}}
    ).encode()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()  # no Content-Length: the streamed count decides
        await response.prepare(request)
        await response.write(body)
        return response

    async with server({SUBMIT: handle}) as base_url:
        async with client_for(base_url, max_response_bytes=len(body)) as client:
            result = await client.img2img(REQUEST)
        async with client_for(base_url, max_response_bytes=len(body) - 1) as client:
            with pytest.raises(na.ResponseDecodeError, match="answer too large"):
                await client.img2img(REQUEST)
    assert result.urls == ["https://cdn.example/1.png"]


async def test_a_huge_msg_is_truncated_on_errors_and_results() -> None:
    huge = "m" * (5 * MiB)

    async def refuse(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"code": 400, "msg": huge})

    async def accept(request: web.Request) -> web.StreamResponse:
        await request.read()
        images = [{"url": "https://cdn.example/1.png"}]
        return web.json_response({"code": 200, "msg": huge, "data": {"images": images}})

    async with server({SUBMIT: refuse}) as base_url, client_for(base_url) as client:
        with pytest.raises(na.BadRequestError) as caught:
            await client.img2img(REQUEST)
    error = caught.value
    assert error.msg == "m" * 1000 + f"... ({5 * MiB - 1000} more)"
    assert len(str(error)) < 1100
    async with server({SUBMIT: accept}) as base_url, client_for(base_url) as client:
        result = await client.img2img(REQUEST)
    assert result.msg.endswith(f"... ({5 * MiB - 1000} more)")
    assert len(result.msg) < 1100


async def test_an_oversize_login_answer_is_refused() -> None:
    # A token answer is a few hundred bytes; getToken is capped at 1 MiB whatever
    # the client's max_response_bytes.
    async def login(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"code": 200, "msg": "ok", "data": "t" * (2 * MiB)})

    async with (
        server({LOGIN: login}) as base_url,
        client_for(base_url, token=None, username="u", password="p") as client,
    ):
        with pytest.raises(na.ResponseDecodeError, match=r"over max_response_bytes \(1,048,576"):
            await client.img2img(REQUEST)


@pytest.mark.parametrize(
    "url",
    ["", "javascript:alert(1)", "file:///etc/passwd", "data:image/png;base64,AAAA", "https://"],
)
async def test_an_answer_naming_a_non_http_image_url_is_malformed(url: str) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        images = [{"url": url}]
        return web.json_response({"code": 200, "msg": "ok", "data": {"images": images}})

    async with server({SUBMIT: handle}) as base_url, client_for(base_url) as client:
        with pytest.raises(na.ResponseDecodeError) as caught:
            await client.img2img(REQUEST)
    assert caught.value.path == "$.data.images[0].url"


def test_max_response_bytes_must_be_a_positive_integer() -> None:
    for bad in (0, -1, True, 1.5, "1000", None):
        with pytest.raises(na.ValidationError) as caught:
            na.NebulaClient(token="t", max_response_bytes=bad)
        assert caught.value.field == "max_response_bytes"


def test_plain_http_is_refused_off_loopback_unless_allowed() -> None:
    with pytest.raises(na.ValidationError, match="unencrypted") as caught:
        na.NebulaClient(token="secret-token-1", base_url="http://api.example.com")
    assert caught.value.field == "base_url"
    assert "secret-token-1" not in str(caught.value)
    na.NebulaClient(token="t", base_url="http://api.example.com", allow_insecure_http=True)
    for loopback in ("http://127.0.0.1:8080", "http://localhost", "http://[::1]:9"):
        na.NebulaClient(token="t", base_url=loopback)
