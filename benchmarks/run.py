"""Run every benchmark in one go: ``python -m benchmarks [--quick] [--only PART,...]``.

Prints the tables and the targets (PASS/MISS), and writes
``benchmarks/results/latest.json`` and ``latest.md`` (``latest-partial.*`` when
only some parts ran). Progress goes to stderr.
Every part is bounded in count and in time; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs

from ._cpu import machine_busy_seconds
from ._server import ROOT, ServerProcess, pin, split_cores
from .closed_loop import run_closed_loop
from .codec import run_codec
from .contenders import CONTENDERS, OPEN_LOOP_CONTENDERS
from .goodput import run_goodput
from .instructions import available as valgrind_available
from .instructions import run_instructions, run_network_instructions
from .limiter_accuracy import run_limiters
from .memory import run_memory
from .open_loop import run_open_loop
from .overhead import run_overhead
from .report import BASELINE, Results, render_markdown, render_text, write_json
from .shared import run_part as run_shared_part

__all__ = ["DEFAULT_PARTS", "PARTS", "Plan", "main"]

PARTS: Final = (
    "throughput",
    "little",
    "open_loop",
    "memory",
    "limiters",
    "codec",
    "overhead",
    "instructions",
    "shared",
    "goodput",
)
#: What a run without --only measures: all but the slow callgrind part (~5.5 min), the
#: shared-limit part (~4 min, needs redis-server) and goodput (~4.5 min, paced by a 20/s
#: limit, so it measures the same on any machine).
DEFAULT_PARTS: Final = tuple(
    part for part in PARTS if part not in {"instructions", "shared", "goodput"}
)
CONCURRENCY: Final = 64
LITTLE_LATENCY_S: Final = 0.05
OPEN_LOOP_LATENCY_S: Final = 0.02
OPEN_LOOP_RATE: Final = 300.0
_PACKAGES: Final = (
    "nebula-async", "aiohttp", "httpx", "httpcore", "anyio", "attrs", "cattrs", "orjson",
    "aiometer", "aiolimiter", "multidict", "yarl",
)  # fmt: skip


@attrs.frozen
class Plan:
    """How much of everything to run; ``Plan.quick()`` fits in about two minutes."""

    mode: str = "full"
    rounds: int = 12
    throughput_requests: int = 4_000
    throughput_target_s: float = 1.5
    little_rounds: int = 5
    little_waves: int = 30
    little_single_requests: int = 40
    little_single_rounds: int = 3
    open_loop_rounds: int = 3
    open_loop_s: float = 4.0
    memory_sizes: tuple[int, ...] = (10_000, 100_000)
    limiter_s: float = 8.0
    shared_s: float = 5.0
    codec_count: int = 200_000
    codec_repeats: int = 7
    overhead_jobs: int = 10_000
    overhead_rounds: int = 7
    goodput_jobs: int = 400
    goodput_cap_s: float = 60.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            mode="quick",
            rounds=3,
            throughput_requests=2_000,
            throughput_target_s=1.0,
            little_rounds=2,
            little_waves=12,
            little_single_requests=20,
            little_single_rounds=1,
            open_loop_rounds=1,
            open_loop_s=2.0,
            memory_sizes=(1_000, 10_000),
            limiter_s=2.5,
            shared_s=3.0,
            codec_count=50_000,
            codec_repeats=5,
            overhead_jobs=5_000,
            overhead_rounds=3,
            goodput_jobs=150,
            goodput_cap_s=30.0,
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _client_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def _loadavg() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _git(*args: str) -> str:
    """Read-only git queries (which commit, which files differ); '' when unavailable."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    server_cores, client_cores = split_cores()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "server_cores": sorted(server_cores),
        "client_cores": sorted(client_cores),
        "versions": _versions(),
        "loadavg_start": _loadavg(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_changed_files": _git("status", "--porcelain", "--", "nebula_async").splitlines(),
    }


class _Log:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"{time.perf_counter() - self.started:6.1f}s {message}", file=sys.stderr, flush=True)


Log = Callable[[str], None]


def _run_throughput(plan: Plan, results: Results, log: Log) -> None:
    with ServerProcess(0.0) as server:
        log(f"server pinned to cores {sorted(server.affinity())}, client to {_client_cores()}")
        results.throughput = run_closed_loop(
            CONTENDERS,
            server,
            concurrency=CONCURRENCY,
            requests=plan.throughput_requests,
            rounds=plan.rounds,
            target_s=plan.throughput_target_s,
            cap_s=60.0,
            log=log,
            label="throughput",
            baseline=BASELINE,
        )


def _run_little(plan: Plan, results: Results, log: Log) -> None:
    results.little_ceiling = CONCURRENCY / LITTLE_LATENCY_S
    with ServerProcess(LITTLE_LATENCY_S) as server:
        results.little = run_closed_loop(
            CONTENDERS,
            server,
            concurrency=CONCURRENCY,
            requests=CONCURRENCY * plan.little_waves,
            rounds=plan.little_rounds,
            target_s=2 * plan.little_waves * LITTLE_LATENCY_S,
            cap_s=60.0,
            log=log,
            label="little",
            baseline=BASELINE,
        )
        # The floor: one request at a time, so no client's concurrency is involved.
        results.little_single_ceiling = 1 / LITTLE_LATENCY_S
        results.little_single = run_closed_loop(
            {BASELINE: CONTENDERS[BASELINE]},
            server,
            concurrency=1,
            requests=plan.little_single_requests,
            rounds=plan.little_single_rounds,
            target_s=2 * plan.little_single_requests * LITTLE_LATENCY_S,
            cap_s=60.0,
            log=log,
            label="little c=1",
        )[BASELINE]


