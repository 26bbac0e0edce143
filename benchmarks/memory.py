"""Peak memory of ``stream()`` and ``run_batch()`` against ``asyncio.gather`` over the same jobs.

Each measurement runs in a fresh child process (``python -m benchmarks.memory
MODE JOBS URL``) so that peaks do not mix; the child reads its own peak RSS
after the run and prints one JSON line. The peak is ``VmHWM`` from
/proc/self/status: ``getrusage(RUSAGE_SELF).ru_maxrss`` would be the same
counter, except that Linux folds into it the peak of the address space replaced
by ``exec`` -- the spawning benchmark process -- so in a child it reports the
parent's size (it is kept in the JSON as ``ru_maxrss_mib``). The jobs come from a
generator: ``stream`` pulls them as workers free up, while ``gather`` has to
create a task per job up front (and keep every result until the end).
``run_batch`` reads the jobs just as lazily, but its report keeps one
``JobResult`` per job: its growth is the results', not the pipeline's.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

import nebula_async as na

from ._request import REQUEST, TOKEN
from ._server import ROOT, pin, split_cores

__all__ = ["MODES", "MemoryResult", "run_memory"]

MODES: Final = ("stream", "run_batch", "gather")
_CONCURRENCY: Final = 64


@attrs.frozen
class MemoryResult:
    """One child run: peak RSS in MiB after ``jobs`` jobs."""

    mode: str
    jobs: int
    ok: int
    peak_rss_mib: float
    start_rss_mib: float
    ru_maxrss_mib: float
    wall_s: float


def _jobs(n: int) -> Iterator[na.Img2ImgRequest]:
    return (REQUEST for _ in range(n))


async def _stream(base_url: str, n: int) -> int:
    ok = 0
    async with na.NebulaClient(
        token=TOKEN, base_url=base_url, max_concurrency=_CONCURRENCY
    ) as client:
        async for result in client.stream(_jobs(n)):
            ok += result.ok
    return ok


async def _run_batch(base_url: str, n: int) -> int:
    async with na.NebulaClient(
        token=TOKEN, base_url=base_url, max_concurrency=_CONCURRENCY
    ) as client:
        report = await client.run_batch(_jobs(n))
    return report.succeeded


async def _gather(base_url: str, n: int) -> int:
    async with na.NebulaClient(
        token=TOKEN, base_url=base_url, max_concurrency=_CONCURRENCY
    ) as client:
        results = await asyncio.gather(*(client.img2img(request) for request in _jobs(n)))
    return sum(1 for result in results if result.urls)


def _peak_rss_mib() -> float:
    """This address space's own peak RSS (``VmHWM``), falling back to ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return _ru_maxrss_mib()


def _ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(mode: str, n: int, base_url: str) -> dict[str, Any]:
    pin(split_cores()[1])
    start_rss = _peak_rss_mib()
    started = time.perf_counter()
    run = {"stream": _stream, "run_batch": _run_batch, "gather": _gather}[mode]
    ok = asyncio.run(run(base_url, n))
    return {
        "mode": mode,
        "jobs": n,
        "ok": ok,
        "peak_rss_mib": _peak_rss_mib(),
        "start_rss_mib": start_rss,
        "ru_maxrss_mib": _ru_maxrss_mib(),
        "wall_s": time.perf_counter() - started,
    }


def run_memory(
    base_url: str,
    *,
    sizes: Sequence[int],
    modes: Sequence[str] = MODES,
    cap_s: float,
    log: Callable[[str], None],
) -> list[MemoryResult]:
    """One fresh child per (mode, size); a child over ``cap_s`` seconds is killed."""
    results: list[MemoryResult] = []
    for mode in modes:
        for n in sizes:
            command = [sys.executable, "-m", "benchmarks.memory", mode, str(n), base_url]
            try:
                done = subprocess.run(
                    command, cwd=ROOT, capture_output=True, text=True, timeout=cap_s, check=True
                )
            except subprocess.TimeoutExpired:
                log(f"[memory] {mode} {n:,} jobs: FAILED (over {cap_s:.0f} s)")
                continue
            except subprocess.CalledProcessError as exc:
                log(f"[memory] {mode} {n:,} jobs: FAILED {exc.stderr[-500:]}")
                continue
            result = MemoryResult(**json.loads(done.stdout.strip().splitlines()[-1]))
            results.append(result)
            log(
                f"[memory] {mode:<6} {n:>7,} jobs: peak RSS {result.peak_rss_mib:6.1f} MiB "
                f"(start {result.start_rss_mib:.1f}), {result.ok:,} ok in {result.wall_s:.1f} s"
            )
    return results


if __name__ == "__main__":
    mode, jobs, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}")
    print(json.dumps(_child(mode, jobs, url)))
