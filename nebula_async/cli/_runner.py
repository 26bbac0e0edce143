"""``nebula-async run``: check a jobs file, then run it into a resumable results file.

The order of work, so that bad input never costs a request and a crash never
costs a finished job:

1. read the existing results file, if any (:mod:`._results`);
2. check every line of the jobs file in one streaming pass and match each job
   to what is recorded by id and fingerprint (:mod:`._plan`); nothing is sent
   when a line is bad (unless ``--skip-invalid`` records it as a failed job) or
   when the results file was written from another jobs file;
3. under the results file's lock, record the moved default-id jobs under their
   new ids, then run (:mod:`._execute`): the remaining jobs through the client,
   one line per answer as it arrives, and with ``--download`` the images of
   every generated job (recorded ones included) in a stage of their own.

A first SIGINT or SIGTERM drains the run (no new submissions; the answers of
those in flight are written) and exits 130 or 143; a second one stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import orjson

from nebula_async._client import NebulaClient
from nebula_async._exceptions import ValidationError
from nebula_async._models import Job, RateLimit, RetryPolicy
from nebula_async._shared import SharedRateLimit

from ._download import ImageDownloader, api_is_loopback
from ._execute import (
    DownloadStage,
    DownloadTask,
    Resumed,
    RunControl,
    RunTally,
    execute_jobs,
    resumed_from,
    stage_for,
)
from ._jobfile import BadLine, JobLine, Shard, iter_job_lines
from ._plan import Action, Plan, decide, plan_jobs
from ._progress import JobProgress
from ._results import (
    Kind,
    ResultsFileError,
    ResultsWriteError,
    ResultWriter,
    ResumeState,
    bad_line_record,
    load_resume_state,
    read_record_at,
)
from ._summary import RunSummary, count, table, write_summary_json

__all__ = [
    "ClientSettings",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_TERMINATED",
    "EXIT_WRITE_FAILED",
    "Resumed",
    "RunOptions",
    "RunTally",
    "cli_message",
    "err",
    "execute_jobs",
    "prepare_download_dir",
    "run_command",
    "write_error_in",
]

EXIT_OK: Final = 0
EXIT_SOME_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_WRITE_FAILED: Final = 3
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT
EXIT_TERMINATED: Final = 143  # 128 + SIGTERM

# Bad lines shown on stderr before "... and N more" (all of them are counted).
_BAD_LINES_SHOWN: Final = 20
# A drain waits for the submissions in flight, each bounded by the attempt
# timeout; past it (plus this), the run stops as on a second signal.
_DRAIN_GRACE_S: Final = 5.0
_DRAIN_WITHOUT_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """The client knobs the CLI exposes; ``retries`` counts repeats after the first try."""

    concurrency: int = 16
    rate: float | None = None
    retries: int = 3
    timeout: float | None = 120.0
    payload_style: str = "dotted"
    base_url: str | None = None
    burst: int = 1
    adaptive: bool = True
    retry_ambiguous: bool = True
    trust_env: bool = False
    allow_insecure_http: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    redis_url: str | None = None
    limit_key: str | None = None

    def rate_limit(self) -> RateLimit | SharedRateLimit | None:
        """``--rate`` as a limit of this process, or shared through ``--redis``."""
        if self.redis_url is not None:
            if self.rate is None or self.limit_key is None:
                raise ValidationError("--redis needs --rate and --limit-key", field="redis")
            return SharedRateLimit(
                self.redis_url,
                key=self.limit_key,
                per_second=self.rate,
                burst=self.burst,
                adaptive=self.adaptive,
            )
        if self.rate is None:
            return None
        return RateLimit(self.rate, burst=self.burst, adaptive=self.adaptive)

    def make_client(self, *, token: str | None = None) -> NebulaClient:
        """A client with these settings (credentials from the environment unless ``token``).

        Raises :class:`ValidationError` when no credentials are set.
        """
        return NebulaClient(
            token=token,
            base_url=self.base_url,
            max_concurrency=self.concurrency,
            rate_limit=self.rate_limit(),
            retry=RetryPolicy(max_attempts=self.retries + 1, retry_ambiguous=self.retry_ambiguous),
            timeout=self.timeout,
            payload_style=self.payload_style,
            trust_env=self.trust_env,
            default_headers=dict(self.headers),
            allow_insecure_http=self.allow_insecure_http,
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
    replace_mismatched: bool = False
    shard: Shard | None = None
    #: where relative local ``image`` paths resolve (default: the jobs file's directory)
    jobs_base_dir: Path | None = None
    #: the jobs file's name in messages (``<stdin>`` for ``run -``; default: its path)
    jobs_label: str | None = None
    summary_json: Path | None = None  #: ``--summary-json``: the summary figures as JSON

    @property
    def jobs_name(self) -> str:
        """The jobs file as messages name it."""
        return self.jobs_label if self.jobs_label is not None else str(self.jobs_path)


def err(message: str) -> None:
    """Print ``message`` to stderr as the command's own complaint."""
    print(f"nebula-async: {message}", file=sys.stderr)


