"""Running jobs into the results file: the feed, the results loop, the download stage.

::

    jobs file --(feed: read, validate, inline images)--> client.stream
        --> results loop: one line per answer, written as it arrives
            --(URL images: a "pending" line, then)--> download stage --> final line

The feed is an async generator, so it runs in the stream's pump task, where the
client reads async input; it reads the jobs file, local images and (to resume a
job) its latest results line, and it never writes a result. The results loop is
the only writer of answers, and it never waits on a download: a job's URLs are
on disk as soon as its answer arrives, and the download stage (its own tasks, a
bounded number of jobs at a time) fetches them from the line it reads back, then
writes the job's final line. So a kill at any moment loses at most the
submissions in flight, and a rerun finishes whatever downloads were pending
(:class:`DownloadTask`).

A drain (:class:`RunControl`, a first Ctrl-C or SIGTERM) stops the feed; the
answers of the submissions in flight are still written. A job that got no image
and holds only :class:`~nebula_async.NotAttemptedError` (never sent) gets no line
at all, so a rerun simply sends it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from nebula_async._batch import JobStream
from nebula_async._client import NebulaClient
from nebula_async._exceptions import NotAttemptedError
from nebula_async._models import GeneratedImage, Job, JobResult

from ._download import ImageDownloader
from ._jobfile import BadLine, JobLine
from ._progress import JobProgress
from ._results import (
    PENDING_DOWNLOADS,
    ResultWriter,
    bad_line_record,
    download_record,
    job_result_record,
    parse_pending_downloads,
    pending_record,
    read_record_at,
    recorded_files,
    recorded_urls,
)

__all__ = [
    "DownloadStage",
    "DownloadTask",
    "Resumed",
    "RunControl",
    "RunTally",
    "execute_jobs",
    "job_results",
    "resumed_from",
    "stage_for",
]

# Jobs whose images are being fetched at once (the downloader bounds the images).
_DOWNLOAD_JOBS: Final = 64


@dataclass(slots=True)
class RunTally:
    """What one execution did. ``latencies`` is filled only when asked for (memory)."""

    ok: int = 0
    failed: int = 0
    images: int = 0
    latencies: list[float] | None = None
    download_failures: int = 0
    repaired: int = 0
    not_attempted: int = 0  #: jobs never sent (drained, circuit open): no line, rerun sends them
    stopped_by: NotAttemptedError | None = None  #: why the client stopped starting jobs

    @property
    def finished(self) -> int:
        """Jobs that got a final results line in this execution."""
        return self.ok + self.failed


class RunControl:
    """Tells a run to drain: stop starting submissions, finish those in flight.

    :meth:`drain` is what the first SIGINT/SIGTERM calls; the streams a run opens
    :meth:`attach` their drain hook (a stream attached after the drain drains at once).
    """

    def __init__(self) -> None:
        self.draining = False
        self.signal: int | None = None  # the signal that asked for the drain
        self.aborted = False  # stopped at once (a second signal, or the drain overran)
        self._hooks: list[Callable[[], None]] = []

    def attach(self, drain: Callable[[], None]) -> None:
        """Call ``drain`` when the run drains (now, if it already does)."""
        self._hooks.append(drain)
        if self.draining:
            drain()

    def detach(self, drain: Callable[[], None]) -> None:
        """Forget a hook of :meth:`attach` (its stream is closed)."""
        self._hooks.remove(drain)

    def drain(self) -> None:
        """Stop taking work (idempotent)."""
        if self.draining:
            return
        self.draining = True
        for hook in list(self._hooks):
            hook()


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a failed job's latest line carries over to its next attempt: the URLs of
    its successful submissions (images 1..k) and the files saved for them (None where
    not saved). A ``b64_json`` job carries the files saved, with no URLs."""

    urls: list[str]
    files: list[str | None]

    @property
    def count(self) -> int:
        """The images carried over."""
        return len(self.urls) or len(self.files)

    def apply_to(self, job: Job) -> Job:
        """``job`` asking only for the images not carried over."""
        return Job(job.request, id=job.id, images=job.total_images - self.count)


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


