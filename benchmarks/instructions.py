"""The library's own cost per job in instructions: deterministic where seconds are not.

CPU seconds on this kind of VM move by +-20-30% between rounds, more than the
differences left to measure. ``valgrind --tool=callgrind`` counts the
instructions a process executes, the same for the same binary and inputs whatever
else the machine does. Each variant of :mod:`benchmarks.overhead` (the fake
in-process transport: our code, no network) runs in a child under callgrind at
two sizes; the difference divided by the difference in jobs removes start-up and
imports, leaving instructions per job. Skipped when valgrind is not installed
(Debian: ``apt install valgrind``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["VARIANT_KEYS", "available", "run_instructions"]

#: The overhead variants by short key, the baseline first.
VARIANT_KEYS: Final = {
    "by hand (semaphore + gather)": "_by_hand",
    "ours img2img": "_img2img",
    "ours run_batch": "_run_batch",
    "ours stream": "_stream",
}
_COLLECTED = re.compile(r"Collected : (\d+)")
_CHILD = """
import asyncio, sys
sys.path.insert(0, {root!r})
from benchmarks import overhead
asyncio.run(getattr(overhead, {name!r})({jobs}))
"""


def available() -> bool:
    """Whether valgrind is installed."""
    return shutil.which("valgrind") is not None


def _count(root: Path, name: str, jobs: int, timeout_s: float) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                _CHILD.format(root=str(root), name=name, jobs=jobs),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of {name} failed: {done.stderr[-500:]}")
    return int(found.group(1))


def run_instructions(
    root: Path, *, small: int, large: int, log: Callable[[str], None], timeout_s: float = 300.0
) -> dict[str, float]:
    """Instructions per job of each variant: (count at ``large`` - at ``small``) / jobs."""
    per_job: dict[str, float] = {}
    for label, name in VARIANT_KEYS.items():
        low = _count(root, name, small, timeout_s)
        high = _count(root, name, large, timeout_s)
        per_job[label] = (high - low) / (large - small)
        log(f"[instructions] {label:<28} {per_job[label] / 1000:7.1f}k instructions/job")
    return per_job
