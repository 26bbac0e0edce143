"""Turn the measurements into targets (PASS/MISS), a text table, JSON and markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._stats import Summary
from .closed_loop import ClosedLoopResult, paired_ratio
from .goodput import GoodputResult, goodput_checks, goodput_table
from .limiter_accuracy import LimiterResult
from .memory import MemoryResult
from .open_loop import OpenLoopResult

__all__ = ["BASELINE", "Check", "Results", "checks", "render_markdown", "render_text", "write_json"]

BASELINE = "raw aiohttp"
OURS = "ours run_batch"
OUR_LIMITER = "ours (GCRA, burst=1)"


@attrs.define
class Results:
    """Everything one run measured; a part that was not run stays empty."""

    meta: dict[str, Any]
    throughput: dict[str, ClosedLoopResult] = attrs.Factory(dict)
    little: dict[str, ClosedLoopResult] = attrs.Factory(dict)
    little_ceiling: float = math.nan
    #: Raw aiohttp one request at a time against the same 50 ms server: the cycle no
    #: client at any concurrency can beat on this machine.
    little_single: ClosedLoopResult | None = None
    little_single_ceiling: float = math.nan
    open_loop: dict[str, OpenLoopResult] = attrs.Factory(dict)
    memory: list[MemoryResult] = attrs.Factory(list)
    limiters: list[LimiterResult] = attrs.Factory(list)
    codec: Summary | None = None
    overhead: dict[str, tuple[Summary, Summary]] = attrs.Factory(dict)
    instructions: dict[str, float] = attrs.Factory(dict)
    instructions_network: dict[str, float] = attrs.Factory(dict)
    instructions_sequential: dict[str, float] = attrs.Factory(dict)
    goodput: list[GoodputResult] = attrs.Factory(list)


@attrs.frozen
class Check:
    """One target: what was measured against what was wanted."""

    name: str
    measured: str
    target: str
    passed: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


def _check(name: str, value: float, target: str, ok: Callable[[float], bool], shown: str) -> Check:
    if not math.isfinite(value):
        return Check(name, "not measured", target, None)
    return Check(name, shown, target, ok(value))


def _median(results: dict[str, ClosedLoopResult], name: str, what: str) -> float:
    result = results.get(name)
    if result is None:
        return math.nan
    summary: Summary = getattr(result, what)
    return summary.median


def _paired(results: dict[str, ClosedLoopResult], name: str, baseline: str, what: str) -> float:
    if name not in results or baseline not in results:
        return math.nan
    return paired_ratio(results[name], results[baseline], what)


def _instructions_ratio(counts: dict[str, float], name: str) -> float:
    if name not in counts or not counts.get(BASELINE):
        return math.nan
    return counts[name] / counts[BASELINE]


def memory_growth_mb(memory: Sequence[MemoryResult], mode: str) -> tuple[float, int, int]:
    """(peak RSS growth in MB from the smallest to the largest run, small, large)."""
    runs = sorted((r for r in memory if r.mode == mode), key=lambda r: r.jobs)
    if len(runs) < 2:
        return math.nan, 0, 0
    growth_mib = runs[-1].peak_rss_mib - runs[0].peak_rss_mib
    return growth_mib * 1.048576, runs[0].jobs, runs[-1].jobs


def _limiter(limiters: Sequence[LimiterResult], rate: float) -> LimiterResult | None:
    for result in limiters:
        if result.limiter == OUR_LIMITER and result.rate == rate:
            return result
    return None


def _instruction_guard(counts: dict[str, float], name: str, shape: str) -> Check:
    """The 1.25x guard of issue 12 for one of our ways in, in one shape of use."""
    ratio = _instructions_ratio(counts, name)
    return _check(
        f"{name.removeprefix('ours ')} instructions per request vs raw aiohttp ({shape})",
        ratio,
        "<= 1.25x",
        lambda v: v <= 1.25,
        f"{ratio:.2f}x",
    )


def checks(results: Results) -> list[Check]:
    """Every target of docs/benchmarks.md, evaluated on ``results``."""
    tp = results.throughput
    cpu_ratio = _paired(tp, OURS, BASELINE, "cpu_us_per_request")
    rps_ratio = _paired(tp, OURS, BASELINE, "per_second")
    httpx_ratio = _paired(tp, OURS, "httpx", "per_second")
    efficiency = _median(results.little, OURS, "per_second") / results.little_ceiling
    growth, small, large = memory_growth_mb(results.memory, "stream")
    found = [
        _check(
            # A regression guard since issue 12, not a target: 1.25x raw aiohttp.
            "run_batch CPU per request vs raw aiohttp",
            cpu_ratio,
            "<= 1.25x",
            lambda v: v <= 1.25,
            f"{cpu_ratio:.2f}x",
        ),
        *(
            _instruction_guard(results.instructions_network, name, "callgrind, whole client")
            for name in ("ours run_batch", "ours stream", "ours img2img")
        ),
        _instruction_guard(
            results.instructions_sequential, "ours img2img", "one call at a time, callgrind"
        ),
        _check(
            "run_batch throughput vs raw aiohttp",
            rps_ratio,
            ">= 0.95x",
            lambda v: v >= 0.95,
            f"{rps_ratio:.2f}x",
        ),
        _check(
            "run_batch throughput vs httpx",
            httpx_ratio,
            ">= 5x",
            lambda v: v >= 5,
            f"{httpx_ratio:.1f}x",
        ),
        _check(
            "run_batch Little's-law efficiency (50 ms, c=64)",
            efficiency,
            ">= 97%",
            lambda v: v >= 0.97,
            f"{efficiency:.1%}",
        ),
        _check(
            f"stream() peak RSS growth {small:,} -> {large:,} jobs"
            if large
            else "stream() peak RSS growth, smallest -> largest run",
            growth,
            "<= 10 MB",
            lambda v: v <= 10,
            f"{growth:+.1f} MB",
        ),
    ]
    found += _limiter_checks(results.limiters)
    found.append(_codec_check(results.codec))
    found += [Check(*check) for check in goodput_checks(results.goodput)]
    return found


def _codec_check(codec_summary: Summary | None) -> Check:
    codec = codec_summary.median if codec_summary else math.nan
    return _check(
        "codec to_payload + orjson.dumps",
        codec,
        ">= 200,000/s",
        lambda v: v >= 200_000,
        f"{codec:,.0f}/s",
    )


def _limiter_checks(limiters: Sequence[LimiterResult]) -> list[Check]:
    """Long-run error and busiest window of our limiter at 50/s and 200/s."""
    found: list[Check] = []
    for rate in (50.0, 200.0):
        limiter = _limiter(limiters, rate)
        error = limiter.long_run_error if limiter else math.nan
        window = float(limiter.busiest_window) if limiter else math.nan
        bound = rate + (limiter.burst if limiter else 1)

        def within(value: float, bound: float = bound) -> bool:
            return value <= bound

        found.append(
            _check(
                f"rate limiter long-run error at {rate:g}/s",
                error,
                "<= 1%",
                lambda v: abs(v) <= 0.01,
                f"{error:+.2%}",
            )
        )
        found.append(
            _check(
                f"rate limiter busiest 1 s window at {rate:g}/s",
                window,
                f"<= {bound:g} (rate + burst)",
                within,
                f"{window:.0f}",
            )
        )
    return found


# ---------------------------------------------------------------------------- tables


def _range(summary: Summary, scale: float = 1.0, digits: int = 0) -> str:
    if not summary.samples:
        return "-"
    m, lo, hi = summary.median * scale, summary.low * scale, summary.high * scale
    return f"{m:,.{digits}f} [{lo:,.{digits}f}-{hi:,.{digits}f}]"


def _fmt_ratio(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}x" if math.isfinite(value) else "-"


def _rounds(result: ClosedLoopResult) -> str:
    failed = f" ({len(result.failures)} failed)" if result.failures else ""
    return f"{len(result.samples)}{failed}"


def _instruction_rows(counts: dict[str, float], baseline: str) -> list[list[str]]:
    """(name, count, count over the baseline's, ratio) for callgrind counts per job."""
    base = counts.get(baseline, math.nan)
    return [
        [
            name,
            f"{count / 1000:,.1f}k",
            f"{(count - base) / 1000:+,.1f}k",
            _fmt_ratio(count / base),
        ]
        for name, count in counts.items()
    ]


Table = tuple[str, list[str], list[list[str]]]


def tables(results: Results) -> list[Table]:
    """(title, header, rows) for each part that was run, in report order."""
    makers: list[Callable[[Results], list[Table]]] = [
        _throughput_table,
        _little_table,
        _open_loop_table,
        _memory_table,
        _limiter_table,
        _overhead_table,
        _instruction_tables,
        _goodput_and_codec_tables,
    ]
    return [table for make in makers for table in make(results)]


def _throughput_table(results: Results) -> list[Table]:
    tp = results.throughput
    if not tp:
        return []
    rows = [
        [
            name,
            _range(r.per_second),
            _range(r.cpu_us_per_request),
            _fmt_ratio(_paired(tp, name, BASELINE, "per_second")),
            _fmt_ratio(_paired(tp, name, BASELINE, "cpu_us_per_request")),
            f"{r.server_busy.median:.0%}" if r.samples else "-",
            f"{r.other_load.median:.0%}" if r.samples else "-",
            _range(r.faults_per_request, digits=2),
            _rounds(r),
        ]
        for name, r in tp.items()
    ]
    title = (
        "Closed loop: zero-latency server, concurrency 64 (median [min-max] of samples; "
        "vs raw: median of each sample over the raw aiohttp samples beside it)"
    )
    header = [
        "contender",
        "req/s",
        "client CPU us/req",
        "req/s vs raw",
        "CPU vs raw",
        "server CPU",
        "other load",
        "page faults/req",
        "rounds",
    ]
    return [(title, header, rows)]


def _little_table(results: Results) -> list[Table]:
    if not results.little:
        return []
    ceiling = results.little_ceiling
    single = results.little_single
    floor = (
        single.per_second.median / results.little_single_ceiling
        if single is not None and single.samples
        else math.nan
    )
    rows = [
        [
            name,
            _range(r.per_second),
            f"{r.per_second.median / ceiling:.1%}" if r.samples else "-",
            f"{r.per_second.median / ceiling / floor:.1%}"
            if r.samples and math.isfinite(floor)
            else "-",
            _range(r.cpu_us_per_request),
            f"{r.other_load.median:.0%}" if r.samples else "-",
            _rounds(r),
        ]
        for name, r in results.little.items()
    ]
    if single is not None and single.samples:
        rows.append(
            [
                f"{BASELINE}, one at a time (c=1)",
                _range(single.per_second, digits=1),
                f"{floor:.1%}",
                "100.0%",
                _range(single.cpu_us_per_request),
                f"{single.other_load.median:.0%}",
                _rounds(single),
            ]
        )
    title = (
        f"Little's law: 50 ms server, concurrency 64, ceiling {ceiling:,.0f} req/s "
        "(of c=1: the efficiency over what one request at a time reaches here)"
    )
    header = [
        "contender",
        "req/s",
        "efficiency",
        "of c=1",
        "client CPU us/req",
        "other load",
        "rounds",
    ]
    return [(title, header, rows)]


def _open_loop_table(results: Results) -> list[Table]:
    if not results.open_loop:
        return []
    base = results.open_loop.get(BASELINE)
    base_p99 = base.p99.median if base else math.nan
    base_p50 = base.p50.median if base else math.nan
    rows = []
    for name, r in results.open_loop.items():
        added = (r.p99.median - base_p99) * 1e3
        added50 = (r.p50.median - base_p50) * 1e3
        rows.append(
            [
                name,
                _range(r.p50, 1e3, 2),
                _range(r.p99, 1e3, 2),
                f"{added50:+.2f}" if math.isfinite(added50) else "-",
                f"{added:+.2f}" if math.isfinite(added) else "-",
                _range(r.max, 1e3, 1),
            ]
        )
    first = next(iter(results.open_loop.values()))
    title = (
        f"Open loop: {results.meta.get('open_loop_rate', '?')} req/s for "
        f"{first.requests:,} requests per round, 20 ms server, latency from the "
        "scheduled send (ms, median [min-max] of rounds)"
    )
    return [(title, ["contender", "p50", "p99", "added p50", "added p99", "max"], rows)]


def _memory_table(results: Results) -> list[Table]:
    if not results.memory:
        return []
    sizes = sorted({r.jobs for r in results.memory})
    rows = []
    for mode in sorted({r.mode for r in results.memory}, reverse=True):
        by_size = {r.jobs: r for r in results.memory if r.mode == mode}
        growth, _, _ = memory_growth_mb(results.memory, mode)
        rows.append(
            [mode]
            + [f"{by_size[n].peak_rss_mib * 1.048576:.1f}" if n in by_size else "-" for n in sizes]
            + [f"{growth:+.1f}" if math.isfinite(growth) else "-"]
        )
    title = "Peak RSS (MB) of one fresh process over N jobs from a generator, concurrency 64"
    return [(title, ["mode"] + [f"{n:,} jobs" for n in sizes] + ["growth"], rows)]


def _limiter_table(results: Results) -> list[Table]:
    if not results.limiters:
        return []
    rows = [
        [
            f"{r.rate:g}/s",
            r.limiter,
            r.config,
            f"{r.long_run_error:+.2%}" if math.isfinite(r.long_run_error) else "n/a",
            f"{r.busiest_window} (limit {r.rate + r.burst:g})",
            str(r.first_second),
        ]
        for r in results.limiters
    ]
    title = (
        "Rate limiters: pure acquire loops; long-run rate after the first second; "
        "limit = rate + the burst the configuration allows"
    )
    header = ["rate", "limiter", "config", "long-run error", "busiest 1 s", "first 1 s"]
    return [(title, header, rows)]


def _overhead_table(results: Results) -> list[Table]:
    if not results.overhead:
        return []
    by_hand = next(iter(results.overhead.values()))[0].median
    rows = [
        [
            name,
            _range(cpu, digits=1),
            f"{cpu.median - by_hand:+.1f}" if math.isfinite(by_hand) else "-",
            _fmt_ratio(paired.median),
        ]
        for name, (cpu, paired) in results.overhead.items()
    ]
    title = (
        "Library overhead, network left out: in-process fake transport, concurrency 64 "
        "(CPU us/job, median [min-max] of rounds; ratio: median of per-round ratios)"
    )
    return [(title, ["variant", "CPU us/job", "over by hand", "ratio"], rows)]


def _instruction_tables(results: Results) -> list[Table]:
    found: list[Table] = []
    if results.instructions:
        found.append(
            (
                "Library overhead in instructions (callgrind; deterministic): the overhead "
                "harness at 200 and 2,200 jobs, difference per job",
                ["variant", "instructions/job", "over by hand", "ratio"],
                _instruction_rows(results.instructions, next(iter(results.instructions))),
            )
        )
    whole_client = (
        (
            "Whole client in instructions (callgrind, median of 3 runs): each "
            "contender's process against the lean server, concurrency 64, difference "
            "per request between two batch sizes",
            results.instructions_network,
        ),
        (
            "Whole client in instructions, one call at a time (callgrind, median of 3 "
            "runs): each call awaited before the next, difference per request between "
            "two numbers of calls",
            results.instructions_sequential,
        ),
    )
    for title, counts in whole_client:
        if counts:
            columns = ["contender", "instructions/request", f"over {BASELINE}", "ratio"]
            found.append((title, columns, _instruction_rows(counts, BASELINE)))
    return found


def _goodput_and_codec_tables(results: Results) -> list[Table]:
    found: list[Table] = []
    if results.goodput:
        found.append(goodput_table(results.goodput))
    if results.codec is not None:
        found.append(
            (
                "Codec",
                ["what", "payloads/s"],
                [["to_payload + orjson.dumps", _range(results.codec)]],
            )
        )
    return found


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_text(results: Results) -> str:
    parts = [f"{title}\n{_text_table(header, rows)}" for title, header, rows in tables(results)]
    found = checks(results)
    parts.append(
        "Targets\n"
        + _text_table(
            ["", "figure", "measured", "target"],
            [[c.verdict, c.name, c.measured, c.target] for c in found],
        )
    )
    return "\n\n".join(parts)


def _misses(found: Sequence[Check]) -> str:
    missed = [c for c in found if c.passed is False]
    if not missed:
        return "Every target measured in this run passes."
    return "Missed: " + "; ".join(f"{c.name}: {c.measured} (target {c.target})" for c in missed)


def render_markdown(results: Results) -> str:
    meta = results.meta
    found = checks(results)
    lines = [
        "# nebula-async benchmark results",
        "",
        f"Run {meta.get('started_utc', '?')} ({meta.get('mode', '?')} mode, "
        f"{meta.get('duration_s', math.nan):.0f} s) on {meta.get('cpu_model', '?')}, "
        f"{meta.get('nproc', '?')} cores, {meta.get('ram_gib', math.nan):.1f} GiB; "
        f"Python {meta.get('versions', {}).get('python', '?')}; "
        f"load average {meta.get('loadavg_start', '?')} at start.",
        "",
        "## Targets",
        "",
        _md_table(
            ["", "figure", "measured", "target"],
            [[c.verdict, c.name, c.measured, c.target] for c in found],
        ),
        "",
        _misses(found),
    ]
    for title, header, rows in tables(results):
        lines += ["", f"## {title}", "", _md_table(header, rows)]
    versions = meta.get("versions", {})
    lines += [
        "",
        "## Versions",
        "",
        ", ".join(f"{name} {version}" for name, version in versions.items()),
        "",
    ]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Summary):
        return _jsonable(value.as_json())
    if attrs.has(type(value)):
        data = {f.name: _jsonable(getattr(value, f.name)) for f in attrs.fields(type(value))}
        for name in (
            "per_second",
            "cpu_us_per_request",
            "server_busy",
            "other_load",
            "faults_per_request",
            "long_run_error",
            "refused_share",
        ):
            if hasattr(type(value), name):
                data[name] = _jsonable(getattr(value, name))
        return data
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(results: Results, path: Path) -> None:
    found = checks(results)
    data = {
        "meta": results.meta,
        "targets": [attrs.asdict(c) | {"verdict": c.verdict} for c in found],
        "throughput": results.throughput,
        "littles_law": {
            "ceiling_per_s": results.little_ceiling,
            "contenders": results.little,
            "single": results.little_single,
            "single_ceiling_per_s": results.little_single_ceiling,
        },
        "open_loop": results.open_loop,
        "memory": results.memory,
        "limiters": results.limiters,
        "goodput": results.goodput,
        "codec_payloads_per_s": results.codec,
        "overhead_instructions_per_job": results.instructions,
        "network_instructions_per_request": results.instructions_network,
        "sequential_instructions_per_request": results.instructions_sequential,
        "overhead_cpu_us_per_job": {
            name: {"cpu_us_per_job": cpu, "ratio_to_by_hand": paired}
            for name, (cpu, paired) in results.overhead.items()
        },
    }
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
