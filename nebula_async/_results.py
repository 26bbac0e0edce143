"""The CLI's results file: one JSON line per finished job, appended, resumable.

Record shape (keys always present, in this order)::

    {"id": "7", "line": 7, "ok": true, "urls": ["https://..."], "error": null,
     "attempts": 1, "submissions": 1, "elapsed_s": 0.412}

plus ``"files"`` (one path per generated image, in order; null where a download
failed) and ``"download_error"`` (null or a message) with ``--download``. A failed
job's ``error`` is ``{"type", "message", "status_code", "code", "field"}``
(the last three null when they do not apply).

Resuming reads the file back (:func:`load_resume_state`): a job with an ok line
is done; for others the latest line wins. A torn last line left by a crash is cut
off before anything is appended. Each record goes out in one ``write`` call on an
unbuffered append-only file, so a killed process leaves at most one torn line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import orjson

from ._exceptions import APIStatusError, ValidationError
from ._jobfile import BadLine
from ._models import JobResult

__all__ = [
    "ResultWriter",
    "ResultsFileBusy",
    "ResultsFileError",
    "ResumeState",
    "bad_line_record",
    "error_record",
    "job_result_record",
    "load_resume_state",
]


class ResultsFileError(Exception):
    """An existing results file cannot be resumed from (names the line)."""

    def __init__(self, path: Path, line_no: int, problem: str) -> None:
        super().__init__(f"{path}: line {line_no}: {problem}")
        self.line_no = line_no


@dataclass(slots=True)
class ResumeState:
    """What an existing results file says.

    ``ok_ids``: jobs with at least one ok line (never sent again, so no job gets
    two ok lines). ``failed_ids``: jobs whose lines are all failures. ``keep_bytes``:
    the length to truncate the file to before appending (cuts a torn last line);
    ``needs_newline``: the last line is a complete record missing its newline.
    """

    ok_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)
    records: int = 0
    keep_bytes: int = 0
    needs_newline: bool = False
    torn_line_no: int | None = None


def _record_id_and_ok(raw: bytes) -> tuple[str, bool] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    job_id, ok = record.get("id"), record.get("ok")
    if not isinstance(job_id, str) or not isinstance(ok, bool):
        return None
    return job_id, ok


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
            parsed = _record_id_and_ok(raw)
            if parsed is None:
                # Tolerated only as the very last line: remember it, cut it if nothing follows.
                pending_error = (line_no, "not a results record (expected JSON with 'id' and 'ok')")
                state.keep_bytes = line_start
                state.needs_newline = False
                state.torn_line_no = line_no
                continue
            job_id, ok = parsed
            state.records += 1
            if ok:
                state.ok_ids.add(job_id)
                state.failed_ids.discard(job_id)
            elif job_id not in state.ok_ids:
                state.failed_ids.add(job_id)
            state.keep_bytes = offset
            state.needs_newline = not raw.endswith(b"\n")
    return state


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
        """Append one record as a JSON line, durable against a crash of this process."""
        self._write_all(orjson.dumps(record) + b"\n")

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
