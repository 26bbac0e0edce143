"""``nebula-async run``: check a jobs file, then run it into a resumable results file.

The order of work, so that bad input never costs a request and a crash never
costs a finished job:

1. read the existing results file, if any (jobs with an ok line are done);
2. check every line of the jobs file in one streaming pass (nothing is sent
   when a line is bad, unless ``--skip-invalid`` records it as a failed job);
3. stream the remaining jobs through :meth:`NebulaClient.stream`, appending one
   line per finished job as it finishes (after downloading its images with
   ``--download``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio

from ._client import NebulaClient
from ._download import ImageDownloader
from ._exceptions import ValidationError
from ._jobfile import BadLine, JobLine, iter_job_lines
from ._models import Job, JobResult, RetryPolicy
from ._progress import JobProgress
from ._results import (
    ResultsFileError,
    ResultWriter,
    ResumeState,
    bad_line_record,
    job_result_record,
    load_resume_state,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "ClientSettings",
    "RunOptions",
    "RunTally",
    "execute_jobs",
    "job_results",
    "run_command",
]

EXIT_OK: Final = 0
EXIT_SOME_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_INTERRUPTED: Final = 130

# Bad lines shown on stderr before "... and N more" (all of them are counted).
_BAD_LINES_SHOWN: Final = 20
# Finished jobs waiting for their downloads at once; beyond it the results
# stream is not read, which in turn holds back the client (backpressure).
_PENDING_DOWNLOADS: Final = 64


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """The client knobs the CLI exposes; ``retries`` counts repeats after the first try."""

    concurrency: int = 16
    rate: float | None = None
    retries: int = 3
    timeout: float | None = 120.0
    payload_style: str = "dotted"
    base_url: str | None = None

    def make_client(self, *, token: str | None = None) -> NebulaClient:
        """A client with these settings (credentials from the environment unless ``token``).

        Raises :class:`ValidationError` when no credentials are set.
        """
        return NebulaClient(
            token=token,
            base_url=self.base_url,
            max_concurrency=self.concurrency,
            rate_limit=self.rate,
            retry=RetryPolicy(max_attempts=self.retries + 1),
            timeout=self.timeout,
            payload_style=self.payload_style,
        )


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``nebula-async run`` was asked to do."""

    jobs_path: Path
    out_path: Path
    client: ClientSettings = ClientSettings()
    download_dir: Path | None = None
    skip_invalid: bool = False
    progress: bool = True


@dataclass(slots=True)
class RunTally:
    """What one execution did. ``latencies`` is filled only when asked for (memory)."""

    ok: int = 0
    failed: int = 0
    images: int = 0
    latencies: list[float] | None = None
    download_failures: int = 0

    @property
    def finished(self) -> int:
        """Jobs that got a results line in this execution."""
        return self.ok + self.failed


@dataclass(slots=True)
class _CheckReport:
    good: int = 0
    already_ok: int = 0
    to_send: int = 0
    bad: list[BadLine] = field(default_factory=list)


def _err(message: str) -> None:
    print(f"nebula-async: {message}", file=sys.stderr)


def _check_jobs(options: RunOptions, state: ResumeState) -> _CheckReport:
    report = _CheckReport()
    for item in iter_job_lines(
        options.jobs_path, load_images=False, allow_b64_json=options.download_dir is not None
    ):
        if isinstance(item, BadLine):
            report.bad.append(item)
            continue
        report.good += 1
        if item.job_id in state.ok_ids:
            report.already_ok += 1
        else:
            report.to_send += 1
    return report


def _report_bad_lines(options: RunOptions, bad: list[BadLine]) -> None:
    for item in bad[:_BAD_LINES_SHOWN]:
        _err(f"{options.jobs_path}: {item.describe()}")
    if len(bad) > _BAD_LINES_SHOWN:
        _err(f"... and {len(bad) - _BAD_LINES_SHOWN} more bad lines")


