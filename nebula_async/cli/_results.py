"""The CLI's results file: one JSON line per finished job, appended, resumable.

Record shape (keys always present, in this order)::

    {"id": "7", "line": 7, "ok": true, "urls": ["https://..."], "error": null,
     "attempts": 1, "submissions": 1, "elapsed_s": 0.412}

A failed job's ``error`` is ``{"type", "message", "status_code", "code", "field"}``
(the last three null when they do not apply). With ``--download`` three more keys:
``"files"`` (one path per generated image, in order; null where it is not saved),
``"download_error"`` (null or ``"image 2: HTTP 404; ..."``) and
``"pending_downloads"``: the images of a generated job still to be saved, each
``{"image": k, "url": ..., "error": ...}`` (``"b64_json"`` instead of ``"url"`` for
an inline image). A job with pending downloads is not ok (its ``error`` has type
``"DownloadError"``), and a rerun saves them from what the line records instead
of sending the job again. With ``--download`` a generated job with URL images
gets such a line as soon as it is generated, then its final line once the images
are fetched, so a crash or Ctrl-C in between never loses a generation.

Resuming reads the file back (:func:`load_resume_state`): a job with an ok line
is done; for others the latest line wins, and a latest line with pending downloads
makes the job one to repair (:attr:`ResumeState.repair`), not one to send again.
A failed job whose latest line keeps the URLs of its successful submissions is
sent again only for the images it lacks (:attr:`ResumeState.partial`); its new
line lists the old URLs first and says how many it carried over
(``"resumed_urls"``).
A torn last line left by a crash is cut off before anything is appended. Each
record goes out in one ``write`` call on an unbuffered append-only file, so a
killed process leaves at most one torn line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Self

import orjson

from nebula_async._exceptions import APIStatusError, ValidationError
from nebula_async._models import GeneratedImage, JobResult

from ._download import describe_failures
from ._jobfile import BadLine

__all__ = [
    "DOWNLOAD_ERROR_TYPE",
    "PENDING_DOWNLOADS",
    "ResultWriter",
    "ResultsFileBusy",
    "ResultsFileError",
    "ResultsWriteError",
    "ResumeState",
    "bad_line_record",
    "download_error_record",
    "download_record",
    "error_record",
    "job_result_record",
    "load_resume_state",
    "parse_pending_downloads",
    "read_record_at",
    "recorded_urls",
]

DOWNLOAD_ERROR_TYPE: Final = "DownloadError"
"""The ``error.type`` of a job generated but with images not saved yet."""
PENDING_DOWNLOADS: Final = "pending_downloads"


class ResultsFileError(Exception):
    """An existing results file cannot be resumed from (names the line)."""

    def __init__(self, path: Path, line_no: int, problem: str) -> None:
        super().__init__(f"{path}: line {line_no}: {problem}")
        self.line_no = line_no


@dataclass(slots=True)
class ResumeState:
    """What an existing results file says.

    ``ok_ids``: jobs with at least one ok line (never sent again, so no job gets
    two ok lines). ``failed_ids``: jobs whose lines are all failures. ``repair``:
    those of them whose latest line has pending downloads (generated, never to be
    sent again), each with the byte offset of that line (:func:`read_record_at`).
    ``partial``: the other failed jobs whose latest line holds URLs (submissions
    that succeeded), each with the byte offset of that line, so that a rerun asks
    only for the images missing (the line is read when the job is sent).
    ``keep_bytes``:
    the length to truncate the file to before appending (cuts a torn last line);
    ``needs_newline``: the last line is a complete record missing its newline.
    """

    ok_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)
    repair: dict[str, int] = field(default_factory=dict)
    partial: dict[str, int] = field(default_factory=dict)
    records: int = 0
    keep_bytes: int = 0
    needs_newline: bool = False
    torn_line_no: int | None = None


def parse_pending_downloads(value: object) -> dict[int, GeneratedImage] | None:
    """The images a ``pending_downloads`` list asks for, by position k (None if malformed)."""
    if not isinstance(value, list):
        return None
    images: dict[int, GeneratedImage] = {}
    for entry in value:
        if not isinstance(entry, dict):
            return None
        k, url, b64_json = entry.get("image"), entry.get("url"), entry.get("b64_json")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k in images:
            return None
        if isinstance(url, str) and b64_json is None:
            images[k] = GeneratedImage(url=url)
        elif isinstance(b64_json, str) and url is None:
            images[k] = GeneratedImage(b64_json=b64_json)
        else:
            return None
    return images


def recorded_urls(record: Mapping[str, Any]) -> list[str]:
    """A record's ``urls`` (empty unless it is a list of strings)."""
    urls = record.get("urls")
    if isinstance(urls, list) and all(isinstance(url, str) for url in urls):
        return urls
    return []


