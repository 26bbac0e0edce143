"""The long reliability run: ``nox -s soak`` or ``python -m benchmarks.soak``.

Thousands of jobs (some fanned out) through the mock server with about 20% mixed
faults of every kind it injects, while the real ``nebula-async run`` process is
killed with SIGKILL at random moments and run again on the same ``--out``, with
and without ``--download``, until a run exits 0. Then the results file is
reconciled against the server's own record of what it generated:

- lost: a job whose final line lacks an image, or a job with no ok line;
- duplicated: a URL recorded twice (in one job or two);
- misrouted: a URL recorded for a job whose prompt it was not generated for;
- regenerated: generations the server answered that no result kept; each kill may
  cost at most the submissions in flight at that moment (answered within the
  latency bound before it), and the run prints both figures.

Not part of the default suite (it takes minutes); it prints its figures and exits
1 if any promise is broken. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from nebula_async.testing import FAULT_KINDS, MockNebulaServer

CLI = [sys.executable, "-m", "nebula_async.cli"]
#: Faults that end a submission for good (no retry): jobs hit by them fail and a
#: rerun does them again, which is part of what the soak checks.
FINAL_FAULTS = frozenset({"body_400", "body_401", "body_403", "http_400"})
LATENCY = (0.0, 0.03)
#: Answers issued this long before a kill may still have been on their way.
IN_FLIGHT_MARGIN_S = LATENCY[1] + 0.25


def mixed_faults(total: float = 0.20) -> dict[str, float]:
    """About ``total`` of attempts faulted, spread over every kind the mock has; the
    final (non-retried) kinds are rarer so that most faults exercise retries."""
    kinds = [kind for kind in FAULT_KINDS if kind != "slow"]
    weights = {kind: (0.2 if kind in FINAL_FAULTS else 1.0) for kind in kinds}
    scale = total / sum(weights.values())
    return {kind: weight * scale for kind, weight in weights.items()}


def write_jobs(path: Path, count: int, rng: random.Random) -> dict[str, tuple[str, int]]:
    """``count`` jobs, a tenth of them fanned out; returns id -> (prompt, images)."""
    wanted: dict[str, tuple[str, int]] = {}
    with path.open("wb") as file:
        for i in range(count):
            job_id, prompt = f"j{i}", f"soak-{i}"
            n, images = (2, rng.choice((3, 4, 5))) if i % 10 == 0 else (1, 1)
            line = {"id": job_id, "model": "m", "prompt": prompt, "n": n, "images": images}
            file.write(orjson.dumps(line) + b"\n")
            wanted[job_id] = (prompt, images)
    return wanted


@dataclass
class Phase:
    """One soak phase: a jobs file run to the end through kills."""

    name: str
    download: bool
    kills: list[float] = field(default_factory=list)
    runs: int = 0
    exit_codes: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


async def run_phase(
    phase: Phase, argv: Sequence[str], env: dict[str, str], *, kills: int, rng: random.Random
) -> None:
    """Run ``argv`` to exit 0, killing it ``kills`` times at random moments."""
    started = time.monotonic()
    for attempt in range(kills + 12):
        phase.runs += 1
        async with await anyio.open_process([*CLI, *argv], env=env) as process:
            if attempt < kills:
                with anyio.move_on_after(rng.uniform(0.5, 3.0)):
                    await process.wait()
                if process.returncode is None:
                    phase.kills.append(time.monotonic())
                    process.kill()
            with anyio.fail_after(600):
                await process.wait()
            code = process.returncode
        phase.exit_codes.append(code)
        if code == 0:
            break
        if attempt >= kills and code not in (1,):
            raise SystemExit(f"{phase.name}: run exited {code}")
    phase.elapsed_s = time.monotonic() - started


def final_records(path: Path) -> dict[str, dict[str, Any]]:
    """The last complete line of every job id (a torn last line is skipped)."""
    last: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().split(b"\n"):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            last[record["id"]] = record
    return last


def reconcile(
    server: MockNebulaServer, out: Path, wanted: dict[str, tuple[str, int]], phase: Phase
) -> dict[str, Any]:
    """Compare the results file with what the server generated; the figures."""
    issued: dict[str, list[str]] = defaultdict(list)
    issued_at: list[float] = []
    for record in server.requests:
        if record.fault is None and record.status == 200 and record.code == 200:
            issued[record.field("prompt")].extend(record.urls)
            issued_at.extend([record.received_at] * len(record.urls))
    records = final_records(out)
    lost = [job for job, (_, images) in wanted.items() if len(_ok_urls(records, job)) < images]
    kept = Counter(url for job in wanted for url in _ok_urls(records, job))
    duplicated = sum(count - 1 for count in kept.values() if count > 1)
    misrouted = sum(
        1
        for job, (prompt, _) in wanted.items()
        for url in _ok_urls(records, job)
        if url not in set(issued[prompt])
    )
    generated = sum(len(urls) for urls in issued.values())
    regenerated = generated - len(kept)
    in_flight_at_kills = sum(
        sum(1 for at in issued_at if kill - IN_FLIGHT_MARGIN_S <= at <= kill)
        for kill in phase.kills
    )
    return {
        "phase": phase.name,
        "jobs": len(wanted),
        "images wanted": sum(images for _, images in wanted.values()),
        "attempts": len(server.requests),
        "faulted": sum(1 for r in server.requests if r.fault is not None),
        "kills": len(phase.kills),
        "runs": phase.runs,
        "lost": len(lost),
        "duplicated": duplicated,
        "misrouted": misrouted,
        "regenerated": regenerated,
        "in flight at kills": in_flight_at_kills,
        "elapsed s": round(phase.elapsed_s, 1),
    }


def _ok_urls(records: dict[str, dict[str, Any]], job: str) -> list[str]:
    record = records.get(job)
    return list(record["urls"]) if record is not None and record.get("ok") else []


def broken(figures: dict[str, Any]) -> list[str]:
    """The promises a phase broke, in words (empty: all kept)."""
    problems = [name for name in ("lost", "duplicated", "misrouted") if figures[name]]
    if figures["regenerated"] > figures["in flight at kills"]:
        problems.append("regenerated more than was in flight at the kills")
    return problems


async def soak(jobs: int, kills: int, seed: int, workdir: Path) -> int:
    rng = random.Random(seed)
    rows = []
    for download in (False, True):
        name = "with --download" if download else "without --download"
        phase = Phase(name, download)
        directory = workdir / ("download" if download else "plain")
        directory.mkdir(parents=True, exist_ok=True)
        wanted = write_jobs(directory / "jobs.jsonl", jobs, rng)
        out = directory / "results.jsonl"
        argv = ["run", str(directory / "jobs.jsonl"), "--out", str(out), "--concurrency", "48"]
        # The injected 429s are random, not a limit: a fixed rate far above what the
        # mock serves keeps the adaptive rate from reading them as one.
        argv += ["--rate", "100000", "--no-adaptive"]
        if download:
            argv += ["--download", str(directory / "images")]
        async with MockNebulaServer(
            faults=mixed_faults(), latency=LATENCY, retry_after=0.05, seed=seed
        ) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
            env |= {"NEBULA_TOKEN": "mock-token", "NEBULA_BASE_URL": server.base_url}
            await run_phase(phase, argv, env, kills=kills, rng=rng)
            await anyio.sleep(0.2)
            rows.append(reconcile(server, out, wanted, phase))
    _print_table(rows)
    failures = [f"{row['phase']}: {problem}" for row in rows for problem in broken(row)]
    for failure in failures:
        print(f"BROKEN: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    width = max(len(key) for key in keys)
    print(f"{'':{width}}  " + "  ".join(f"{row['phase']:>20}" for row in rows))
    for key in keys[1:]:
        print(f"{key:{width}}  " + "  ".join(f"{row[key]!s:>20}" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per phase (10,000)")
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs per phase (6)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--workdir", type=Path, default=Path("build/soak"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return anyio.run(soak, args.jobs, args.kills, args.seed, args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