@asynccontextmanager
async def job_results(
    client: NebulaClient, jobs: Iterable[Job]
) -> AsyncIterator[AsyncIterator[JobResult]]:
    """``client.stream(jobs)``, closed on leaving the block (even early), which cancels
    the jobs still running at once rather than whenever the generator is collected."""
    stream = client.stream(jobs)
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def execute_jobs(
    client: NebulaClient,
    job_lines: Iterable[JobLine | BadLine],
    *,
    writer: ResultWriter,
    progress: JobProgress,
    downloader: ImageDownloader | None = None,
    keep_latencies: bool = False,
) -> RunTally:
    """Run the jobs, appending each finished job's line to ``writer`` as it finishes.

    A :class:`BadLine` met on the way (the jobs file changed since it was checked)
    is recorded as a failed job. The jobs iterable is read lazily by the client.
    """
    tally = RunTally(latencies=[] if keep_latencies else None)
    # Job id -> input line, only for jobs in flight (bounded by the client's window).
    line_of: dict[str, int] = {}

    def finish(record: dict[str, object], *, ok: bool, images: int) -> None:
        writer.write(record)
        if ok:
            tally.ok += 1
        else:
            tally.failed += 1
        tally.images += images
        progress.job_finished(ok=ok, images=images, rate_limited=client.statistics().rate_limited)

    def jobs() -> Iterator[Job]:
        for item in job_lines:
            if isinstance(item, BadLine):
                finish(bad_line_record(item), ok=False, images=0)
                continue
            line_of[item.job_id] = item.line_no
            yield item.job

    def record_of(result: JobResult) -> dict[str, object]:
        if tally.latencies is not None:
            tally.latencies.append(result.elapsed_s)
        return job_result_record(result, line_no=line_of.pop(result.job_id, None))

    download_slots = anyio.Semaphore(_PENDING_DOWNLOADS)

    async def download_then_finish(result: JobResult, record: dict[str, object]) -> None:
        assert downloader is not None
        try:
            outcome = await downloader.download_job(result.job_id, result.images)
        finally:
            download_slots.release()
        record["files"] = outcome.files
        record["download_error"] = outcome.error
        if outcome.error is not None:
            tally.download_failures += 1
        finish(record, ok=result.ok, images=len(result.images))

    async with anyio.create_task_group() as downloads, job_results(client, jobs()) as results:
        async for result in results:
            record = record_of(result)
            if downloader is None:
                finish(record, ok=result.ok, images=len(result.images))
            elif not result.images:
                record["files"], record["download_error"] = [], None
                finish(record, ok=result.ok, images=0)
            else:
                await download_slots.acquire()
                downloads.start_soon(download_then_finish, result, record)
    return tally


async def _send_pending(
    options: RunOptions,
    check: _CheckReport,
    state: ResumeState,
    client: NebulaClient,
    writer: ResultWriter,
) -> RunTally:
    """The second pass: every good line whose job is not ok yet, through the client."""
    lines = iter_job_lines(
        options.jobs_path,
        load_images=True,
        allow_b64_json=options.download_dir is not None,
        skip_lines={bad.line_no for bad in check.bad},
        check_duplicates=False,
    )
    pending = (item for item in lines if item.job_id not in state.ok_ids)
    # closing(): the jobs file is closed at once even when the run stops early.
    with closing(lines), JobProgress(check.to_send, enabled=options.progress) as progress:
        async with client:
            if options.download_dir is None:
                return await execute_jobs(client, pending, writer=writer, progress=progress)
            async with ImageDownloader(options.download_dir) as downloader:
                return await execute_jobs(
                    client, pending, writer=writer, progress=progress, downloader=downloader
                )


async def run_command(options: RunOptions) -> int:
    """``nebula-async run``; returns the exit code (0 all ok, 1 some failed, 2 bad input)."""
    if not options.jobs_path.is_file():
        _err(f"jobs file not found: {options.jobs_path}")
        return EXIT_BAD_INPUT
    if not options.out_path.parent.is_dir():
        _err(f"the directory of --out does not exist: {options.out_path.parent}")
        return EXIT_BAD_INPUT
    try:
        # A first look, unlocked, only to count; the writer reads it again under its lock.
        preview = load_resume_state(options.out_path)
    except ResultsFileError as exc:
        _err(f"cannot resume from {exc}; fix or move that file")
        return EXIT_BAD_INPUT

    check = _check_jobs(options, preview)
    if check.bad and not options.skip_invalid:
        _report_bad_lines(options, check.bad)
        _err(f"{len(check.bad)} bad line(s); nothing was sent (use --skip-invalid to run the rest)")
        return EXIT_BAD_INPUT
    if check.bad:
        _report_bad_lines(options, check.bad)

    client: NebulaClient | None = None
    if check.to_send:
        try:
            client = options.client.make_client()
        except ValidationError as exc:
            _err(str(exc))
            return EXIT_BAD_INPUT

    writer = ResultWriter(options.out_path)
    try:
        state = writer.open()
    except (ResultsFileError, OSError) as exc:
        _err(f"cannot write results: {exc}")
        return EXIT_BAD_INPUT
    with writer:
        # A bad line never overrides a job that is already ok (e.g. a duplicate of it).
        for bad in check.bad:
            if bad.job_id not in state.ok_ids:
                writer.write(bad_line_record(bad))
        tally = RunTally()
        if client is not None:
            tally = await _send_pending(options, check, state, client, writer)

    failed = tally.failed + len(check.bad)
    summary = (
        f"{check.good + len(check.bad)} jobs: {check.already_ok + tally.ok} ok "
        f"({check.already_ok} done before, {tally.ok} now), {failed} failed"
    )
    if tally.download_failures:
        summary += f", {tally.download_failures} with failed downloads"
    _err(f"{summary}; results in {options.out_path}")
    return EXIT_SOME_FAILED if failed else EXIT_OK
