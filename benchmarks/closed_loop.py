"""Closed-loop runs: throughput and client CPU per request, contenders alternating.

Each sample runs in a fresh event loop: the contender opens its client, warms
its connections with ``2 x concurrency`` requests, then sends ``requests``
requests (fewer for a slow contender: as many as the warm-up rate says fit in
``target_s`` seconds, at least ``4 x concurrency``) while this process's CPU
time (``time.process_time``: every thread of the client process, and nothing of
the server, which runs in its own process) and the server's CPU time are read
around it. Rounds alternate the contenders
(A B C A B C ...), so drift of the machine hits them all alike.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable, Mapping

import attrs

from ._cpu import machine_busy_seconds
from ._server import ServerProcess
from ._stats import Summary, summarize
from .contenders import Contender

__all__ = ["ClosedLoopResult", "Sample", "run_closed_loop"]


@attrs.frozen
class Sample:
    """One timed batch of one contender."""

    requests: int
    wall_s: float
    cpu_s: float
    server_cpu_s: float
    machine_busy_s: float
    round_index: int = 0

    @property
    def per_second(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6

    @property
    def server_busy(self) -> float:
        """The server's CPU time over the wall time: near 1.0, the server was the limit."""
        return self.server_cpu_s / self.wall_s

    @property
    def other_load(self) -> float:
        """Cores kept busy by other work on the machine (neither client nor server)."""
        return max(0.0, self.machine_busy_s - self.cpu_s - self.server_cpu_s) / self.wall_s


@attrs.frozen
class ClosedLoopResult:
    """Every round of one contender, summarized."""

    contender: str
    samples: tuple[Sample, ...]
    failures: tuple[str, ...]

    @property
    def per_second(self) -> Summary:
        return summarize([s.per_second for s in self.samples])

    @property
    def cpu_us_per_request(self) -> Summary:
        return summarize([s.cpu_us_per_request for s in self.samples])

    @property
    def server_busy(self) -> Summary:
        return summarize([s.server_busy for s in self.samples])

    @property
    def other_load(self) -> Summary:
        return summarize([s.other_load for s in self.samples])


async def _sample(
    contender: Contender,
    base_url: str,
    server: ServerProcess,
    *,
    concurrency: int,
    requests: int,
    target_s: float,
    cap_s: float,
) -> Sample:
    async with contender(base_url, concurrency) as runner:
        warm = 2 * concurrency
        started = time.perf_counter()
        await runner.batch(warm)  # open and warm every connection
        warm_rate = warm / (time.perf_counter() - started)
        fit = int(warm_rate * target_s) // concurrency * concurrency
        requests = max(4 * concurrency, min(requests, fit))
        gc.collect()
        server_cpu = server.cpu_seconds()
        busy = machine_busy_seconds()
        cpu = time.process_time()
        started = time.perf_counter()
        async with asyncio.timeout(cap_s):
            urls = await runner.batch(requests)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        server_cpu = server.cpu_seconds() - server_cpu
        busy = machine_busy_seconds() - busy
    if urls != requests:
        raise RuntimeError(f"parsed {urls} URLs for {requests} requests")
    return Sample(requests, wall, cpu, server_cpu, busy)


def run_closed_loop(
    contenders: Mapping[str, Contender],
    server: ServerProcess,
    *,
    concurrency: int,
    requests: int,
    rounds: int,
    target_s: float,
    cap_s: float,
    log: Callable[[str], None],
    label: str,
) -> dict[str, ClosedLoopResult]:
    """``rounds`` rounds of every contender in turn against ``server``."""
    samples: dict[str, list[Sample]] = {name: [] for name in contenders}
    failures: dict[str, list[str]] = {name: [] for name in contenders}
    for round_index in range(rounds):
        for name, contender in contenders.items():
            try:
                sample = asyncio.run(
                    _sample(
                        contender,
                        server.base_url,
                        server,
                        concurrency=concurrency,
                        requests=requests,
                        target_s=target_s,
                        cap_s=cap_s,
                    )
                )
            except Exception as exc:  # one failing round is reported, not fatal
                message = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
                failures[name].append(f"round {round_index + 1}: {message}")
                log(f"[{label}] round {round_index + 1}/{rounds} {name}: FAILED {message}")
                continue
            samples[name].append(attrs.evolve(sample, round_index=round_index))
            log(
                f"[{label}] round {round_index + 1}/{rounds} {name:<17} "
                f"{sample.per_second:8.0f} req/s {sample.cpu_us_per_request:7.0f} us/req "
                f"server {sample.server_busy:4.0%} other {sample.other_load:4.0%} "
                f"({sample.requests} requests)"
            )
    return {
        name: ClosedLoopResult(name, tuple(samples[name]), tuple(failures[name]))
        for name in contenders
    }


def paired_ratio(result: ClosedLoopResult, baseline: ClosedLoopResult, what: str) -> float:
    """The median over rounds of ``result``'s figure over ``baseline``'s in the same round.

    Rounds sit seconds apart, so a pair shares the machine's state; on a machine
    whose speed drifts this is steadier than the ratio of two medians.
    """
    base = {s.round_index: getattr(s, what) for s in baseline.samples}
    ratios = [
        getattr(s, what) / base[s.round_index] for s in result.samples if base.get(s.round_index)
    ]
    return summarize(ratios).median


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``, NaN when either is missing."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return math.nan
    return value / baseline
