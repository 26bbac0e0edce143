"""``nebula-async demo``: a realistic bulk run against an in-process mock server.

The mock answers after 0.1-0.6 s and fails about 5% of requests (HTTP 500/503,
a 500 in the body, 429 with Retry-After, dropped connections); the client
retries them, so every job normally ends ok. Some jobs ask for more images
than one submission makes (``images`` > ``n``) and are fanned out.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nebula_async._client import NebulaClient
from nebula_async._models import Img2ImgRequest, Job, RetryPolicy
from nebula_async._stats import percentile
from nebula_async.testing import MockNebulaServer

from ._jobfile import JobLine
from ._progress import JobProgress
from ._results import ResultWriter
from ._runner import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_WRITE_FAILED,
    RunTally,
    err,
    execute_jobs,
    write_error_in,
)

__all__ = ["DemoOptions", "demo_command", "demo_jobs"]

DEMO_MODEL: Final = "doubao-seedream-4-0-250828"
DEMO_FAULTS: Final = {
    "http_500": 0.01,
    "http_503": 0.01,
    "body_500": 0.01,
    "http_429": 0.01,
    "drop": 0.01,
}
DEMO_LATENCY: Final = (0.1, 0.6)
# Short backoff and a short Retry-After keep the demo quick; 8 attempts make a job
# failing for good (5%^8) practically impossible.
DEMO_RETRY: Final = RetryPolicy(max_attempts=8, backoff_base=0.05, backoff_max=0.5)
DEMO_RETRY_AFTER_S: Final = 0.2

_SUBJECTS: Final = ("fox", "lighthouse", "teapot", "bicycle", "owl", "glacier", "violin")
_STYLES: Final = ("watercolour", "ukiyo-e", "pixel art", "charcoal sketch", "oil painting")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``nebula-async demo`` runs."""

    jobs: int = 200
    concurrency: int = 32
    out_path: Path = Path("demo-results.jsonl")
    seed: int = 0
    progress: bool = True


def demo_jobs(count: int) -> Iterator[JobLine]:
    """``count`` varied jobs; every fifth one is fanned out over several submissions."""
    for i in range(1, count + 1):
        n = (1, 2, 1, 4)[i % 4]
        request = Img2ImgRequest(
            model=DEMO_MODEL,
            prompt=f"a {_STYLES[i % len(_STYLES)]} {_SUBJECTS[i % len(_SUBJECTS)]}, variation {i}",
            image=f"https://example.com/inputs/{i % 17}.png",
            n=n,
            size="2K",
        )
        images = n * 2 + 1 if i % 5 == 0 else None
        yield JobLine.of(i, Job(request, id=f"demo-{i:04d}", images=images))


def _summary(tally: RunTally, client: NebulaClient, elapsed_s: float, out: Path) -> str:
    stats = client.statistics()
    latencies = sorted(tally.latencies or [])
    rows = [
        ("jobs", f"{tally.finished}"),
        ("ok", f"{tally.ok}"),
        ("failed", f"{tally.failed}"),
        ("images", f"{tally.images}"),
        ("attempts", f"{stats.attempts}"),
        ("retries", f"{stats.retries}"),
        ("429s", f"{stats.rate_limited}"),
        ("throughput", f"{tally.finished / elapsed_s:.1f} jobs/s" if elapsed_s else "-"),
        ("latency p50", f"{percentile(latencies, 0.50):.2f} s"),
        ("latency p95", f"{percentile(latencies, 0.95):.2f} s"),
        ("elapsed", f"{elapsed_s:.1f} s"),
        ("results", str(out)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


async def demo_command(options: DemoOptions) -> int:
    """Run the demo; prints the summary table to stdout. Exit 0 when every job is ok."""
    print(
        f"nebula-async demo: {options.jobs} jobs against a local mock server "
        f"(latency {DEMO_LATENCY[0]}-{DEMO_LATENCY[1]} s, ~5% faults), "
        f"concurrency {options.concurrency}",
        file=sys.stderr,
    )
    async with MockNebulaServer(
        latency=DEMO_LATENCY,
        faults=DEMO_FAULTS,
        retry_after=DEMO_RETRY_AFTER_S,
        seed=options.seed,
    ) as server:
        client = NebulaClient(
            token="mock-token",
            base_url=server.base_url,
            max_concurrency=options.concurrency,
            retry=DEMO_RETRY,
            timeout=10.0,
        )
        started = time.perf_counter()
        try:
            with (
                # The demo starts afresh each time: the results file is emptied, not resumed.
                ResultWriter(options.out_path, resume=False) as writer,
                JobProgress(options.jobs, enabled=options.progress) as progress,
            ):
                async with client:
                    tally = await execute_jobs(
                        client,
                        demo_jobs(options.jobs),
                        writer=writer,
                        progress=progress,
                        keep_latencies=True,
                    )
        except Exception as exc:
            write_error = write_error_in(exc)
            if write_error is not None:
                err(f"{write_error}; the demo stopped")
                return EXIT_WRITE_FAILED
            if isinstance(exc, OSError):  # the results file cannot be created at all
                err(f"cannot write {options.out_path}: {exc.strerror or exc}; pass --out PATH")
                return EXIT_BAD_INPUT
            raise
        elapsed_s = time.perf_counter() - started
        print(_summary(tally, client, elapsed_s, options.out_path))
    return EXIT_OK if tally.failed == 0 else EXIT_SOME_FAILED
