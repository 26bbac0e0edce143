"""``nebula-async run``: check a jobs file, then run it into a resumable results file.

The order of work, so that bad input never costs a request and a crash never
costs a finished job:

1. read the existing results file, if any (jobs with an ok line are done);
2. check every line of the jobs file in one streaming pass (nothing is sent
   when a line is bad, unless ``--skip-invalid`` records it as a failed job);
3. stream the remaining jobs through :meth:`NebulaClient.stream`, appending one
   line per finished job as it finishes (after downloading its images with
   ``--download``).

With ``--download`` a job counts as ok only once all its images are saved. A job
generated but with images not saved gets a line listing them (``pending_downloads``),
and a rerun saves them from there (:func:`repair_downloads`) rather than
generating the job again: generations are billed, downloads are not. For the
same reason a failed job whose latest line keeps some URLs (its successful
submissions) is sent again only for the images it lacks (:class:`Resumed`); its
new line lists the old URLs first, then the new ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from nebula_async._client import NebulaClient
from nebula_async._exceptions import ValidationError
from nebula_async._models import GeneratedImage, Job, JobResult, RetryPolicy

from ._download import ImageDownloader, api_is_loopback
from ._jobfile import BadLine, JobLine, iter_job_lines
from ._progress import JobProgress
from ._results import (
    PENDING_DOWNLOADS,
    ResultsFileError,
    ResultsWriteError,
    ResultWriter,
    ResumeState,
    bad_line_record,
    download_record,
    job_result_record,
    load_resume_state,
    parse_pending_downloads,
    read_record_at,
    recorded_urls,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_WRITE_FAILED",
    "ClientSettings",
    "Repair",
    "RunOptions",
    "Resumed",
    "RunTally",
    "err",
    "execute_jobs",
    "job_results",
    "prepare_download_dir",
    "repair_downloads",
    "run_command",
    "write_error_in",
]

EXIT_OK: Final = 0
EXIT_SOME_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_WRITE_FAILED: Final = 3
EXIT_INTERRUPTED: Final = 130

# Bad lines shown on stderr before "... and N more" (all of them are counted).
_BAD_LINES_SHOWN: Final = 20
# Finished jobs waiting for their downloads at once; beyond it the results
# stream is not read, which in turn holds back the client (backpressure).
_PENDING_DOWNLOADS: Final = 64
# What the line written before a generated job's images are fetched says about them
# (seen only when the run stops before the job's final line).
_NOT_DOWNLOADED_YET: Final = "not downloaded yet"
_STOPPED_MESSAGE: Final = (
    "generated, but the run stopped before its images were saved; "
    "a rerun with --download saves them without sending the job again"
)


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
    repaired: int = 0

    @property
    def finished(self) -> int:
        """Jobs that got a results line in this execution."""
        return self.ok + self.failed

    def add(self, other: RunTally) -> None:
        """Count ``other``'s jobs in this tally too (latencies are not merged)."""
        self.ok += other.ok
        self.failed += other.failed
        self.images += other.images
        self.download_failures += other.download_failures
        self.repaired += other.repaired


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a failed job's latest line carries over to its next attempt: the URLs of
    its successful submissions (images 1..k) and the files saved for them (None where
    not saved; all None when the line has no files)."""

    urls: list[str]
    files: list[str | None]

    def apply_to(self, job: Job) -> Job:
        """``job`` asking only for the images not carried over."""
        return Job(job.request, id=job.id, images=job.total_images - len(self.urls))


def resumed_from(record: Mapping[str, object], total_images: int) -> Resumed | None:
    """What ``record`` (a failed job's latest line) carries over to a job wanting
    ``total_images``; None when it has no URLs, or as many as the job wants (odd:
    the whole job is sent again)."""
    urls = recorded_urls(record)
    if not urls or len(urls) >= total_images:
        return None
    return Resumed(list(urls), _recorded_files(record, len(urls))[: len(urls)])


def _saved_file(path: str | None, directory: Path) -> str | None:
    """``path`` when it is a file saved in ``directory``, else None (to fetch again)."""
    if path is None:
        return None
    file = Path(path)
    try:
        if file.is_file() and file.resolve().parent == directory.resolve():
            return path
    except OSError:
        pass
    return None


@dataclass(slots=True)
class _CheckReport:
    good: int = 0
    already_ok: int = 0
    to_send: int = 0
    bad: list[BadLine] = field(default_factory=list)
    # Generated jobs with images still to save: job id -> input line.
    repair_lines: dict[str, int] = field(default_factory=dict)


def err(message: str) -> None:
    """Print ``message`` to stderr as the command's own complaint."""
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
        elif item.job_id in state.repair:
            report.repair_lines[item.job_id] = item.line_no
        else:
            report.to_send += 1
    return report


def _report_bad_lines(options: RunOptions, bad: list[BadLine]) -> None:
    for item in bad[:_BAD_LINES_SHOWN]:
        err(f"{options.jobs_path}: {item.describe()}")
    if len(bad) > _BAD_LINES_SHOWN:
        err(f"... and {len(bad) - _BAD_LINES_SHOWN} more bad lines")


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


async def _save_into(
    downloader: ImageDownloader,
    job_id: str,
    files: list[str | None],
    images: Mapping[int, GeneratedImage],
) -> dict[int, str]:
    """Save ``images`` (by position k), filling ``files``; returns the failures by k."""
    saved, failures = await downloader.save_images(job_id, images)
    for k, path in saved.items():
        files[k - 1] = path
    return failures


async def execute_jobs(
    client: NebulaClient,
    job_lines: Iterable[JobLine | BadLine],
    *,
    writer: ResultWriter,
    progress: JobProgress,
    downloader: ImageDownloader | None = None,
    keep_latencies: bool = False,
    resume: Callable[[JobLine], Resumed | None] | None = None,
) -> RunTally:
    """Run the jobs, appending each finished job's line to ``writer`` as it finishes.

    A :class:`BadLine` met on the way (the jobs file changed since it was checked)
    is recorded as a failed job. The jobs iterable is read lazily by the client.

    With a ``downloader``, a generated job's inline (``b64_json``) images are saved
    at once; if it has URL images, a line listing them as pending downloads is
    written before they are fetched (so an interrupt or a crash while fetching
    never costs the generation: a rerun fetches them), then the job's final line.

    ``resume(line)`` tells what a job's previous attempt carries over (read when the
    job is about to be sent): the job then asks only for the images it lacks, and
    its line lists the carried URLs (and files, numbered 1..k) before the new ones.
    """
    tally = RunTally(latencies=[] if keep_latencies else None)
    # Job id -> input line (and what a previous attempt carries over), only for jobs
    # in flight (bounded by the client's window).
    line_of: dict[str, int] = {}
    resumed_of: dict[str, Resumed] = {}

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
            resumed = resume(item) if resume is not None else None
            if resumed is None:
                yield item.job
            else:
                resumed_of[item.job_id] = resumed
                yield resumed.apply_to(item.job)

    def record_of(result: JobResult, resumed: Resumed | None) -> dict[str, object]:
        if tally.latencies is not None:
            tally.latencies.append(result.elapsed_s)
        record = job_result_record(result, line_no=line_of.pop(result.job_id, None))
        if resumed is not None:
            record["urls"] = [*resumed.urls, *result.urls]
            record["resumed_urls"] = len(resumed.urls)
        return record

    def all_images(
        result: JobResult, resumed: Resumed | None
    ) -> tuple[dict[int, GeneratedImage], list[str | None]]:
        """The job's images by position k (the carried ones first) and their files,
        None where not saved yet (carried images keep their files when still there)."""
        assert downloader is not None
        carried = [] if resumed is None else resumed.urls
        images = {k: GeneratedImage(url=url) for k, url in enumerate(carried, start=1)}
        images.update(enumerate(result.images, start=len(carried) + 1))
        files: list[str | None] = [None] * len(images)
        if resumed is not None:
            for k, path in enumerate(resumed.files):
                files[k] = _saved_file(path, downloader.directory)
        return images, files

    download_slots = anyio.Semaphore(_PENDING_DOWNLOADS)

    def finish_downloaded(
        record: dict[str, object],
        files: list[str | None],
        failures: dict[int, str],
        images: dict[int, GeneratedImage],
        *,
        generated: bool,
    ) -> None:
        final = download_record(
            record, generated=generated, files=files, failures=failures, images=images
        )
        if failures:
            tally.download_failures += 1
        finish(final, ok=bool(final["ok"]), images=len(images))

    async def fetch_then_finish(
        record: dict[str, object],
        files: list[str | None],
        to_fetch: dict[int, GeneratedImage],
        failures: dict[int, str],
        images: dict[int, GeneratedImage],
        *,
        generated: bool,
    ) -> None:
        assert downloader is not None
        try:
            failures = failures | await _save_into(downloader, str(record["id"]), files, to_fetch)
        finally:
            download_slots.release()
        finish_downloaded(record, files, failures, images, generated=generated)

    async def handle(
        ok: bool,
        record: dict[str, object],
        images: dict[int, GeneratedImage],
        files: list[str | None],
        downloads: anyio.abc.TaskGroup,
    ) -> None:
        assert downloader is not None
        job_id = str(record["id"])
        unsaved = {k: image for k, image in images.items() if files[k - 1] is None}
        if not ok:
            # Its images are carried over to a rerun (by URL); saved now, for a look.
            await download_slots.acquire()
            downloads.start_soon(
                partial(fetch_then_finish, generated=False), record, files, unsaved, {}, images
            )
            return
        inline = {k: image for k, image in unsaved.items() if image.url is None}
        remote = {k: image for k, image in unsaved.items() if image.url is not None}
        failures: dict[int, str] = {}
        if inline:
            # Local and quick; shielded, so that an interrupt cannot drop these images.
            with anyio.CancelScope(shield=True):
                failures = await _save_into(downloader, job_id, files, inline)
        if not remote:
            finish_downloaded(record, files, failures, images, generated=True)
            return
        # Recorded before fetching (no await in between): a rerun fetches what this
        # line lists, instead of generating the job again.
        not_yet = dict.fromkeys(remote, _NOT_DOWNLOADED_YET)
        writer.write(
            download_record(
                record,
                generated=True,
                files=files,
                failures=failures | not_yet,
                images=images,
                message=_STOPPED_MESSAGE,
            )
        )
        await download_slots.acquire()
        downloads.start_soon(
            partial(fetch_then_finish, generated=True), record, files, remote, failures, images
        )

    async with anyio.create_task_group() as downloads, job_results(client, jobs()) as results:
        async for result in results:
            resumed = resumed_of.pop(result.job_id, None)
            record = record_of(result, resumed)
            if downloader is None:
                finish(record, ok=result.ok, images=len(result.images))
                continue
            images, files = all_images(result, resumed)
            if not images:
                record = download_record(
                    record, generated=result.ok, files=[], failures={}, images={}
                )
                finish(record, ok=result.ok, images=0)
            else:
                await handle(result.ok, record, images, files, downloads)
    return tally


@dataclass(frozen=True, slots=True)
class Repair:
    """A generated job whose images are not all saved: its id, input line, results line."""

    job_id: str
    line_no: int
    offset: int


def _recorded_files(record: Mapping[str, object], length: int) -> list[str | None]:
    raw = record.get("files")
    files: list[str | None] = (
        [item if isinstance(item, str) else None for item in raw] if isinstance(raw, list) else []
    )
    return files + [None] * (length - len(files))


async def repair_downloads(
    repairs: Iterable[Repair],
    *,
    results_path: Path,
    writer: ResultWriter,
    progress: JobProgress,
    downloader: ImageDownloader,
) -> RunTally:
    """Save the pending images of generated jobs, from the URLs (or data) their latest
    results line records, and append each job's new line. Nothing is sent to the API.

    The new line is ok when every image is now saved; otherwise it lists what is
    still pending, for the next rerun.
    """
    tally = RunTally()
    slots = anyio.Semaphore(_PENDING_DOWNLOADS)

    async def repair(record: dict[str, object], images: dict[int, GeneratedImage]) -> None:
        try:
            files = _recorded_files(record, max(images))
            failures = await _save_into(downloader, str(record["id"]), files, images)
        finally:
            slots.release()
        final = download_record(
            record, generated=True, files=files, failures=failures, images=images
        )
        writer.write(final)
        if failures:
            tally.failed += 1
            tally.download_failures += 1
        else:
            tally.ok += 1
            tally.repaired += 1
        progress.job_finished(ok=not failures, images=0)

    async with anyio.create_task_group() as tasks:
        for item in repairs:
            record = read_record_at(results_path, item.offset)
            images = parse_pending_downloads(record.get(PENDING_DOWNLOADS))
            # The resume state only lists lines with valid, non-empty pending downloads.
            assert images, f"no pending downloads at byte {item.offset}"
            record["line"] = item.line_no
            await slots.acquire()
            tasks.start_soon(repair, record, images)
    return tally


async def _send_pending(
    options: RunOptions,
    check: _CheckReport,
    state: ResumeState,
    client: NebulaClient,
    writer: ResultWriter,
    progress: JobProgress,
    downloader: ImageDownloader | None,
) -> RunTally:
    """The second pass: every good line whose job is neither ok nor generated yet."""
    lines = iter_job_lines(
        options.jobs_path,
        load_images=True,
        allow_b64_json=options.download_dir is not None,
        skip_lines={bad.line_no for bad in check.bad},
        check_duplicates=False,
    )
    pending = (
        item
        for item in lines
        if item.job_id not in state.ok_ids and item.job_id not in state.repair
    )

    def resume(item: JobLine) -> Resumed | None:
        # Read only now, so memory holds the URLs of the jobs in flight, not of all.
        offset = state.partial.get(item.job_id)
        if offset is None:
            return None
        return resumed_from(read_record_at(options.out_path, offset), item.job.total_images)

    # closing(): the jobs file is closed at once even when the run stops early.
    with closing(lines):
        async with client:
            return await execute_jobs(
                client,
                pending,
                writer=writer,
                progress=progress,
                downloader=downloader,
                resume=resume,
            )


async def _work(
    options: RunOptions,
    check: _CheckReport,
    state: ResumeState,
    client: NebulaClient | None,
    writer: ResultWriter,
    repairs: list[Repair],
) -> RunTally:
    """Repair pending downloads (with ``--download``), then send the jobs not done."""
    with JobProgress(check.to_send + len(repairs), enabled=options.progress) as progress:
        if options.download_dir is None:
            assert client is not None
            return await _send_pending(options, check, state, client, writer, progress, None)
        loopback = api_is_loopback(options.client.base_url)  # the mock server's images
        async with ImageDownloader(options.download_dir, allow_loopback=loopback) as downloader:
            tally = await repair_downloads(
                repairs,
                results_path=options.out_path,
                writer=writer,
                progress=progress,
                downloader=downloader,
            )
            if client is not None:
                tally.add(
                    await _send_pending(options, check, state, client, writer, progress, downloader)
                )
            return tally


def prepare_download_dir(directory: Path) -> str | None:
    """Create ``--download DIR`` if needed; a reason when it cannot hold the images."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the --download directory {directory}: {exc.strerror or exc}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the --download directory {directory} is not writable"
    return None


def write_error_in(exc: BaseException) -> ResultsWriteError | None:
    """The :class:`ResultsWriteError` behind ``exc``, which task groups may have wrapped."""
    if isinstance(exc, ResultsWriteError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = write_error_in(inner)
            if found is not None:
                return found
    return None


async def run_command(options: RunOptions) -> int:
    """``nebula-async run``; returns the exit code (0 all ok, 1 some failed, 2 bad input,
    3 the results file could not be written)."""
    if not options.jobs_path.is_file():
        err(f"jobs file not found: {options.jobs_path}")
        return EXIT_BAD_INPUT
    if not options.out_path.parent.is_dir():
        err(f"the directory of --out does not exist: {options.out_path.parent}")
        return EXIT_BAD_INPUT
    try:
        # A first look, unlocked, only to count; the writer reads it again under its lock.
        preview = load_resume_state(options.out_path)
    except ResultsFileError as exc:
        err(f"cannot resume from {exc}; fix or move that file")
        return EXIT_BAD_INPUT
    except OSError as exc:
        err(f"cannot read the results file {options.out_path}: {exc.strerror or exc}")
        return EXIT_BAD_INPUT

    check = _check_jobs(options, preview)
    if check.bad and not options.skip_invalid:
        _report_bad_lines(options, check.bad)
        err(f"{len(check.bad)} bad line(s); nothing was sent (use --skip-invalid to run the rest)")
        return EXIT_BAD_INPUT
    if check.bad:
        _report_bad_lines(options, check.bad)
    if options.download_dir is not None:
        problem = prepare_download_dir(options.download_dir)
        if problem is not None:
            err(f"{problem}; nothing was sent")
            return EXIT_BAD_INPUT

    client: NebulaClient | None = None
    if check.to_send:
        try:
            client = options.client.make_client()
        except ValidationError as exc:
            err(str(exc))
            return EXIT_BAD_INPUT

    writer = ResultWriter(options.out_path)
    try:
        state = writer.open()
    except (ResultsFileError, OSError) as exc:
        err(f"cannot write results: {exc}")
        return EXIT_BAD_INPUT
    # Generated jobs of this jobs file whose images are not all saved (read under the lock).
    repairs = [
        Repair(job_id, line_no, state.repair[job_id])
        for job_id, line_no in check.repair_lines.items()
        if job_id in state.repair
    ]
    not_downloaded = 0
    if options.download_dir is None and repairs:
        not_downloaded, repairs = len(repairs), []
        err(
            f"{not_downloaded} job(s) were generated but their images are not all saved; "
            "they are not sent again: rerun with --download DIR to save them"
        )
    tally = RunTally()
    try:
        with writer:
            # A bad line never overrides a job already ok or generated (e.g. a duplicate).
            for bad in check.bad:
                if bad.job_id not in state.ok_ids and bad.job_id not in state.repair:
                    writer.write(bad_line_record(bad))
            if client is not None or repairs:
                tally = await _work(options, check, state, client, writer, repairs)
    except Exception as exc:
        write_error = write_error_in(exc)
        if write_error is None:
            raise
        err(f"{write_error}; the run stopped (rerun to resume once it can be written)")
        err(f"this result was not recorded: {write_error.record.decode(errors='replace')}")
        return EXIT_WRITE_FAILED

    failed = tally.failed + len(check.bad) + not_downloaded
    summary = (
        f"{check.good + len(check.bad)} jobs: {check.already_ok + tally.ok} ok "
        f"({check.already_ok} done before, {tally.ok} now"
    )
    if tally.repaired:
        summary += f", {tally.repaired} of them by saving their images"
    summary += f"), {failed} failed"
    if tally.download_failures:
        summary += f", {tally.download_failures} with images not saved"
    err(f"{summary}; results in {options.out_path}")
    return EXIT_SOME_FAILED if failed else EXIT_OK
