"""Closed-loop runs: throughput and client CPU per request, contenders alternating.

Each sample runs in a fresh event loop: the contender opens its client, warms
its connections with ``2 x concurrency`` requests, then sends ``requests``
requests (fewer for a slow contender: as many as the warm-up rate says fit in
``target_s`` seconds, at least ``4 x concurrency``) while this process's CPU
time (``time.process_time``: every thread of the client process, and nothing of
the server, which runs in its own process) and the server's CPU time are read
around it. Rounds alternate the contenders (A B C A B C ...), so drift of the
machine hits them all alike; with a ``baseline`` the baseline also runs between
every two others (R A R B R C R A ...), so that each sample is compared with the
baseline measured just before and just after it (:func:`paired_ratio`). On this
kind of VM the client's speed drifts by +-25% within a minute: a baseline seconds
away is a much closer reference than one a whole round away.
"""

from __future__ import annotations

import asyncio
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from ._cpu import machine_busy_seconds
from ._server import ServerProcess
from ._stats import Summary, summarize

if TYPE_CHECKING:  # the contenders need httpx and aiometer; the pairing logic does not
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
    #: Minor page faults of the client process during the batch (first touches of
    #: fresh pages: each costs system time, and glibc's heap trimming makes them).
    page_faults: int = 0
    #: The sample's place in the whole run's sequence of samples (all contenders).
    position: int = 0

    @property
    def per_second(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6

    @property
    def faults_per_request(self) -> float:
        return self.page_faults / self.requests

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
    def faults_per_request(self) -> Summary:
        return summarize([s.faults_per_request for s in self.samples])

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
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu = time.process_time()
        started = time.perf_counter()
        async with asyncio.timeout(cap_s):
            urls = await runner.batch(requests)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        server_cpu = server.cpu_seconds() - server_cpu
        busy = machine_busy_seconds() - busy
    if urls != requests:
        raise RuntimeError(f"parsed {urls} URLs for {requests} requests")
    return Sample(requests, wall, cpu, server_cpu, busy, page_faults=faults)


def _schedule(names: list[str], rounds: int, baseline: str | None) -> list[tuple[int, str]]:
    """(round index, contender) in run order: A B C C B A A B C ..., or with a
    baseline R between every two others and at both ends: R A R B R C R C R B ... R.

    Every other round runs backwards: a sample inherits the process's state from
    the one before it (glibc's heap, the collector's generations), and on this VM
    that state decides whether a sample pays page faults, so no contender should
    always follow the same one.
    """

    def in_round(r: int, members: list[str]) -> list[str]:
        return members if r % 2 == 0 else members[::-1]

    if baseline is None or baseline not in names:
        return [(r, name) for r in range(rounds) for name in in_round(r, names)]
    others = [name for name in names if name != baseline]
    order = [(0, baseline)]
    for r in range(rounds):
        for name in in_round(r, others):
            order += [(r, name), (r, baseline)]
    return order


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
    baseline: str | None = None,
) -> dict[str, ClosedLoopResult]:
    """``rounds`` rounds of every contender in turn against ``server``; ``baseline``
    (a contender's name), if given, also runs between every two others."""
    samples: dict[str, list[Sample]] = {name: [] for name in contenders}
    failures: dict[str, list[str]] = {name: [] for name in contenders}
    for position, (round_index, name) in enumerate(_schedule(list(contenders), rounds, baseline)):
        contender = contenders[name]
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
        samples[name].append(attrs.evolve(sample, round_index=round_index, position=position))
        log(
            f"[{label}] round {round_index + 1}/{rounds} {name:<17} "
            f"{sample.per_second:8.0f} req/s {sample.cpu_us_per_request:7.0f} us/req "
            f"server {sample.server_busy:4.0%} other {sample.other_load:4.0%} "
            f"faults/req {sample.faults_per_request:4.2f} "
            f"({sample.requests} requests)"
        )
    return {
        name: ClosedLoopResult(name, tuple(samples[name]), tuple(failures[name]))
        for name in contenders
    }


def paired_ratio(result: ClosedLoopResult, baseline: ClosedLoopResult, what: str) -> float:
    """The median over samples of ``result``'s figure over the baseline's next to it.

    "Next to it": the mean of the baseline samples run just before and just after
    (a sandwich, when the run interleaved the baseline), else the baseline sample
    of the same round. On a machine whose speed drifts, a close pair is steadier
    than the ratio of two medians.
    """
    if result.contender == baseline.contender:
        return 1.0
    by_position = {s.position: getattr(s, what) for s in baseline.samples}
    by_round = {s.round_index: getattr(s, what) for s in baseline.samples}
    ratios = []
    for sample in result.samples:
        around = [
            by_position[p] for p in (sample.position - 1, sample.position + 1) if p in by_position
        ]
        reference = statistics.fmean(around) if around else by_round.get(sample.round_index)
        if reference:
            ratios.append(getattr(sample, what) / reference)
    return summarize(ratios).median


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``, NaN when either is missing."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return math.nan
    return value / baseline