def resumed_from(
    record: Mapping[str, Any], total_images: int, directory: Path | None = None
) -> Resumed | None:
    """What ``record`` (a failed job's latest line) carries over to a job wanting
    ``total_images``; None when it has nothing, or as many as the job wants (odd:
    the whole job is sent again). ``directory``: the ``--download`` DIR, where the
    files of ``b64_json`` images (which have no URL) must still be."""
    urls = recorded_urls(record)
    if urls:
        if len(urls) >= total_images:
            return None
        return Resumed(list(urls), recorded_files(record, len(urls))[: len(urls)])
    if directory is None:
        return None
    saved: list[str | None] = []
    for path in recorded_files(record):
        if _saved_file(path, directory) is None:
            break  # images are numbered: only the leading run of saved ones carries over
        saved.append(path)
    if not saved or len(saved) >= total_images:
        return None
    return Resumed([], saved)


def _not_attempted(result: JobResult) -> bool:
    """Nothing of the job was sent: it gets no line (a rerun sends it)."""
    return (
        not result.images
        and bool(result.errors)
        and all(isinstance(error, NotAttemptedError) for error in result.errors)
    )


@dataclass(frozen=True, slots=True)
class DownloadTask:
    """A recorded line whose images the download stage fetches: the job, its input
    line (None: keep the recorded one), the line's byte offset, and whether the job
    was generated (every submission ok: the line becomes ok once saved)."""

    job_id: str
    line_no: int | None
    offset: int
    generated: bool
    repair: bool = False  #: left pending by an earlier run


def _images_to_fetch(
    record: Mapping[str, Any],
) -> tuple[dict[int, GeneratedImage], list[str | None]]:
    """The images of a recorded line still to save, by position k, and its files."""
    urls = recorded_urls(record)
    pending = parse_pending_downloads(record.get(PENDING_DOWNLOADS)) or {}
    length = max(len(urls), len(recorded_files(record)), max(pending, default=0))
    files = recorded_files(record, length)
    if pending:
        return pending, files
    # No pending list: an ok line of a run without --download, or the images a
    # failed job got (kept by URL for a partial resume, saved now for a look).
    images = {k: GeneratedImage(url=url) for k, url in enumerate(urls, start=1)}
    return {k: image for k, image in images.items() if files[k - 1] is None}, files


class DownloadStage:
    """Saves the images of recorded lines, ``jobs`` at a time, in tasks of its own,
    and writes each job's final line. :meth:`submit` never waits (the queue holds
    only line offsets), so the results loop never waits on a download."""

    def __init__(
        self,
        downloader: ImageDownloader,
        writer: ResultWriter,
        *,
        finish: Callable[[dict[str, object], bool], None],
        jobs: int = _DOWNLOAD_JOBS,
    ) -> None:
        self._downloader = downloader
        self._writer = writer
        self._finish = finish
        self._jobs = jobs
        self._send, self._receive = anyio.create_memory_object_stream[DownloadTask](math.inf)
        self._scope = anyio.CancelScope()
        self._stopped = False

    @property
    def downloader(self) -> ImageDownloader:
        """The downloader saving the images (its directory is ``--download`` DIR)."""
        return self._downloader

    def submit(self, task: DownloadTask) -> None:
        """Queue a line's images (never waits; after :meth:`stop`, the line stays
        pending for a rerun)."""
        if not self._stopped:
            self._send.send_nowait(task)

    def close(self) -> None:
        """No more tasks: :meth:`run` returns once the queued ones are done."""
        self._send.close()

    def stop(self) -> None:
        """Drop the downloads (a drain): those under way are cancelled, and every line
        not final yet stays pending on disk, for a rerun to save."""
        self._stopped = True
        self._send.close()
        self._scope.cancel()

    async def run(self) -> None:
        """Work through the queue until :meth:`close` and the queue is empty (or
        :meth:`stop`)."""
        with self._scope:
            async with self._receive, anyio.create_task_group() as tasks:
                for _ in range(self._jobs):
                    tasks.start_soon(self._work, self._receive.clone())

    async def _work(self, receive: MemoryObjectReceiveStream[DownloadTask]) -> None:
        async with receive:
            async for task in receive:
                await self._download(task)

    async def _download(self, task: DownloadTask) -> None:
        record = read_record_at(self._writer.path, task.offset)
        if task.line_no is not None:
            record["line"] = task.line_no
        images, files = _images_to_fetch(record)
        failures = await _save_into(self._downloader, task.job_id, files, images)
        final = download_record(
            record, generated=task.generated, files=files, failures=failures, images=images
        )
        self._finish(final, task.repair)


