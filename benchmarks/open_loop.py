"""Open-loop latency: requests fired on a fixed schedule, timed from the schedule.

A closed loop sends the next request only when one comes back, so a slow client
sends less and its queueing never shows (coordinated omission). Here request
``i`` is due at ``t0 + i / rate`` whatever happened before, and its latency runs
from that *scheduled* time to its parsed answer (wrk2's rule): a client that
falls behind pays for it in every later request. The rate is kept below
saturation, so the figure is the latency each client adds, not a queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import attrs

from ._stats import Summary, percentile, summarize
from .contenders import Contender

__all__ = ["OpenLoopResult", "run_open_loop"]

_START_DELAY_S = 0.05


@attrs.frozen
class OpenLoopResult:
    """Per-round latency percentiles of one contender, in seconds."""

    contender: str
    p50: Summary
    p99: Summary
    max: Summary
    requests: int
    failures: tuple[str, ...]


async def _latencies(
    contender: Contender,
    base_url: str,
    *,
    concurrency: int,
    rate: float,
    duration_s: float,
    cap_s: float,
) -> list[float]:
    offsets = [index / rate for index in range(round(rate * duration_s))]
    async with contender(base_url, concurrency) as runner:
        assert runner.open_loop is not None
        await runner.batch(2 * concurrency)  # open and warm the connections
        async with asyncio.timeout(duration_s + cap_s):
            return await runner.open_loop(offsets, time.monotonic() + _START_DELAY_S)


def run_open_loop(
    contenders: Mapping[str, Contender],
    base_url: str,
    *,
    concurrency: int,
    rate: float,
    duration_s: float,
    rounds: int,
    cap_s: float,
    log: Callable[[str], None],
) -> dict[str, OpenLoopResult]:
    """``rounds`` rounds of every contender in turn, each ``duration_s`` at ``rate``/s."""
    p50s: dict[str, list[float]] = {name: [] for name in contenders}
    p99s: dict[str, list[float]] = {name: [] for name in contenders}
    maxima: dict[str, list[float]] = {name: [] for name in contenders}
    failures: dict[str, list[str]] = {name: [] for name in contenders}
    for round_index in range(rounds):
        for name, contender in contenders.items():
            try:
                latencies = asyncio.run(
                    _latencies(
                        contender,
                        base_url,
                        concurrency=concurrency,
                        rate=rate,
                        duration_s=duration_s,
                        cap_s=cap_s,
                    )
                )
            except Exception as exc:  # one failing round is reported, not fatal
                message = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
                failures[name].append(f"round {round_index + 1}: {message}")
                log(f"[open loop] round {round_index + 1}/{rounds} {name}: FAILED {message}")
                continue
            p50s[name].append(percentile(latencies, 0.50))
            p99s[name].append(percentile(latencies, 0.99))
            maxima[name].append(max(latencies))
            log(
                f"[open loop] round {round_index + 1}/{rounds} {name:<17} "
                f"p50 {p50s[name][-1] * 1e3:6.2f} ms  p99 {p99s[name][-1] * 1e3:6.2f} ms  "
                f"max {maxima[name][-1] * 1e3:6.2f} ms"
            )
    requests = round(rate * duration_s)
    return {
        name: OpenLoopResult(
            name,
            summarize(p50s[name]),
            summarize(p99s[name]),
            summarize(maxima[name]),
            requests,
            tuple(failures[name]),
        )
        for name in contenders
    }