class _Stop(Exception):
    """Ends ``run`` early with an exit code (the message is already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# -- step 1 and 2: read, check, match ------------------------------------------------------


def _check_paths(options: RunOptions) -> None:
    if options.jobs_path.is_dir():
        err(f"the jobs file is a directory: {options.jobs_name} (give a file, or - for stdin)")
        raise _Stop(EXIT_BAD_INPUT)
    if not options.jobs_path.is_file():
        err(f"jobs file not found: {options.jobs_name}")
        raise _Stop(EXIT_BAD_INPUT)
    if options.out_path.is_dir():
        err(f"--out is a directory: {options.out_path} (give a file path)")
        raise _Stop(EXIT_BAD_INPUT)
    if not options.out_path.parent.is_dir():
        err(f"the directory of --out does not exist: {options.out_path.parent}")
        raise _Stop(EXIT_BAD_INPUT)


def _read_results(options: RunOptions) -> ResumeState:
    """A first look at the results file, unlocked (the writer reads it again under its lock)."""
    try:
        return load_resume_state(options.out_path)
    except ResultsFileError as exc:
        err(f"cannot resume from {exc}; fix or move that file")
    except OSError as exc:
        err(f"cannot read the results file {options.out_path}: {exc.strerror or exc}")
    raise _Stop(EXIT_BAD_INPUT)


def _job_lines(options: RunOptions, **reading: object) -> Iterable[JobLine | BadLine]:
    return iter_job_lines(
        options.jobs_path,
        allow_b64_json=options.download_dir is not None,
        shard=options.shard,
        base_dir=options.jobs_base_dir,
        **reading,  # type: ignore[arg-type]
    )


def _plan(options: RunOptions, state: ResumeState) -> Plan:
    lines = _job_lines(options, load_images=False)
    with closing(lines):  # type: ignore[type-var]
        return plan_jobs(lines, state, download=options.download_dir is not None)


def _report_bad_lines(options: RunOptions, bad: list[BadLine]) -> None:
    for item in bad[:_BAD_LINES_SHOWN]:
        err(f"{options.jobs_name}: {item.describe()}")
    if len(bad) > _BAD_LINES_SHOWN:
        err(f"... and {count(len(bad) - _BAD_LINES_SHOWN, 'more bad line')}")


def _refuse_or_warn(options: RunOptions, plan: Plan) -> None:
    """Stop before anything is sent on bad lines or a results file of other jobs."""
    if plan.bad:
        _report_bad_lines(options, plan.bad)
        if not options.skip_invalid:
            err(
                f"{count(len(plan.bad), 'bad line')}; nothing was sent "
                "(use --skip-invalid to run the rest)"
            )
            raise _Stop(EXIT_BAD_INPUT)
    if plan.refused and not options.replace_mismatched:
        assert plan.mismatch is not None
        mismatch = plan.mismatch
        err(
            f"{options.jobs_name}: line {mismatch.line_no}: id {mismatch.job_id!r} is "
            f"recorded in {options.out_path} (line {mismatch.results_line}) for a different "
            "job, and no job of this file matches a recorded one: that results file looks "
            "written from another jobs file; nothing was sent. Use another --out, or pass "
            "--replace-mismatched to generate such jobs again (their new lines supersede "
            "the old ones)"
        )
        raise _Stop(EXIT_BAD_INPUT)
    if plan.unfingerprinted:
        err(
            f"{count(plan.unfingerprinted, 'job')} matched to results lines without a fingerprint "
            "(written by an older nebula-async) by id alone: an edited job among them is "
            "not detected"
        )
    if options.download_dir is not None:
        problem = prepare_download_dir(options.download_dir)
        if problem is not None:
            err(f"{problem}; nothing was sent")
            raise _Stop(EXIT_BAD_INPUT)


def _make_client(options: RunOptions, plan: Plan) -> NebulaClient | None:
    if not plan.to_send:
        return None
    try:
        return options.client.make_client()
    except ValidationError as exc:
        err(cli_message(exc))
        raise _Stop(EXIT_BAD_INPUT) from None


def cli_message(exc: ValidationError) -> str:
    """A client-construction error in the command line's words (no ``token=``: the
    CLI takes credentials from the environment only)."""
    if exc.field == "token":
        return "no credentials: set NEBULA_TOKEN (or NEBULA_USERNAME and NEBULA_PASSWORD)"
    if exc.field in ("username", "password"):
        missing = exc.field.upper()
        given = "USERNAME" if missing == "PASSWORD" else "PASSWORD"
        return f"NEBULA_{given} is set but NEBULA_{missing} is not: set both (or NEBULA_TOKEN)"
    return str(exc)


def _open_results(
    options: RunOptions, plan: Plan, preview: ResumeState
) -> tuple[ResultWriter, ResumeState, Plan]:
    """Lock and open the results file; match again if it changed since the first look."""
    writer = ResultWriter(options.out_path)
    try:
        state = writer.open()
    except (ResultsFileError, OSError) as exc:
        err(f"cannot write results: {exc}")
        raise _Stop(EXIT_BAD_INPUT) from None
    if (state.keep_bytes, state.records) != (preview.keep_bytes, preview.records):
        plan = _plan(options, state)  # another run wrote to it meanwhile
    return writer, state, plan


# -- step 3: record moves and bad lines, then run -------------------------------------------


def _record_moves(plan: Plan, state: ResumeState, writer: ResultWriter) -> None:
    """Record each moved default-id job's line again under its new id (nothing is
    sent for it), so that from now on it matches exactly."""
    # Sources first: a moved job's new id is often another move's source (ids shift).
    sources = [state.entries[move.source] for move in plan.moves]
    for move, source in zip(plan.moves, sources, strict=True):
        record = read_record_at(writer.path, source.offset)
        record.update(id=move.job_id, line=move.line_no, moved_from=move.source)
        offset = writer.write(record)
        state.entries[move.job_id] = replace(source, offset=offset, default_id=True)


def _record_bad_lines(plan: Plan, state: ResumeState, writer: ResultWriter) -> None:
    # A bad line never overrides a job already ok or generated (e.g. a duplicate).
    for bad in plan.bad:
        entry = state.entries.get(bad.job_id)
        if entry is None or entry.kind not in (Kind.OK, Kind.REPAIR):
            writer.write(bad_line_record(bad))


def _fetch_tasks(plan: Plan, state: ResumeState) -> list[DownloadTask]:
    return [
        DownloadTask(job_id, line_no, state.entries[job_id].offset, generated=True, repair=True)
        for job_id, line_no in plan.fetches
    ]


def _line_planner(
    options: RunOptions, state: ResumeState
) -> Callable[[JobLine], tuple[Job, Resumed | None] | None]:
    download = options.download_dir is not None

    def plan_line(item: JobLine) -> tuple[Job, Resumed | None] | None:
        entry = state.entries.get(item.job_id)
        action = decide(entry, item.fingerprint, download=download)
        if action is Action.SEND:
            return item.job, None
        if action is not Action.RESUME:
            return None
        assert entry is not None
        # Read only now, so memory holds the URLs of the jobs in flight, not of all.
        record = read_record_at(options.out_path, entry.offset)
        resumed = resumed_from(record, item.job.total_images, options.download_dir)
        return (item.job, None) if resumed is None else (resumed.apply_to(item.job), resumed)

    return plan_line


async def _send(
    options: RunOptions,
    plan: Plan,
    state: ResumeState,
    client: NebulaClient,
    writer: ResultWriter,
    progress: JobProgress,
    run: _Run,
) -> None:
    """The sending pass: every good line whose job is not done or generated yet."""
    lines = _job_lines(
        options,
        load_images=True,
        skip_lines={bad.line_no for bad in plan.bad},
        check_duplicates=False,
    )
    # closing(): the jobs file is closed at once even when the run stops early.
    with closing(lines):  # type: ignore[type-var]
        async with client:
            await execute_jobs(
                client,
                lines,
                writer=writer,
                progress=progress,
                tally=run.tally,
                control=run.control,
                stage=run.stage,
                plan_line=_line_planner(options, state),
            )


@dataclass(slots=True)
class _Run:
    tally: RunTally
    control: RunControl
    client: NebulaClient | None = None
    stage: DownloadStage | None = None
    started: float = field(default_factory=time.perf_counter)


async def _work(
    options: RunOptions,
    plan: Plan,
    state: ResumeState,
    client: NebulaClient | None,
    writer: ResultWriter,
    run: _Run,
) -> None:
    """Send the jobs not done; with ``--download``, save images in a stage beside it."""
    fetches = _fetch_tasks(plan, state)
    total = plan.to_send + len(fetches)
    with JobProgress(total, enabled=options.progress) as progress:
        if options.download_dir is None:
            if client is not None:
                await _send(options, plan, state, client, writer, progress, run)
            return
        loopback = api_is_loopback(options.client.base_url)  # the mock server's images
        async with (
            ImageDownloader(options.download_dir, allow_loopback=loopback) as downloader,
            anyio.create_task_group() as tasks,
        ):
            run.stage = stage_for(downloader, writer, progress, run.tally)
            # A drain drops the downloads at once: their lines are pending on disk.
            run.control.attach(run.stage.stop)
            tasks.start_soon(run.stage.run)
            for task in fetches:
                run.stage.submit(task)
            try:
                if client is not None:
                    await _send(options, plan, state, client, writer, progress, run)
            finally:
                run.stage.close()  # the stage ends once the queued downloads are done


# -- signals ----------------------------------------------------------------------------


def _drain_limit(options: RunOptions) -> float:
    timeout = options.client.timeout
    return (_DRAIN_WITHOUT_TIMEOUT_S if timeout is None else timeout) + _DRAIN_GRACE_S


async def _abort_after(delay: float, control: RunControl, scope: anyio.CancelScope) -> None:
    await anyio.sleep(delay)
    err(f"the drain took over {delay:.0f} s; stopping now")
    control.aborted = True
    scope.cancel()


async def _watch_signals(
    control: RunControl, tasks: anyio.abc.TaskGroup, drain_limit: float
) -> None:
    """First SIGINT/SIGTERM: drain (bounded by ``drain_limit``); second: stop at once."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if control.signal is None:
                control.signal = signum
                err(
                    f"{name}: no new submissions; waiting for those in flight (up to "
                    f"{drain_limit:.0f} s) and writing their answers; signal again to stop now"
                )
                control.drain()
                tasks.start_soon(_abort_after, drain_limit, control, tasks.cancel_scope)
            else:
                err(f"{name} again: stopping now")
                control.aborted = True
                tasks.cancel_scope.cancel()
                return


