"""Codec throughput: ``na.to_payload`` + ``orjson.dumps``, payloads per second.

That pair is what the client runs once per submission to make the body. The
loop is timed in batches; the median of the batches is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

import nebula_async as na

from ._request import REQUEST
from ._stats import Summary, summarize

__all__ = ["run_codec"]


def _batch(count: int) -> float:
    to_payload, dumps, request = na.to_payload, orjson.dumps, REQUEST
    started = time.perf_counter()
    for _ in range(count):
        dumps(to_payload(request))
    return count / (time.perf_counter() - started)


def run_codec(*, count: int, repeats: int, log: Callable[[str], None]) -> Summary:
    """Payloads per second over ``repeats`` batches of ``count`` encodes each."""
    _batch(min(count, 1000))  # warm caches
    result = summarize([_batch(count) for _ in range(repeats)])
    log(f"[codec] to_payload + orjson.dumps: {result.median:,.0f} payloads/s")
    return result
