"""The CLI's results file: one JSON line per job, appended, resumable.

Record shape (keys always present, in this order)::

    {"id": "7", "line": 7, "ok": true, "urls": ["https://..."], "error": null,
     "attempts": 1, "submissions": 1, "elapsed_s": 0.412, "fingerprint": "3f2a..."}

``fingerprint`` is :func:`nebula_async._jobs.job_fingerprint` of the job the line
answers (null for a bad input line). A failed job's ``error`` is ``{"type",
"message", "status_code", "code", "field"}`` (the last three null when they do not
apply). With ``--download`` four more keys: ``"files"`` (one path per generated
image, in order; null where it is not saved), ``"download_error"`` (null or
``"image 2: HTTP 404; ..."``), ``"pending_downloads"``: the images of a generated
job still to be saved, each ``{"image": k, "url": ..., "error": ...}``
(``"b64_json"`` instead of ``"url"`` for an inline image), and ``"pending"``: true
on the line written as soon as a job is generated, before its images are fetched
(not ok, no error: it is waiting, not failed). A final line whose images did not
all download is not ok (its ``error`` has type ``"DownloadError"``). Either way a
rerun saves the pending images from what the line records instead of sending the
job again.

Resuming reads the file back (:func:`load_resume_state`) into the current line of
each id (:class:`Recorded`): the latest line, except that a failed line never
hides an ok line of the same job (same fingerprint). Which recorded line a job of
the jobs file may reuse is decided by the runner (id and fingerprint must match).
A torn last line left by a crash is cut off before anything is appended. Each
record goes out in one ``write`` call on an unbuffered append-only file, so a
killed process leaves at most one torn line.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Self

import orjson

from nebula_async._jobs import error_record
from nebula_async._models import GeneratedImage, JobResult

from ._download import describe_failures
from ._jobfile import BadLine

__all__ = [
    "DOWNLOAD_ERROR_TYPE",
    "Kind",
    "PENDING_DOWNLOADS",
    "Recorded",
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
    "pending_record",
    "read_record_at",
    "recorded_files",
    "recorded_urls",
]

DOWNLOAD_ERROR_TYPE: Final = "DownloadError"
"""The ``error.type`` of a job generated but with images not saved yet."""
PENDING_DOWNLOADS: Final = "pending_downloads"
_NOT_DOWNLOADED_YET: Final = "not downloaded yet"


class ResultsFileError(Exception):
    """An existing results file cannot be resumed from (names the line)."""

    def __init__(self, path: Path, line_no: int, problem: str) -> None:
        super().__init__(f"{path}: line {line_no}: {problem}")
        self.line_no = line_no


class Kind(enum.Enum):
    """What a job's current results line says about it."""

    OK = "ok"  #: done (with ``--download``: only if ``downloaded``)
    REPAIR = "repair"  #: generated, images pending: fetch them, never send again
    PARTIAL = "partial"  #: failed, some images got: send only for the missing ones
    FAILED = "failed"  #: failed with nothing kept: send again


@dataclass(frozen=True, slots=True)
class Recorded:
    """The current results line of one id.

    ``fingerprint`` is None on a line written before fingerprints existed;
    ``offset`` and ``results_line`` locate the line (:func:`read_record_at`);
    ``default_id``: its id was its input line number (so it may have moved, when
    a job is inserted above it); ``downloaded``: it has ``files`` (a ``--download``
    run wrote it).
    """

    fingerprint: str | None
    kind: Kind
    offset: int
    results_line: int
    default_id: bool
    downloaded: bool


@dataclass(slots=True)
class ResumeState:
    """What an existing results file says: the current line of each id.

    ``keep_bytes``: the length to truncate the file to before appending (cuts a
    torn last line); ``needs_newline``: the last line is a complete record missing
    its newline.
    """

    entries: dict[str, Recorded] = field(default_factory=dict)
    records: int = 0
    keep_bytes: int = 0
    needs_newline: bool = False
    torn_line_no: int | None = None

    @property
    def unfingerprinted(self) -> int:
        """Ids whose current line has no fingerprint (an older results file)."""
        return sum(1 for entry in self.entries.values() if entry.fingerprint is None)

    def note(self, job_id: str, entry: Recorded) -> None:
        """Make ``entry`` the current line of ``job_id``, unless it is a failure of
        the same job as a recorded ok line (no job is ever generated twice)."""
        previous = self.entries.get(job_id)
        if (
            previous is not None
            and previous.kind is Kind.OK
            and entry.kind in (Kind.FAILED, Kind.PARTIAL)
            and previous.fingerprint == entry.fingerprint
        ):
            return
        self.entries[job_id] = entry


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