def _signals_available() -> bool:
    # Signal handlers belong to the main thread (tests run main() in worker threads).
    return threading.current_thread() is threading.main_thread() and sys.platform != "win32"


async def _with_signals(
    options: RunOptions, control: RunControl, work: Callable[[], Awaitable[None]]
) -> None:
    async with anyio.create_task_group() as tasks:
        if _signals_available():
            tasks.start_soon(_watch_signals, control, tasks, _drain_limit(options))
        await work()
        tasks.cancel_scope.cancel()  # the watcher


# -- the command ------------------------------------------------------------------------


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


def _summary(options: RunOptions, plan: Plan, run: _Run, code: int) -> RunSummary:
    tally = run.tally
    stats = run.client.statistics() if run.client is not None else None
    p50, p95 = RunSummary.latencies(tally.latencies)
    return RunSummary(
        jobs=plan.good + len(plan.bad),
        ok=plan.done + tally.ok,
        ok_before=plan.done,
        failed=tally.failed + len(plan.bad) + plan.not_downloaded,
        not_attempted=tally.not_attempted,
        pending_downloads=plan.not_downloaded + tally.download_failures,
        images=tally.images,
        attempts=stats.attempts if stats else 0,
        retries=stats.retries if stats else 0,
        rate_limited=stats.rate_limited if stats else 0,
        latency_p50_s=p50,
        latency_p95_s=p95,
        elapsed_s=round(time.perf_counter() - run.started, 3),
        results=str(options.out_path),
        exit_code=code,
    )


