"""Rate-limiter accuracy: pure acquire loops, no HTTP.

Each limiter is asked for ``rate x duration`` slots as fast as it will give them,
and the moment each acquire returns is stamped. Two figures per limiter:

- **long-run error**: the rate after the first second (past any start-up
  burst), ``(slots - 1) / (last - first)``, against the target; a limiter that
  re-bases its schedule on late timer wake-ups runs slow here;
- **busiest window**: the most slots in any half-open one-second window
  ``[t, t + 1)``; a limiter that may burst ``b`` slots has ``rate + b - 1`` as
  its bound, so ``rate + burst`` is a safe target.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import aiolimiter
import aiometer
import attrs

import nebula_async as na
from nebula_async._limits import in_process_limiter

from ._stats import busiest_window, long_run_rate

__all__ = ["LIMITERS", "LimiterResult", "run_limiters"]

_WINDOW_S: Final = 1.0


async def _ours(rate: float, n: int, stamps: list[float]) -> None:
    limiter = in_process_limiter(na.RateLimit(rate))  # the client's embedded limiter
    for _ in range(n):
        await limiter.acquire()
        stamps.append(time.monotonic())


async def _aiolimiter(limiter: aiolimiter.AsyncLimiter, n: int, stamps: list[float]) -> None:
    for _ in range(n):
        async with limiter:
            stamps.append(time.monotonic())


async def _aiometer(rate: float, n: int, stamps: list[float]) -> None:
    async def stamp(_: int) -> None:
        stamps.append(time.monotonic())

    await aiometer.run_on_each(stamp, range(n), max_per_second=rate)


AcquireLoop = Callable[[float, int, list[float]], Awaitable[None]]


@attrs.frozen
class LimiterSpec:
    """How one contender is configured for a target ``rate``, and the burst it allows."""

    describe: Callable[[float], str]
    burst: Callable[[float], int]
    loop: AcquireLoop


LIMITERS: Final[dict[str, LimiterSpec]] = {
    "ours (GCRA, burst=1)": LimiterSpec(
        lambda rate: f"InProcessLimiter(RateLimit({rate:g}))", lambda rate: 1, _ours
    ),
    "aiolimiter (rate, 1)": LimiterSpec(
        lambda rate: f"AsyncLimiter({rate:g}, 1)",
        lambda rate: math.ceil(rate),
        lambda rate, n, stamps: _aiolimiter(aiolimiter.AsyncLimiter(rate, 1), n, stamps),
    ),
    "aiolimiter (default 60 s)": LimiterSpec(
        lambda rate: f"AsyncLimiter({rate * 60:g})",
        lambda rate: math.ceil(rate * 60),
        lambda rate, n, stamps: _aiolimiter(aiolimiter.AsyncLimiter(rate * 60), n, stamps),
    ),
    "aiolimiter (1, 1/rate)": LimiterSpec(
        lambda rate: f"AsyncLimiter(1, 1/{rate:g})",
        lambda rate: 1,
        lambda rate, n, stamps: _aiolimiter(aiolimiter.AsyncLimiter(1, 1 / rate), n, stamps),
    ),
    "aiometer max_per_second": LimiterSpec(
        lambda rate: f"run_on_each(max_per_second={rate:g})", lambda rate: 1, _aiometer
    ),
}


@attrs.frozen
class LimiterResult:
    """One limiter at one rate."""

    limiter: str
    config: str
    rate: float
    burst: int
    slots: int
    duration_s: float
    long_run_rate: float
    busiest_window: int
    first_second: int

    @property
    def long_run_error(self) -> float:
        """Relative error of the long-run rate (-0.06 is 6% slow); NaN when unknown."""
        return self.long_run_rate / self.rate - 1


async def _bounded(loop: Awaitable[None], cap_s: float) -> None:
    async with asyncio.timeout(cap_s):
        await loop


def run_limiters(
    rates: Sequence[float],
    *,
    duration_s: float,
    cap_s: float,
    log: Callable[[str], None],
    limiters: dict[str, LimiterSpec] = LIMITERS,
) -> list[LimiterResult]:
    """Every limiter at every rate, one fresh event loop each, ``rate x duration_s`` slots."""
    results: list[LimiterResult] = []
    for rate in rates:
        n = round(rate * duration_s)
        for name, spec in limiters.items():
            stamps: list[float] = []

            try:
                asyncio.run(_bounded(spec.loop(rate, n, stamps), cap_s))
            except TimeoutError:
                log(f"[limiter] {name} at {rate:g}/s: timed out after {len(stamps)} slots")
            stamps.sort()
            first = bisect.bisect_left(stamps, stamps[0] + _WINDOW_S) if stamps else 0
            result = LimiterResult(
                limiter=name,
                config=spec.describe(rate),
                rate=rate,
                burst=spec.burst(rate),
                slots=len(stamps),
                duration_s=stamps[-1] - stamps[0] if stamps else math.nan,
                long_run_rate=long_run_rate(stamps),
                busiest_window=busiest_window(stamps),
                first_second=first,
            )
            results.append(result)
            log(
                f"[limiter] {rate:>5g}/s {name:<26} long-run {result.long_run_error:+7.2%}  "
                f"busiest 1 s {result.busiest_window:>5}  first 1 s {result.first_second:>5}"
            )
    return results
