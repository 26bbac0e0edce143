"""Profile ``client.run_batch`` against the lean mock server (in its own process).

``python -m benchmarks.profile_batch [--jobs N] [--html]`` writes
``benchmarks/results/profile-run_batch.txt`` (and ``.html``), a pyinstrument
profile of the client process only. pyinstrument is not a dependency of the
benchmarks: ``pip install pyinstrument`` first.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from pyinstrument import Profiler

import nebula_async as na

from ._request import REQUEST, TOKEN
from ._server import ROOT, ServerProcess, pin, split_cores

__all__ = ["main"]


async def _batch(base_url: str, jobs: int, concurrency: int) -> Profiler:
    async with na.NebulaClient(
        token=TOKEN, base_url=base_url, max_concurrency=concurrency
    ) as client:
        await client.run_batch([REQUEST] * (2 * concurrency))  # warm the connections
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        report = await client.run_batch(REQUEST for _ in range(jobs))
        profiler.stop()
    if report.succeeded != jobs:
        raise RuntimeError(f"{report.failed} jobs failed")
    return profiler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_batch")
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--html", action="store_true", help="also write an HTML profile")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    pin(split_cores()[1])
    with ServerProcess(0.0) as server:
        profiler = asyncio.run(_batch(server.base_url, args.jobs, args.concurrency))
    session = profiler.last_session
    assert session is not None
    wall, cpu = session.duration, session.cpu_time
    args.out.mkdir(parents=True, exist_ok=True)
    text = profiler.output_text(unicode=False, show_all=False)
    (args.out / "profile-run_batch.txt").write_text(text)
    if args.html:
        (args.out / "profile-run_batch.html").write_text(profiler.output_html())
    print(text)
    print(
        f"{args.jobs} jobs in {wall:.2f} s, client CPU {cpu:.2f} s "
        f"({cpu / args.jobs * 1e6:.0f} us/job, profiler overhead included)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