def _notes(plan: Plan, tally: RunTally) -> None:
    if tally.repaired:
        err(f"{count(tally.repaired, 'job')} made ok by saving their images (not generated again)")
    if plan.moves:
        err(f"{count(len(plan.moves), 'job')} found under their old line number")


def _exit_code(options: RunOptions, plan: Plan, tally: RunTally, control: RunControl) -> int:
    if control.signal is not None:
        how = "stopped" if control.aborted else "drained"
        err(
            f"interrupted ({signal.Signals(control.signal).name}, {how}): every answer that "
            f"arrived is in {options.out_path}; the jobs not started have no line; rerun "
            "the same command to resume"
        )
        return 128 + control.signal
    if tally.not_attempted:
        cause = tally.stopped_by.cause if tally.stopped_by is not None else None
        why = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        were = "was" if tally.not_attempted == 1 else "were"
        err(
            f"{count(tally.not_attempted, 'job')} {were} not attempted: the client stopped "
            f"starting jobs after repeated failures of one kind{why}; they have no line: fix "
            "the cause and rerun to send them"
        )
        return EXIT_SOME_FAILED
    if plan.not_downloaded:
        were = "was" if plan.not_downloaded == 1 else "were"
        err(
            f"{count(plan.not_downloaded, 'job')} {were} generated but not all images are "
            "saved; they are not sent again: rerun with --download DIR to save them"
        )
    failed = tally.failed + len(plan.bad) + plan.not_downloaded
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _finish(options: RunOptions, plan: Plan, run: _Run) -> int:
    """The exit code, after the notes, the summary table and ``--summary-json``."""
    _notes(plan, run.tally)
    code = _exit_code(options, plan, run.tally, run.control)
    summary = _summary(options, plan, run, code)
    print(table(summary), file=sys.stderr)
    if options.summary_json is not None:
        if str(options.summary_json) == "-":
            sys.stdout.write(orjson.dumps(asdict(summary)).decode() + "\n")
        else:
            problem = write_summary_json(options.summary_json, summary)
            if problem is not None:
                err(problem)
    return code


