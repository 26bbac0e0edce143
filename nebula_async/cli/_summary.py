"""The end-of-run summary of ``nebula-async run``: a small table, and ``--summary-json``.

Both come from one :class:`RunSummary`, so the JSON a pipeline reads holds the
very figures the table shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from nebula_async._stats import percentile

__all__ = ["RunSummary", "count", "table", "write_summary_json"]


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 job"``, ``"2 jobs"``: every count the CLI prints goes through here."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The figures of one run (the keys of ``--summary-json``).

    ``jobs``: jobs in the file (in the shard); ``ok``: ok now, of which
    ``ok_before`` were done by an earlier run; ``failed`` includes bad lines and
    jobs whose images are not all saved; ``not_attempted``: never sent (no line);
    ``pending_downloads``: generated jobs whose images are still to be saved;
    ``attempts``, ``retries``, ``rate_limited`` (429s) count this run's HTTP
    attempts; latencies are per job, over the jobs answered in this run.
    """

    jobs: int
    ok: int
    ok_before: int
    failed: int
    not_attempted: int
    pending_downloads: int
    images: int
    attempts: int
    retries: int
    rate_limited: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    elapsed_s: float
    results: str
    exit_code: int

    @staticmethod
    def latencies(values: Sequence[float] | None) -> tuple[float | None, float | None]:
        """p50 and p95 of per-job latencies (None when no job was answered)."""
        ordered = sorted(values or [])
        if not ordered:
            return None, None
        return round(percentile(ordered, 0.50), 3), round(percentile(ordered, 0.95), 3)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def table(summary: RunSummary) -> str:
    """The summary as an aligned two-column table (rows for zero counts of the rarer
    kinds are left out)."""
    ok = f"{summary.ok}"
    if summary.ok_before:
        ok += f" ({summary.ok_before} done before)"
    rows = [("jobs", f"{summary.jobs}"), ("ok", ok), ("failed", f"{summary.failed}")]
    if summary.not_attempted:
        rows.append(("not attempted", f"{summary.not_attempted}"))
    if summary.pending_downloads:
        rows.append(("pending downloads", f"{summary.pending_downloads}"))
    rows += [
        ("images", f"{summary.images}"),
        ("attempts", f"{summary.attempts}"),
        ("retries", f"{summary.retries}"),
        ("429s", f"{summary.rate_limited}"),
        ("latency p50", _seconds(summary.latency_p50_s)),
        ("latency p95", _seconds(summary.latency_p95_s)),
        ("elapsed", f"{summary.elapsed_s:.1f} s"),
        ("results", summary.results),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def write_summary_json(path: Path, summary: RunSummary) -> str | None:
    """Write ``summary`` to ``path`` as one JSON object (atomically); a reason on failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(orjson.dumps(asdict(summary), option=orjson.OPT_INDENT_2) + b"\n")
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        return f"cannot write --summary-json {path}: {exc.strerror or exc}"
    return None
