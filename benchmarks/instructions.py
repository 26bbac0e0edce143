"""The library's own cost per job in instructions: deterministic where seconds are not.

CPU seconds on this kind of VM move by +-20-30% between rounds, more than the
differences left to measure. ``valgrind --tool=callgrind`` counts the
instructions a process executes, the same for the same binary and inputs whatever
else the machine does. Each variant of :mod:`benchmarks.overhead` (the fake
in-process transport: our code, no network) runs in a child under callgrind at
two sizes; the difference divided by the difference in jobs removes start-up and
imports, leaving instructions per job. Skipped when valgrind is not installed
(Debian: ``apt install valgrind``).

The same is done for the whole client process of each contender against the real
lean server (:func:`run_network_instructions`): aiohttp, asyncio and the
interpreter included, the kernel not. This is the CPU-per-request comparison
without the VM's noise. Under callgrind the client is ~50x slower than the
server, so it mostly finds answers waiting (its most batched regime); the figure
is the cost of the client's user-space work, not a prediction of seconds. It
still moves by about 2% between runs with how reads meet answers (and with it
the garbage collector's rounds), so it is the median of three runs.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

__all__ = [
    "NETWORK_CONTENDERS",
    "SEQUENTIAL_CONTENDERS",
    "VARIANT_KEYS",
    "available",
    "run_instructions",
    "run_network_instructions",
]

#: The overhead variants by short key, the baseline first.
VARIANT_KEYS: Final = {
    "by hand (semaphore + gather)": "_by_hand",
    "ours img2img": "_img2img",
    "ours run_batch": "_run_batch",
    "ours stream": "_stream",
}
#: The contenders counted whole (aiohttp, asyncio and all) against the lean server,
#: the baseline first. httpx is left out: at ~60 requests per second it would take
#: minutes under callgrind, and it is 50x behind on every other figure.
NETWORK_CONTENDERS: Final = (
    "raw aiohttp",
    "aiometer+aiohttp",
    "ours img2img",
    "ours run_batch",
    "ours stream",
)
#: The contenders that make one call at a time (a web handler awaiting its one
#: request), the baseline first: only the one-off call has this shape.
SEQUENTIAL_CONTENDERS: Final = ("raw aiohttp", "ours img2img")
_COLLECTED = re.compile(r"Collected : (\d+)")
# The benchmark process is pinned to the client's cores; a child under callgrind is
# ~50x slower than the server, so each child frees itself to use every core (two run
# at a time). Both sizes do the same, so it cancels out of the per-job figure.
_UNPIN = """
import os
try:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
except (AttributeError, OSError):
    pass
"""
_HARNESS_CHILD = (
    _UNPIN
    + """
import asyncio, sys
sys.path.insert(0, {root!r})
from benchmarks import overhead
asyncio.run(getattr(overhead, {name!r})({jobs}))
"""
)


def _client_child(calls: str) -> str:
    """A child that opens one contender's client and runs ``calls`` (indented
    code that sets ``urls``), then checks that every request got its URL."""
    return (
        _UNPIN
        + """
import asyncio, sys
sys.path.insert(0, {root!r})
from benchmarks.contenders import CONTENDERS

async def main():
    async with CONTENDERS[{name!r}]({base_url!r}, {concurrency}) as runner:
"""
        + calls
        + """
    if urls != {jobs}:
        raise SystemExit(f"parsed {{urls}} URLs for {jobs} requests")

asyncio.run(main())
"""
    )


# Warmed like a closed-loop sample: every connection is open before the counted batch.
_NETWORK_CHILD = _client_child(
    """        await runner.batch({warm})
        urls = await runner.batch({jobs})"""
)
# One call at a time, each awaited before the next: nothing waits for a slot, so
# every checkpoint a call makes is a turn of the event loop of its own.
_SEQUENTIAL_CHILD = _client_child(
    """        for _ in range({warm}):
            await runner.one()
        urls = 0
        for _ in range({jobs}):
            urls += await runner.one()"""
)


def available() -> bool:
    """Whether valgrind is installed."""
    return shutil.which("valgrind") is not None


def _count(program: str, what: str, timeout_s: float) -> int:
    """Instructions callgrind counted for ``python -c program``."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                program,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of {what} failed: {done.stderr[-500:]}")
    return int(found.group(1))


def _per_job(
    programs: dict[str, tuple[str, str]],
    jobs: int,
    *,
    label: str,
    log: Callable[[str], None],
    timeout_s: float,
    repeats: int = 1,
) -> dict[str, float]:
    """(count of the large program - count of the small one) / ``jobs``, per name:
    the median of ``repeats`` runs, interleaved; two callgrind children at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = {
            (name, size, run): pool.submit(_count, program, f"{name} ({size})", timeout_s)
            for run in range(repeats)
            for name, pair in programs.items()
            for size, program in zip(("small", "large"), pair, strict=True)
        }
        per_job: dict[str, float] = {}
        for name in programs:
            runs = sorted(
                (counts[name, "large", run].result() - counts[name, "small", run].result()) / jobs
                for run in range(repeats)
            )
            per_job[name] = statistics.median(runs)
            spread = (
                f" (median of {repeats}: {runs[0] / 1000:.1f}-{runs[-1] / 1000:.1f}k)"
                if repeats > 1
                else ""
            )
            log(f"[{label}] {name:<28} {per_job[name] / 1000:7.1f}k instructions/job{spread}")
    return per_job


def run_instructions(
    root: Path,
    *,
    small: int,
    large: int,
    log: Callable[[str], None],
    timeout_s: float = 300.0,
) -> dict[str, float]:
    """Instructions per job of each overhead variant (fake transport, our code only)."""

    def program(name: str, jobs: int) -> str:
        return _HARNESS_CHILD.format(root=str(root), name=name, jobs=jobs)

    programs = {
        label: (program(name, small), program(name, large)) for label, name in VARIANT_KEYS.items()
    }
    return _per_job(
        programs,
        large - small,
        label="instructions",
        log=log,
        timeout_s=timeout_s,
    )


def run_network_instructions(
    root: Path,
    base_url: str,
    *,
    concurrency: int,
    small: int,
    large: int,
    log: Callable[[str], None],
    one_at_a_time: bool = False,
    repeats: int = 3,
    timeout_s: float = 300.0,
) -> dict[str, float]:
    """Instructions per request of each contender's whole client process (our code,
    aiohttp, asyncio, the interpreter; not the kernel) against a real lean server:
    batches gathered at ``concurrency``, or with ``one_at_a_time`` each call awaited
    before the next (:data:`SEQUENTIAL_CONTENDERS`).

    Unlike the library alone, a whole client's count depends on how its reads
    meet the server's answers (raw aiohttp's moved 547k-562k between runs of the
    same code), so each figure is the median of ``repeats`` runs.
    """
    template = _SEQUENTIAL_CHILD if one_at_a_time else _NETWORK_CHILD
    contenders = SEQUENTIAL_CONTENDERS if one_at_a_time else NETWORK_CONTENDERS

    def program(name: str, jobs: int) -> str:
        return template.format(
            root=str(root),
            name=name,
            base_url=base_url,
            concurrency=concurrency,
            warm=2 * concurrency,
            jobs=jobs,
        )

    programs = {name: (program(name, small), program(name, large)) for name in contenders}
    return _per_job(
        programs,
        large - small,
        label="instructions, one at a time" if one_at_a_time else "instructions, network",
        log=log,
        timeout_s=timeout_s,
        repeats=repeats,
    )