async def _run_checked(options: RunOptions) -> int:
    _check_paths(options)
    preview = _read_results(options)
    plan = _plan(options, preview)
    _refuse_or_warn(options, plan)
    client = _make_client(options, plan)
    writer, state, plan = _open_results(options, plan, preview)
    if client is None and plan.to_send:  # matched again: another run changed the file
        try:
            client = _make_client(options, plan)
        except _Stop:
            writer.close()
            raise
    run = _Run(RunTally(latencies=[]), RunControl(), client=client)
    try:
        with writer:
            _record_moves(plan, state, writer)
            _record_bad_lines(plan, state, writer)
            if client is not None or plan.fetches:
                await _with_signals(
                    options, run.control, lambda: _work(options, plan, state, client, writer, run)
                )
    except Exception as exc:
        write_error = write_error_in(exc)
        if write_error is None:
            raise
        err(f"{write_error}; the run stopped (rerun to resume once it can be written)")
        err(f"this result was not recorded: {write_error.record.decode(errors='replace')}")
        return EXIT_WRITE_FAILED
    return _finish(options, plan, run)


async def run_command(options: RunOptions) -> int:
    """``nebula-async run``; returns the exit code (0 all ok, 1 some failed, 2 bad input,
    3 the results file could not be written, 130/143 after SIGINT/SIGTERM)."""
    try:
        return await _run_checked(options)
    except _Stop as stop:
        return stop.code