def recorded_files(record: Mapping[str, Any], length: int = 0) -> list[str | None]:
    """A record's ``files`` (None for an entry that is not a path), padded to ``length``."""
    raw = record.get("files")
    files: list[str | None] = (
        [item if isinstance(item, str) else None for item in raw] if isinstance(raw, list) else []
    )
    return files + [None] * (length - len(files))


def _kind_of(record: Mapping[str, Any], ok: bool) -> Kind | None:
    """The :class:`Kind` of a parsed line, or None when its ``pending_downloads`` is bad."""
    pending = record.get(PENDING_DOWNLOADS)
    if pending is not None and parse_pending_downloads(pending) is None:
        return None
    if ok:
        return Kind.OK
    if pending:
        return Kind.REPAIR
    if recorded_urls(record) or any(recorded_files(record)):
        return Kind.PARTIAL
    return Kind.FAILED


def _parse_line(raw: bytes, offset: int, line_no: int) -> tuple[str, Recorded] | None:
    """The id and :class:`Recorded` of a results line, or None if it is not one."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    job_id, ok, fingerprint = record.get("id"), record.get("ok"), record.get("fingerprint")
    if not isinstance(job_id, str) or not isinstance(ok, bool):
        return None
    if fingerprint is not None and not isinstance(fingerprint, str):
        return None
    kind = _kind_of(record, ok)
    if kind is None:
        return None
    line = record.get("line")
    entry = Recorded(
        fingerprint=fingerprint,
        kind=kind,
        offset=offset,
        results_line=line_no,
        default_id=isinstance(line, int) and str(line) == job_id,
        downloaded="files" in record,
    )
    return job_id, entry


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
            parsed = _parse_line(raw, line_start, line_no)
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
            state.records += 1
            state.note(*parsed)
            state.keep_bytes = offset
            state.needs_newline = not raw.endswith(b"\n")
    return state


def read_record_at(path: str | os.PathLike[str], offset: int) -> dict[str, Any]:
    """The record on the line starting at byte ``offset`` (:attr:`Recorded.offset`, or
    what :meth:`ResultWriter.write` returned)."""
    with Path(path).open("rb") as file:
        file.seek(offset)
        record = orjson.loads(file.readline())
    if not isinstance(record, dict):
        raise ValueError(f"{path}: no results record at byte {offset}")
    return record


def job_result_record(
    result: JobResult, *, line_no: int | None, fingerprint: str | None = None
) -> dict[str, Any]:
    """The results line of a finished job (``fingerprint``: of the job as its input
    line describes it)."""
    return {
        "id": result.job_id,
        "line": line_no,
        "ok": result.ok,
        "urls": list(result.urls),
        "error": error_record(result.error),
        "attempts": result.attempts,
        "submissions": result.submissions,
        "elapsed_s": round(result.elapsed_s, 3),
        "fingerprint": fingerprint,
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
    result = {
        **record,
        "files": files,
        "download_error": summary,
        PENDING_DOWNLOADS: [],
        "pending": False,
    }
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


def pending_record(
    record: Mapping[str, Any],
    *,
    files: list[str | None],
    pending: Mapping[int, GeneratedImage],
    failures: Mapping[int, str],
) -> dict[str, Any]:
    """The line of a generated job written before its images are fetched: not ok,
    no error (it is waiting, not failed), every image not saved yet listed in
    ``pending_downloads`` (with ``failures[k]`` as its reason when an inline image
    could not be written), ``"pending": true``. Its final line follows."""
    entries = [
        _pending_entry(k, pending[k], failures.get(k, _NOT_DOWNLOADED_YET)) for k in sorted(pending)
    ]
    return {
        **record,
        "ok": False,
        "error": None,
        "files": files,
        "download_error": None,
        PENDING_DOWNLOADS: entries,
        "pending": True,
    }


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
        "fingerprint": None,
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
        self._size = 0  # the file's length: where the next line starts

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
            self._size = os.fstat(file.fileno()).st_size
        except BaseException:
            file.close()
            raise
        self._file = file
        if self.state.needs_newline:
            self._write_all(b"\n")
        return self.state

    def write(self, record: Mapping[str, Any]) -> int:
        """Append one record as a JSON line, durable against a crash of this process;
        returns the byte offset where the line starts (for :func:`read_record_at`).

        Raises :class:`ResultsWriteError` (with the line) when the file refuses it;
        a part written before the failure is a torn last line, cut by the next run.
        """
        line = orjson.dumps(record) + b"\n"
        offset = self._size
        try:
            self._write_all(line)
        except OSError as exc:
            raise ResultsWriteError(self.path, line, exc) from exc
        return offset

    def _write_all(self, data: bytes) -> None:
        if self._file is None:
            raise RuntimeError("ResultWriter is not open")
        view = memoryview(data)
        while view:
            # A regular file takes it all at once; the loop covers a short write.
            written = self._file.write(view)
            self._size += written
            view = view[written:]

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