def _parse_line(raw: bytes) -> tuple[str, bool, bool, bool] | None:
    """``(id, ok, has pending downloads, has urls)`` of a results line, or None if it
    is not one."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    job_id, ok = record.get("id"), record.get("ok")
    if not isinstance(job_id, str) or not isinstance(ok, bool):
        return None
    has_urls = bool(recorded_urls(record))
    pending = record.get(PENDING_DOWNLOADS)
    if pending is None:
        return job_id, ok, False, has_urls
    if parse_pending_downloads(pending) is None:
        return None
    return job_id, ok, bool(pending) and not ok, has_urls


def load_resume_state(path: str | os.PathLike[str]) -> ResumeState:
    """Stream an existing results file into a :class:`ResumeState` (empty if absent).

    A last line that is not a complete record (no newline and not valid JSON, or
    not valid JSON at all) is treated as torn by a crash and marked to be cut.
    An unreadable line anywhere else raises :class:`ResultsFileError`.
    """
    results_path = Path(path)
    state = ResumeState()
    if not results_path.exists():
        return state
    offset = 0
    pending_error: tuple[int, str] | None = None
    with results_path.open("rb") as file:
        for line_no, raw in enumerate(file, start=1):
            if pending_error is not None:  # a bad line that turned out not to be the last
                raise ResultsFileError(results_path, *pending_error)
            line_start, offset = offset, offset + len(raw)
            if not raw.strip():
                state.keep_bytes = offset
                continue
            parsed = _parse_line(raw)
            if parsed is None:
                # Tolerated only as the very last line: remember it, cut it if nothing follows.
                pending_error = (
                    line_no,
                    "not a results record (expected JSON with 'id' and 'ok', "
                    "and a valid 'pending_downloads' if any)",
                )
                state.keep_bytes = line_start
                state.needs_newline = False
                state.torn_line_no = line_no
                continue
            job_id, ok, to_repair, has_urls = parsed
            state.records += 1
            if ok:
                state.ok_ids.add(job_id)
                state.failed_ids.discard(job_id)
                state.repair.pop(job_id, None)
                state.partial.pop(job_id, None)
            elif job_id not in state.ok_ids:
                state.failed_ids.add(job_id)
                # The latest line decides: pending downloads, or a job to send again
                # (only for the images it lacks when the line keeps some URLs).
                state.repair.pop(job_id, None)
                state.partial.pop(job_id, None)
                if to_repair:
                    state.repair[job_id] = line_start
                elif has_urls:
                    state.partial[job_id] = line_start
            state.keep_bytes = offset
            state.needs_newline = not raw.endswith(b"\n")
    return state


def read_record_at(path: str | os.PathLike[str], offset: int) -> dict[str, Any]:
    """The record on the line starting at byte ``offset`` (from :attr:`ResumeState.repair`
    or :attr:`ResumeState.partial`)."""
    with Path(path).open("rb") as file:
        file.seek(offset)
        record = orjson.loads(file.readline())
    if not isinstance(record, dict):
        raise ValueError(f"{path}: no results record at byte {offset}")
    return record


def error_record(error: BaseException | None) -> dict[str, Any] | None:
    """The JSON shape of a job's error: type, message, status_code, code, field."""
    if error is None:
        return None
    return {
        "type": type(error).__name__,
        "message": str(error),
        "status_code": error.status_code if isinstance(error, APIStatusError) else None,
        "code": error.code if isinstance(error, APIStatusError) else None,
        "field": error.field if isinstance(error, ValidationError) else None,
    }


def job_result_record(result: JobResult, *, line_no: int | None) -> dict[str, Any]:
    """The results line of a finished job."""
    return {
        "id": result.job_id,
        "line": line_no,
        "ok": result.ok,
        "urls": list(result.urls),
        "error": error_record(result.error),
        "attempts": result.attempts,
        "submissions": result.submissions,
        "elapsed_s": round(result.elapsed_s, 3),
    }


def download_error_record(message: str) -> dict[str, Any]:
    """The ``error`` of a generated job whose images are not all saved."""
    return {
        "type": DOWNLOAD_ERROR_TYPE,
        "message": message,
        "status_code": None,
        "code": None,
        "field": None,
    }


def _pending_entry(k: int, image: GeneratedImage, reason: str) -> dict[str, Any]:
    source = {"url": image.url} if image.url is not None else {"b64_json": image.b64_json}
    return {"image": k, **source, "error": reason}