async def _save_into(
    downloader: ImageDownloader,
    job_id: str,
    files: list[str | None],
    images: Mapping[int, GeneratedImage],
) -> dict[int, str]:
    """Save ``images`` (by position k), filling ``files``; returns the failures by k."""
    if not images:
        return {}
    saved, failures = await downloader.save_images(job_id, images)
    for k, path in saved.items():
        files[k - 1] = path
    return failures


@dataclass(frozen=True, slots=True)
class _Sent:
    line_no: int
    fingerprint: str
    resumed: Resumed | None


class _Recorder:
    """The results loop's side of a run: every line of an answer is written here,
    in the task reading the client's results, never in the client's own tasks."""

    def __init__(
        self,
        client: NebulaClient,
        writer: ResultWriter,
        progress: JobProgress,
        tally: RunTally,
        stage: DownloadStage | None,
    ) -> None:
        self._client = client
        self._writer = writer
        self._progress = progress
        self._tally = tally
        self._stage = stage
        # Only the jobs in flight (bounded by the client's window).
        self._sent: dict[str, _Sent] = {}
        self._bad: list[BadLine] = []

    def sending(self, line: JobLine, resumed: Resumed | None) -> None:
        """Remember where a job being sent came from (called by the feed)."""
        self._sent[line.job_id] = _Sent(line.line_no, line.fingerprint, resumed)

    def defer_bad(self, bad: BadLine) -> None:
        """A line gone bad since the checking pass: recorded by :meth:`flush_bad`."""
        self._bad.append(bad)

    def flush_bad(self) -> None:
        """Write the bad lines the feed met (as failed jobs)."""
        while self._bad:
            self.finish(bad_line_record(self._bad.pop(0)), ok=False, images=0)

    def finish(self, record: Mapping[str, object], *, ok: bool, images: int) -> None:
        """Write a job's final line and count it."""
        self._writer.write(record)
        if ok:
            self._tally.ok += 1
        else:
            self._tally.failed += 1
        self._tally.images += images
        rate_limited = self._client.statistics().rate_limited
        self._progress.job_finished(ok=ok, images=images, rate_limited=rate_limited)

    async def record(self, result: JobResult) -> None:
        """Write the line(s) of one answer; hand its URL images to the download stage."""
        sent = self._sent.pop(result.job_id, None)
        if _not_attempted(result):
            self._tally.not_attempted += 1
            return
        if self._tally.latencies is not None:
            self._tally.latencies.append(result.elapsed_s)
        resumed = sent.resumed if sent is not None else None
        record = job_result_record(
            result,
            line_no=sent.line_no if sent is not None else None,
            fingerprint=sent.fingerprint if sent is not None else None,
        )
        if resumed is not None:
            record["urls"] = [*resumed.urls, *result.urls]
            record["resumed_urls"] = len(resumed.urls)
            record["resumed_images"] = resumed.count
        if self._stage is None:
            self.finish(record, ok=result.ok, images=len(result.images))
        else:
            await self._record_with_images(result, record, resumed, self._stage)

    async def _record_with_images(
        self,
        result: JobResult,
        record: dict[str, object],
        resumed: Resumed | None,
        stage: DownloadStage,
    ) -> None:
        images, files = _all_images(result, resumed, stage.downloader.directory)
        unsaved = {k: image for k, image in images.items() if files[k - 1] is None}
        inline = {k: image for k, image in unsaved.items() if image.url is None}
        failures: dict[int, str] = {}
        if inline:
            # Local and quick; shielded, so that an interrupt cannot drop these images
            # (they exist nowhere else).
            with anyio.CancelScope(shield=True):
                failures = await _save_into(stage.downloader, result.job_id, files, inline)
        remote = {k: image for k, image in unsaved.items() if image.url is not None}
        if not remote:
            final = download_record(
                record, generated=result.ok, files=files, failures=failures, images=images
            )
            if failures:
                self._tally.download_failures += 1
            self.finish(final, ok=bool(final["ok"]), images=len(result.images))
            return
        if result.ok:
            still = {k: image for k, image in unsaved.items() if files[k - 1] is None}
            line = pending_record(record, files=files, pending=still, failures=failures)
        else:  # failed, but what it got is kept by URL for a partial resume
            line = download_record(record, generated=False, files=files, failures={}, images={})
        # Written before any download waits: a kill from here on loses no generation.
        offset = self._writer.write(line)
        stage.submit(DownloadTask(result.job_id, None, offset, generated=result.ok))


