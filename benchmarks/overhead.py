"""The library's own CPU per job, the network left out.

On this kind of machine the real-server CPU figures move by +-20-30% between
rounds, too much to see a 10 us change. Here the client's transport is replaced
by an in-process fake that yields to the event loop once and returns the lean
server's answer, so what is left is our code: limits, retries bookkeeping,
encoding, decoding, the batch pipeline. The baseline does the same work by hand
(a semaphore, ``asyncio.gather``, ``to_payload`` + ``orjson.dumps``, parse to
URLs) over the same fake. Rounds alternate; medians of CPU microseconds per job.

The fake goes in through the client's private ``_transport.send``: if that
attribute moves, this part fails loudly rather than measuring something else.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

import orjson

import nebula_async as na

from ._request import REQUEST, TOKEN
from ._stats import Summary, summarize

__all__ = ["VARIANTS", "run_overhead"]

_ANSWER: Final = orjson.dumps(
    {
        "code": 200,
        "msg": "Operation successful",
        "data": {"images": [{"url": "http://127.0.0.1:9/files/lean-0.png"}]},
    }
)
_HEADERS: Final = {"Content-Type": "application/json"}
_CONCURRENCY: Final = 64


async def _fake_send(request: Any) -> tuple[int, Mapping[str, str], bytes]:
    await asyncio.sleep(0)
    return 200, _HEADERS, _ANSWER


async def _by_hand(n: int) -> int:
    semaphore = asyncio.Semaphore(_CONCURRENCY)

    async def one() -> int:
        async with semaphore:
            orjson.dumps(na.to_payload(REQUEST))
            _, _, body = await _fake_send(None)
        answer = orjson.loads(body)
        return len([image["url"] for image in answer["data"]["images"]])

    return sum(await asyncio.gather(*(one() for _ in range(n))))


def _client() -> na.NebulaClient:
    return na.NebulaClient(token=TOKEN, base_url="http://127.0.0.1:9", max_concurrency=_CONCURRENCY)


def _faked(client: na.NebulaClient) -> None:
    transport = client._transport  # the one seam for an in-process fake
    if not hasattr(transport, "send"):
        raise RuntimeError("NebulaClient._transport.send is gone: update benchmarks/overhead.py")
    transport.send = _fake_send  # type: ignore[method-assign]


async def _img2img(n: int) -> int:
    async with _client() as client:
        _faked(client)
        results = await asyncio.gather(*(client.img2img(REQUEST) for _ in range(n)))
    return sum(len(result.urls) for result in results)


async def _run_batch(n: int) -> int:
    async with _client() as client:
        _faked(client)
        report = await client.run_batch(REQUEST for _ in range(n))
    return sum(len(result.urls) for result in report.results)


async def _stream(n: int) -> int:
    urls = 0
    async with _client() as client:
        _faked(client)
        async for result in client.stream(REQUEST for _ in range(n)):
            urls += len(result.urls)
    return urls


#: The first is the baseline.
VARIANTS: Final[dict[str, Callable[[int], Coroutine[Any, Any, int]]]] = {
    "by hand (semaphore + gather)": _by_hand,
    "ours img2img": _img2img,
    "ours run_batch": _run_batch,
    "ours stream": _stream,
}


async def _timed(variant: Callable[[int], Coroutine[Any, Any, int]], jobs: int) -> float:
    gc.collect()
    cpu = time.process_time()
    urls = await variant(jobs)
    cpu = time.process_time() - cpu
    if urls != jobs:
        raise RuntimeError(f"parsed {urls} URLs for {jobs} jobs")
    return cpu / jobs * 1e6


def run_overhead(
    *, jobs: int, rounds: int, log: Callable[[str], None]
) -> dict[str, tuple[Summary, Summary]]:
    """(CPU microseconds per job, its ratio to the baseline's in the same round) of each
    variant, over ``rounds`` alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for variant in VARIANTS.values():
        asyncio.run(variant(_CONCURRENCY * 4))  # warm imports and caches
    for round_index in range(rounds):
        for name, variant in VARIANTS.items():
            samples[name].append(asyncio.run(_timed(variant, jobs)))
            log(
                f"[overhead] round {round_index + 1}/{rounds} {name:<28} "
                f"{samples[name][-1]:6.1f} us/job"
            )
    baseline = next(iter(samples.values()))
    return {
        name: (summarize(values), summarize([v / b for v, b in zip(values, baseline, strict=True)]))
        for name, values in samples.items()
    }