def download_record(
    record: Mapping[str, Any],
    *,
    generated: bool,
    files: list[str | None],
    failures: Mapping[int, str],
    images: Mapping[int, GeneratedImage],
    message: str | None = None,
) -> dict[str, Any]:
    """``record`` plus the ``--download`` keys: files, download_error, pending_downloads.

    ``failures`` gives the reason for each image k not saved, ``images`` its source.
    For a ``generated`` job (every submission succeeded) an image not saved makes
    the line not ok, with a ``DownloadError`` (``message``, or one listing the
    failures), and is listed in ``pending_downloads`` for a rerun to save. A job
    whose generation failed keeps its own error and lists nothing: it is sent again.
    """
    summary = describe_failures(failures)
    result = {**record, "files": files, "download_error": summary, PENDING_DOWNLOADS: []}
    if generated:
        result["ok"] = not failures
        result["error"] = None
        if failures:
            result["error"] = download_error_record(
                message or f"{len(failures)} of {len(files)} images not saved: {summary}"
            )
            result[PENDING_DOWNLOADS] = [
                _pending_entry(k, images[k], failures[k]) for k in sorted(failures)
            ]
    return result


def bad_line_record(bad: BadLine) -> dict[str, Any]:
    """The results line of an input line that could not be sent (``--skip-invalid``)."""
    return {
        "id": bad.job_id,
        "line": bad.line_no,
        "ok": False,
        "urls": [],
        "error": {
            "type": "ValidationError",
            "message": bad.describe(),
            "status_code": None,
            "code": None,
            "field": bad.field,
        },
        "attempts": 0,
        "submissions": 0,
        "elapsed_s": 0.0,
    }


class ResultsWriteError(Exception):
    """A record could not be appended to the results file (disk full, I/O error).

    ``record`` holds the line that was not written, so that it can be shown
    rather than lost.
    """

    def __init__(self, path: Path, record: bytes, cause: OSError) -> None:
        super().__init__(f"cannot write to {path}: {cause.strerror or cause}")
        self.path = path
        self.record = record


class ResultsFileBusy(ResultsFileError):
    """Another process holds the results file (two runs must not append to one file)."""

    def __init__(self, path: Path) -> None:
        Exception.__init__(self, f"{path} is in use by another nebula-async run")
        self.line_no = 0


def _lock_exclusively(file: BinaryIO, path: Path) -> None:
    # An advisory lock, held while the file is open: a second run on the same --out
    # would otherwise send the same jobs again and write a second ok line for them.
    if sys.platform == "win32":  # pragma: no cover - no fcntl; Windows runs unlocked
        return
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ResultsFileBusy(path) from None


class ResultWriter:
    """Appends records to the results file, one unbuffered ``write`` per line.

    Opening locks the file against other runs, then reads it again under the lock
    (``resume=True``; :attr:`state`) and cuts a torn last line, or empties it
    (``resume=False``). The file then only ever holds whole records followed by at
    most one torn line.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = True) -> None:
        self.path = Path(path)
        self.state = ResumeState()
        self._resume = resume
        self._file: BinaryIO | None = None

    def open(self) -> ResumeState:
        """Create or open the file for appending, lock it, repair its tail.

        Returns the :class:`ResumeState` read under the lock. Raises
        :class:`ResultsFileBusy` if another run holds it, :class:`ResultsFileError`
        if it cannot be resumed from.
        """
        file = self.path.open("ab", buffering=0)
        try:
            _lock_exclusively(file, self.path)
            if self._resume:
                self.state = load_resume_state(self.path)
            if os.fstat(file.fileno()).st_size > self.state.keep_bytes:
                os.truncate(file.fileno(), self.state.keep_bytes)
        except BaseException:
            file.close()
            raise
        self._file = file
        if self.state.needs_newline:
            self._write_all(b"\n")
        return self.state

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line, durable against a crash of this process.

        Raises :class:`ResultsWriteError` (with the line) when the file refuses it;
        a part written before the failure is a torn last line, cut by the next run.
        """
        line = orjson.dumps(record) + b"\n"
        try:
            self._write_all(line)
        except OSError as exc:
            raise ResultsWriteError(self.path, line, exc) from exc

    def _write_all(self, data: bytes) -> None:
        if self._file is None:
            raise RuntimeError("ResultWriter is not open")
        view = memoryview(data)
        while view:
            # A regular file takes it all at once; the loop covers a short write.
            view = view[self._file.write(view) :]

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        if self._file is None:
            self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