def _run_open_loop(plan: Plan, results: Results, log: Log) -> None:
    with ServerProcess(OPEN_LOOP_LATENCY_S) as server:
        results.open_loop = run_open_loop(
            OPEN_LOOP_CONTENDERS,
            server.base_url,
            concurrency=CONCURRENCY,
            rate=OPEN_LOOP_RATE,
            duration_s=plan.open_loop_s,
            rounds=plan.open_loop_rounds,
            cap_s=30.0,
            log=log,
        )


def _run_memory(plan: Plan, results: Results, log: Log) -> None:
    with ServerProcess(0.0) as server:
        results.memory = run_memory(server.base_url, sizes=plan.memory_sizes, cap_s=240.0, log=log)


def _run_limiters(plan: Plan, results: Results, log: Log) -> None:
    results.limiters = run_limiters(
        (50.0, 200.0), duration_s=plan.limiter_s, cap_s=plan.limiter_s * 3, log=log
    )


def _run_codec(plan: Plan, results: Results, log: Log) -> None:
    results.codec = run_codec(count=plan.codec_count, repeats=plan.codec_repeats, log=log)


def _run_overhead(plan: Plan, results: Results, log: Log) -> None:
    results.overhead = run_overhead(jobs=plan.overhead_jobs, rounds=plan.overhead_rounds, log=log)


def _run_instructions(plan: Plan, results: Results, log: Log) -> None:
    if valgrind_available():
        results.instructions = run_instructions(ROOT, small=200, large=2200, log=log)
        with ServerProcess(0.0) as server:
            results.instructions_network = run_network_instructions(
                ROOT,
                server.base_url,
                concurrency=CONCURRENCY,
                small=4 * CONCURRENCY,
                large=20 * CONCURRENCY,
                log=log,
            )
            results.instructions_sequential = run_network_instructions(
                ROOT,
                server.base_url,
                concurrency=CONCURRENCY,
                small=100,
                large=500,
                log=log,
                one_at_a_time=True,
            )
    else:
        log("[instructions] skipped: valgrind is not installed")


def _run_shared(plan: Plan, results: Results, log: Log) -> None:
    # Kept in meta: its tables are its own (benchmarks/shared.py renders them).
    results.meta["shared"] = run_shared_part(duration_s=plan.shared_s, log=log)


def _run_goodput(plan: Plan, results: Results, log: Log) -> None:
    results.goodput = run_goodput(jobs=plan.goodput_jobs, cap_s=plan.goodput_cap_s, log=log)


_PART_RUNNERS: dict[str, Callable[[Plan, Results, Log], None]] = {
    "throughput": _run_throughput,
    "little": _run_little,
    "open_loop": _run_open_loop,
    "memory": _run_memory,
    "limiters": _run_limiters,
    "codec": _run_codec,
    "overhead": _run_overhead,
    "instructions": _run_instructions,
    "shared": _run_shared,
    "goodput": _run_goodput,
}


def run(plan: Plan, parts: tuple[str, ...], log: Callable[[str], None]) -> Results:
    """Run the chosen ``parts`` of ``plan``; the client side is pinned away from the server."""
    pin(split_cores()[1])
    results = Results(
        meta={
            **machine(),
            "mode": plan.mode,
            "plan": attrs.asdict(plan),
            "parts": list(parts),
            "concurrency": CONCURRENCY,
            "open_loop_rate": OPEN_LOOP_RATE,
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
    )
    started = time.perf_counter()
    for part, run_part in _PART_RUNNERS.items():  # in report order, whatever the order asked
        if part in parts:
            run_part(plan, results, log)
    results.meta["duration_s"] = time.perf_counter() - started
    results.meta["loadavg_end"] = _loadavg()
    return results


def _parts(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="nebula-async beside raw aiohttp, httpx and aiometer, measured in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about two minutes)")
    parser.add_argument(
        "--only", type=_parts, default=DEFAULT_PARTS, metavar="PART,...",
        help=f"run only these parts: {', '.join(PARTS)} "
             "(default: all but instructions, shared, goodput)",
    )  # fmt: skip
    parser.add_argument(
        "--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
        help="where latest.json and latest.md go (default: benchmarks/results)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    log = _Log()
    busy = machine_busy_seconds()
    time.sleep(1.0)
    busy = machine_busy_seconds() - busy
    if busy > 0.25:
        log(f"warning: {busy:.2f} cores busy with other work just before the run; it skews figures")
    results = run(plan, args.only, log)
    print(render_text(results))
    if "shared" in results.meta:
        print("\nOne limit shared by N processes (benchmarks/shared.py)\n")
        print(results.meta["shared"]["markdown"])
    # A run of some parts only must not overwrite the record of a whole run.
    stem = "latest" if set(args.only) >= set(DEFAULT_PARTS) else "latest-partial"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.results_dir / f"{stem}.json", args.results_dir / f"{stem}.md"
    write_json(results, json_path)
    markdown = render_markdown(results)
    if "shared" in results.meta:
        markdown += (
            "\n\n## One limit shared by N processes\n\n" + results.meta["shared"]["markdown"]
        )
    md_path.write_text(markdown)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
