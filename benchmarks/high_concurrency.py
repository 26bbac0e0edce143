"""Wall time at high concurrency and real latency: ``python -m benchmarks.high_concurrency``.

1,000 requests in flight against the lean mock server answering after 1 s, side by
side in one run, raw aiohttp (the baseline, between every two others) against
``run_batch``, ``stream`` and ``asyncio.gather`` over ``img2img``. What a user
feels here is Little's law: the ceiling is concurrency / latency = 1,000
requests/s, and a client's efficiency is its throughput over that ceiling. Prints
each contender's median throughput, its efficiency, and its ratio to the raw
aiohttp samples beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from ._server import ServerProcess
from .closed_loop import paired_ratio, run_closed_loop
from .contenders import CONTENDERS

CONCURRENCY = 1000
LATENCY_S = 1.0
BASELINE = "raw aiohttp"
NAMES = ("raw aiohttp", "ours run_batch", "ours stream", "ours img2img")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.high_concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--waves", type=int, default=5, help="requests = waves x concurrency")
    args = parser.parse_args(argv)
    ceiling = CONCURRENCY / LATENCY_S
    with ServerProcess(LATENCY_S) as server:
        results = run_closed_loop(
            {name: CONTENDERS[name] for name in NAMES},
            server,
            concurrency=CONCURRENCY,
            requests=CONCURRENCY * args.waves,
            rounds=args.rounds,
            target_s=args.waves * LATENCY_S * 2,
            cap_s=120.0,
            log=lambda message: print(message, file=sys.stderr),
            label=f"c={CONCURRENCY}, {LATENCY_S:g} s",
            baseline=BASELINE,
        )
    print(f"| c={CONCURRENCY}, latency {LATENCY_S:g} s | req/s (median) | of ceiling | vs raw |")
    print("|---|---|---|---|")
    for name in NAMES:
        rates = [sample.per_second for sample in results[name].samples]
        median = statistics.median(rates) if rates else float("nan")
        vs = (
            "1.00x"
            if name == BASELINE
            else f"{paired_ratio(results[name], results[BASELINE], 'per_second'):.3f}x"
        )
        print(f"| {name} | {median:.0f} | {median / ceiling:.1%} | {vs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
