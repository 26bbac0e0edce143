"""The contenders: the same img2img work written with each client users might pick.

Every contender sends the same request, ``na.to_payload`` of :data:`REQUEST`
encoded per request with orjson (as the library does), with
``Authorization: Bearer mock-token``, and parses every answer down to its image
URLs, so the comparison is of the clients, not of the codecs. Each one opens its
client inside the running loop and yields a :class:`Runner`:

- ``batch(n)``: ``n`` requests at the contender's concurrency (closed loop);
  returns the number of image URLs parsed;
- ``open_loop(offsets, t0)``: one request due at ``t0 + offset`` each, whatever the
  previous ones are doing (wrk2's rule); returns each request's latency from its
  *scheduled* time.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import aiohttp
import aiometer
import httpx
import orjson

import nebula_async as na

from ._request import REQUEST, TOKEN

__all__ = ["CONTENDERS", "OPEN_LOOP_CONTENDERS", "REQUEST", "Contender", "Runner"]

_PATH: Final = "/prod-api/nebula/v4/api/img2imgSubmit"
_HEADERS: Final = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _body() -> bytes:
    return orjson.dumps(na.to_payload(REQUEST))


def _urls(status: int, body: bytes) -> int:
    """Parse an answer as a careful hand-written client would; the number of URLs."""
    answer = orjson.loads(body)
    if status != 200 or answer.get("code") != 200:
        raise RuntimeError(f"unexpected answer: HTTP {status} {body[:200]!r}")
    return len([image["url"] for image in answer["data"]["images"]])


OneRequest = Callable[[], Awaitable[int]]


class Runner:
    """What a contender can do once its client is open."""

    def __init__(
        self,
        batch: Callable[[int], Awaitable[int]],
        one: OneRequest | None = None,
        open_loop: Callable[[Sequence[float], float], Awaitable[list[float]]] | None = None,
    ) -> None:
        self.batch = batch
        self.one = one
        if open_loop is None and one is not None:
            open_loop = functools.partial(_open_loop_tasks, one)
        self.open_loop = open_loop


async def _sleep_until(at: float) -> None:
    delay = at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _open_loop_tasks(one: OneRequest, offsets: Sequence[float], t0: float) -> list[float]:
    """A task per request, started at its scheduled time; latency from that time."""
    latencies = [math.nan] * len(offsets)

    async def fire(index: int, at: float) -> None:
        await one()
        latencies[index] = time.monotonic() - at

    tasks: list[asyncio.Task[None]] = []
    for index, offset in enumerate(offsets):
        at = t0 + offset
        await _sleep_until(at)
        tasks.append(asyncio.create_task(fire(index, at)))
    await asyncio.gather(*tasks)
    return latencies


async def _gather_one(one: OneRequest, n: int) -> int:
    return sum(await asyncio.gather(*(one() for _ in range(n))))


Contender = Callable[[str, int], AbstractAsyncContextManager[Runner]]


@asynccontextmanager
async def raw_aiohttp(base_url: str, concurrency: int) -> AsyncIterator[Runner]:
    """One session, an ``asyncio.Semaphore``, ``asyncio.gather``: what users write by hand."""
    url = base_url + _PATH
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with (
                semaphore,
                session.post(url, data=_body(), headers=_HEADERS) as response,
            ):
                body = await response.read()
            return _urls(response.status, body)

        yield Runner(functools.partial(_gather_one, one), one)


@asynccontextmanager
async def httpx_async(base_url: str, concurrency: int) -> AsyncIterator[Runner]:
    """``httpx.AsyncClient`` (the OpenAI SDK's default) with a semaphore and gather."""
    url = base_url + _PATH
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:

        async def one() -> int:
            async with semaphore:
                response = await client.post(url, content=_body(), headers=_HEADERS)
            return _urls(response.status_code, response.content)

        yield Runner(functools.partial(_gather_one, one), one)


@asynccontextmanager
async def aiometer_aiohttp(base_url: str, concurrency: int) -> AsyncIterator[Runner]:
    """aiohttp with ``aiometer.run_all(..., max_at_once=concurrency)`` as the fan-out."""
    url = base_url + _PATH
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(url, data=_body(), headers=_HEADERS) as response:
                body = await response.read()
            return _urls(response.status, body)

        async def batch(n: int) -> int:
            results = await aiometer.run_all([one] * n, max_at_once=concurrency)
            return sum(results)

        yield Runner(batch)


def _client(base_url: str, concurrency: int) -> na.NebulaClient:
    return na.NebulaClient(token=TOKEN, base_url=base_url, max_concurrency=concurrency)


@asynccontextmanager
async def ours_img2img(base_url: str, concurrency: int) -> AsyncIterator[Runner]:
    """``asyncio.gather`` over ``client.img2img`` calls; the client's limiter bounds them."""
    async with _client(base_url, concurrency) as client:

        async def one() -> int:
            result = await client.img2img(REQUEST)
            return len(result.urls)

        yield Runner(functools.partial(_gather_one, one), one)


def _jobs(n: int) -> Any:
    return (REQUEST for _ in range(n))


@asynccontextmanager
async def ours_run_batch(base_url: str, concurrency: int) -> AsyncIterator[Runner]:
    """``client.run_batch`` over a generator of requests."""
    async with _client(base_url, concurrency) as client:

        async def batch(n: int) -> int:
            report = await client.run_batch(_jobs(n))
            return sum(len(result.urls) for result in report.results)

        yield Runner(batch)


@asynccontextmanager
async def ours_stream(base_url: str, concurrency: int) -> AsyncIterator[Runner]:
    """``async for result in client.stream(jobs)`` over a generator of requests."""
    async with _client(base_url, concurrency) as client:

        async def batch(n: int) -> int:
            urls = 0
            async for result in client.stream(_jobs(n)):
                urls += len(result.urls)
            return urls

        async def open_loop(offsets: Sequence[float], t0: float) -> list[float]:
            # The jobs come from an async generator that yields each one at its
            # scheduled time; latency runs from that time to the result's arrival.
            async def paced() -> AsyncIterator[na.Img2ImgRequest]:
                for offset in offsets:
                    await _sleep_until(t0 + offset)
                    yield REQUEST

            latencies = [math.nan] * len(offsets)
            async for result in client.stream(paced()):
                index = int(result.job_id)
                latencies[index] = time.monotonic() - (t0 + offsets[index])
            return latencies

        yield Runner(batch, open_loop=open_loop)


#: Closed-loop contenders, in the order they alternate; the first is the baseline.
CONTENDERS: Final[dict[str, Contender]] = {
    "raw aiohttp": raw_aiohttp,
    "httpx": httpx_async,
    "aiometer+aiohttp": aiometer_aiohttp,
    "ours img2img": ours_img2img,
    "ours run_batch": ours_run_batch,
    "ours stream": ours_stream,
}

#: Open-loop contenders (aiometer needs the whole input up front, so it has no open loop).
OPEN_LOOP_CONTENDERS: Final[dict[str, Contender]] = {
    name: CONTENDERS[name] for name in ("raw aiohttp", "httpx", "ours img2img", "ours stream")
}
