"""CPU time read from /proc: a process's own, and the whole machine's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["machine_busy_seconds", "process_cpu_seconds"]

_TICK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far; 0.0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name, state is field 3; utime is field 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU time every core spent busy (not idle, not waiting for I/O) since boot; 0.0 if
    unknown. Its growth minus what the client and the server used is other work."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is in user.
    return (sum(values[:8]) - values[3] - values[4]) / _TICK