def _all_images(
    result: JobResult, resumed: Resumed | None, directory: Path
) -> tuple[dict[int, GeneratedImage], list[str | None]]:
    """A job's images by position k (carried-over URLs first) and their files,
    None where not saved yet (carried images keep their files when still there)."""
    carried = 0 if resumed is None else resumed.count
    images = {
        k: GeneratedImage(url=url) for k, url in enumerate(resumed.urls if resumed else [], 1)
    }
    images.update(enumerate(result.images, start=carried + 1))
    files: list[str | None] = [None] * (carried + len(result.images))
    if resumed is not None:
        for k, path in enumerate(resumed.files):
            files[k] = _saved_file(path, directory)
    return images, files


@asynccontextmanager
async def job_results(
    client: NebulaClient, jobs: Iterable[Job] | AsyncIterable[Job]
) -> AsyncIterator[JobStream]:
    """``client.stream(jobs)`` entered: leaving the block (even early) cancels the
    jobs still running at once."""
    async with client.stream(jobs) as results:
        yield results


PlanLine = Callable[[JobLine], tuple[Job, Resumed | None] | None]


async def execute_jobs(
    client: NebulaClient,
    job_lines: Iterable[JobLine | BadLine],
    *,
    writer: ResultWriter,
    progress: JobProgress,
    tally: RunTally | None = None,
    control: RunControl | None = None,
    stage: DownloadStage | None = None,
    keep_latencies: bool = False,
    plan_line: PlanLine | None = None,
) -> RunTally:
    """Run the jobs, writing each answer's line as it arrives.

    ``plan_line(line)`` says what to send for a line (the job, or the job asking
    only for the images a previous attempt lacks, with what it carries over), or
    None to skip it; by default every line's job is sent. A :class:`BadLine` met
    on the way (the jobs file changed since it was checked) is recorded as a
    failed job. With a download ``stage``, URL images are left to it (a pending
    line first, the final line once saved); ``b64_json`` images are saved at once.
    """
    tally = tally if tally is not None else RunTally()
    if keep_latencies and tally.latencies is None:
        tally.latencies = []
    control = control if control is not None else RunControl()
    recorder = _Recorder(client, writer, progress, tally, stage)

    async def feed() -> AsyncIterator[Job]:
        # Runs where the client takes its next job: reads, validates, inlines images; no writes.
        for item in job_lines:
            if control.draining:
                return
            if isinstance(item, BadLine):
                recorder.defer_bad(item)
                continue
            planned = (item.job, None) if plan_line is None else plan_line(item)
            if planned is not None:
                recorder.sending(item, planned[1])
                yield planned[0]

    async with job_results(client, feed()) as results:
        control.attach(results.drain)
        try:
            async for result in results:
                recorder.flush_bad()
                await recorder.record(result)
        finally:
            control.detach(results.drain)
        tally.stopped_by = results.stopped_by
    recorder.flush_bad()
    return tally


def stage_for(
    downloader: ImageDownloader, writer: ResultWriter, progress: JobProgress, tally: RunTally
) -> DownloadStage:
    """A download stage whose final lines are counted in ``tally`` and ``progress``."""

    def finish(final: dict[str, object], repair: bool) -> None:
        writer.write(final)
        ok = bool(final["ok"])
        files = final.get("files")
        images = len(files) if isinstance(files, list) and not repair else 0
        tally.ok += ok
        tally.failed += not ok
        tally.images += images
        tally.download_failures += final.get("download_error") is not None
        tally.repaired += ok and repair
        progress.job_finished(ok=ok, images=images)

    return DownloadStage(downloader, writer, finish=finish)
