"""Reading a JSONL jobs file for the CLI, one streaming pass at a time.

Each non-blank line is a JSON object of request fields (snake_case, camelCase,
dotted or nested, as :func:`nebula_async.from_payload` reads them) plus the job's
``id`` (default: the line number, from 1) and ``images``. The ``image`` field may
name a local file, which is sent as a ``data:image/<format>;base64,`` URI.

The file is read twice and never held in memory: a checking pass
(:func:`iter_job_lines` with ``load_images=False``, which checks and hashes
local images for the fingerprint but does not encode them) finds every bad line
before anything is sent, then a sending pass (``load_images=True``) builds the
jobs lazily for the client. Only the job ids are kept, to refuse duplicates.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from nebula_async._codec import DTO_PREFIX
from nebula_async._exceptions import ValidationError
from nebula_async._jobs import (
    RepeatedIdCheck,
    data_uri_identity,
    explicit_job_id,
    job_fingerprint,
    job_from_mapping,
    shard_of,
)
from nebula_async._models import Job

__all__ = [
    "BadLine",
    "JobLine",
    "LocalImageError",
    "MAX_LOCAL_IMAGE_BYTES",
    "Shard",
    "check_local_image",
    "is_local_image",
    "iter_job_lines",
    "job_from_fields",
    "local_image_data_uri",
    "parse_job_line",
    "sniff_image_mime",
]

MAX_LOCAL_IMAGE_BYTES: Final = 10 * 1024 * 1024
"""Largest local image file the CLI will inline (before base64, which adds a third)."""

# Stands in for a local image during the checking pass, so the rest of the request
# is validated without reading the whole file.
_PLACEHOLDER_IMAGE: Final = "data:image/png;base64,AA=="

_IMAGE_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_SNIFF_BYTES: Final = 16
_DOTTED_IMAGE_KEY: Final = f"{DTO_PREFIX}.image"
_UTF8_BOM: Final = b"\xef\xbb\xbf"


class LocalImageError(ValidationError):
    """A local image file is missing, unreadable, too large or not an image."""

    def __init__(self, message: str) -> None:
        super().__init__(f"image: {message}", field="image")


@dataclass(frozen=True, slots=True)
class JobLine:
    """A good line: its 1-based line number, the job it describes, and the job's
    fingerprint (:func:`nebula_async._jobs.job_fingerprint`; a local image counts as
    the data: URI of its content)."""

    line_no: int
    job: Job
    fingerprint: str

    @classmethod
    def of(cls, line_no: int, job: Job) -> JobLine:
        """The line of a job built in memory (the demo's), its fingerprint computed."""
        return cls(line_no, job, job_fingerprint(job))

    @property
    def job_id(self) -> str:
        """The job's id (always set: the line number when the line gave none)."""
        assert self.job.id is not None  # the reader always assigns one
        return self.job.id


@dataclass(frozen=True, slots=True)
class Shard:
    """``--shard I/N``: the jobs whose id hashes to shard ``index`` of ``count``."""

    index: int
    count: int

    def holds(self, job_id: str) -> bool:
        """Whether the job with this id belongs to this shard."""
        return shard_of(job_id, self.count) == self.index


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that cannot be sent: where, which job id it claims, and why.

    ``field`` names the offending field when one is known (None for bad JSON).
    """

    line_no: int
    job_id: str
    message: str
    field: str | None = None

    def describe(self) -> str:
        """A one-line explanation naming the line number, e.g. for stderr."""
        return f"line {self.line_no}: {self.message}"


def sniff_image_mime(head: bytes) -> str | None:
    """The image MIME type told by a file's first bytes, or None if unknown.

    >>> sniff_image_mime(b"\\x89PNG\\r\\n\\x1a\\n....")
    'image/png'
    >>> sniff_image_mime(b"RIFF\\x00\\x00\\x00\\x00WEBPVP8 ")
    'image/webp'
    >>> sniff_image_mime(b"hello") is None
    True
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _IMAGE_MAGIC:
        if head.startswith(magic):
            return mime
    return None


def is_local_image(value: object) -> bool:
    """True when an ``image`` value names a local file rather than a URL or data: URI."""
    if not isinstance(value, str) or not value.strip():
        return False
    lowered = value.lstrip().lower()
    return not lowered.startswith(("http://", "https://", "data:"))


def _resolve(value: str, base_dir: Path) -> Path:
    if value.lower().startswith("file://"):
        value = value[len("file://") :]
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def check_local_image(path: Path) -> tuple[str, int]:
    """Check a local image without reading it all: returns ``(mime, size)``.

    Raises :class:`LocalImageError` when the file is missing, not a regular file,
    over :data:`MAX_LOCAL_IMAGE_BYTES`, or not a PNG/JPEG/WebP/GIF/BMP/TIFF image.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise LocalImageError(f"local file not found: {path}") from None
    except OSError as exc:
        raise LocalImageError(f"cannot read local file {path}: {exc.strerror}") from None
    if not path.is_file():
        raise LocalImageError(f"not a regular file: {path}")
    if stat.st_size > MAX_LOCAL_IMAGE_BYTES:
        raise LocalImageError(
            f"local file {path} is {stat.st_size / 2**20:.1f} MB, over the "
            f"{MAX_LOCAL_IMAGE_BYTES // 2**20} MB limit"
        )
    try:
        with path.open("rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError as exc:
        raise LocalImageError(f"cannot read local file {path}: {exc.strerror}") from None
    mime = sniff_image_mime(head)
    if mime is None:
        raise LocalImageError(f"{path} is not a PNG, JPEG, WebP, GIF, BMP or TIFF image")
    return mime, stat.st_size


def local_image_data_uri(path: Path) -> str:
    """Read a local image into a ``data:image/<format>;base64,...`` URI (checked first)."""
    check_local_image(path)
    stat = path.stat()
    return _cached_data_uri(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# Many jobs often share one input image: keep the last few encodings (bounded memory,
# keyed by modification time so an edited file is read again).
@functools.lru_cache(maxsize=4)
def _cached_data_uri(path: str, _mtime_ns: int, _size: int) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LocalImageError(f"cannot read local file {path}: {exc.strerror}") from None
    if len(data) > MAX_LOCAL_IMAGE_BYTES:  # grew since it was checked
        raise LocalImageError(
            f"local file {path} is over the {MAX_LOCAL_IMAGE_BYTES // 2**20} MB limit"
        )
    mime = sniff_image_mime(data[:_SNIFF_BYTES])
    if mime is None:
        raise LocalImageError(f"{path} is not a PNG, JPEG, WebP, GIF, BMP or TIFF image")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _file_identity(path: Path) -> str:
    """The fingerprint identity of a local image: that of the data: URI it becomes
    (:func:`nebula_async._jobs.data_uri_identity`), hashed from the file as it streams."""
    mime, _ = check_local_image(path)
    stat = path.stat()
    return _cached_file_identity(str(path.resolve()), stat.st_mtime_ns, stat.st_size, mime)


@functools.lru_cache(maxsize=1024)
def _cached_file_identity(path: str, _mtime_ns: int, _size: int, mime: str) -> str:
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as file:
            for chunk in iter(functools.partial(file.read, 1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise LocalImageError(f"cannot read local file {path}: {exc.strerror}") from None
    return data_uri_identity(mime, digest.hexdigest())


def _replace_local_image(
    fields: Mapping[str, Any], *, base_dir: Path, load_images: bool
) -> tuple[Mapping[str, Any], str | None]:
    """Swap a local-file ``image`` (in any key style) for its data: URI (or a
    placeholder), and give the file's fingerprint identity (None: no local image)."""
    identity: list[str] = []

    def swap(value: str) -> str:
        path = _resolve(value.strip(), base_dir)
        identity.append(_file_identity(path))
        return local_image_data_uri(path) if load_images else _PLACEHOLDER_IMAGE

    # The image key in each style: flat "image", dotted "<prefix>.image", or nested.
    for key in ("image", _DOTTED_IMAGE_KEY):
        if is_local_image(fields.get(key)):
            swapped = {**fields, key: swap(fields[key])}
            return swapped, identity[0]
    nested = fields.get(DTO_PREFIX)
    if isinstance(nested, Mapping) and is_local_image(nested.get("image")):
        swapped = {**fields, DTO_PREFIX: {**nested, "image": swap(nested["image"])}}
        return swapped, identity[0]
    return fields, None


def _build(
    fields: Mapping[str, Any],
    *,
    default_id: str,
    base_dir: Path,
    load_images: bool,
    allow_b64_json: bool,
) -> tuple[Job, str]:
    """The job of one object of fields and its fingerprint; the CLI's part is only
    the local image and the ``b64_json`` check, the rest is the library's builder."""
    fields, image_identity = _replace_local_image(
        fields, base_dir=base_dir, load_images=load_images
    )
    job = job_from_mapping(fields, default_id=default_id)
    if job.request.response_format == "b64_json" and not allow_b64_json:
        raise ValidationError(
            "response_format: b64_json images need --download DIR (they are written as files)",
            field="response_format",
        )
    return job, job_fingerprint(job, image=image_identity)


def job_from_fields(
    fields: Mapping[str, Any],
    *,
    default_id: str,
    base_dir: Path,
    load_images: bool = True,
    allow_b64_json: bool = True,
) -> Job:
    """Build a :class:`Job` from one object of request fields plus ``id`` and ``images``.

    A local-file ``image`` is resolved against ``base_dir`` and inlined (or, with
    ``load_images=False``, only checked). Raises :class:`ValidationError` naming
    the field.
    """
    job, _ = _build(
        fields,
        default_id=default_id,
        base_dir=base_dir,
        load_images=load_images,
        allow_b64_json=allow_b64_json,
    )
    return job


def _unexpected(exc: Exception) -> str:
    # The models promise a ValidationError for any bad value; should another
    # exception slip through, the line is still refused by name, never a traceback.
    return f"cannot be read as a job: {type(exc).__name__}: {exc}"[:500]


def _utf8_problem(raw: bytes) -> str | None:
    """Where a line is not UTF-8, in words (orjson would say "surrogates not allowed"
    and a line 1 of its own)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = " ".join(f"0x{byte:02x}" for byte in raw[exc.start : exc.end])
        return (
            f"not valid UTF-8 (byte {bad} at column {exc.start + 1}); save the jobs file as UTF-8"
        )
    return None


def parse_job_line(
    raw: bytes,
    line_no: int,
    *,
    base_dir: Path,
    load_images: bool = True,
    allow_b64_json: bool = True,
) -> JobLine | BadLine:
    """Parse one non-blank line into a :class:`JobLine`, or a :class:`BadLine` saying why."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses bad UTF-8 too; either way name the column, not a "line 1"
        # of orjson's own (the file's line number leads the message).
        problem = _utf8_problem(raw) or f"invalid JSON: {exc.msg} (column {exc.colno})"
        return BadLine(line_no, str(line_no), problem)
    if not isinstance(obj, dict):
        return BadLine(line_no, str(line_no), f"expected a JSON object, got {type(obj).__name__}")
    # A bad line is still recorded under the id it claims, when it claims one.
    claimed_id = explicit_job_id(obj) or str(line_no)
    try:
        job, fingerprint = _build(
            obj,
            default_id=str(line_no),
            base_dir=base_dir,
            load_images=load_images,
            allow_b64_json=allow_b64_json,
        )
    except ValidationError as exc:
        return BadLine(line_no, claimed_id, str(exc), exc.field)
    except Exception as exc:
        return BadLine(line_no, claimed_id, _unexpected(exc))
    return JobLine(line_no, job, fingerprint)


def iter_job_lines(
    path: str | os.PathLike[str],
    *,
    load_images: bool,
    allow_b64_json: bool = True,
    skip_lines: frozenset[int] | set[int] = frozenset(),
    check_duplicates: bool = True,
    shard: Shard | None = None,
    base_dir: Path | None = None,
) -> Generator[JobLine | BadLine, None, None]:
    """Stream a jobs file, yielding a :class:`JobLine` or :class:`BadLine` per non-blank line.

    A later line reusing an earlier line's id is a :class:`BadLine` (the first one
    stays good; a bad line claims its id too, as in ``run_batch``). With ``load_images=False`` local
    images are only checked, not read (the checking pass); with
    ``load_images=True`` they become data: URIs. Lines whose numbers are in
    ``skip_lines`` (bad lines the checking pass already reported) are not parsed
    again, and ``check_duplicates=False`` saves the id set when that pass already
    refused the duplicates. Relative image paths resolve against the jobs file's
    directory (or ``base_dir``: the current one for stdin). With a ``shard``, only
    the lines (good or bad) whose id falls in it are yielded; ids are still checked
    for repeats over the whole file, so every shard refuses the same lines.
    """
    jobs_path = Path(path)
    base_dir = jobs_path.parent if base_dir is None else base_dir
    ids = RepeatedIdCheck()
    with jobs_path.open("rb") as file:
        for line_no, raw in enumerate(file, start=1):
            if line_no == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if not raw.strip() or line_no in skip_lines:
                continue
            parsed = parse_job_line(
                raw,
                line_no,
                base_dir=base_dir,
                load_images=load_images,
                allow_b64_json=allow_b64_json,
            )
            # Every line claims the id it names, good or bad (as run_batch does): a
            # bad line's id is in the results too, and a fix must not make a
            # later line that reuses it change meaning.
            first_line = ids.claim(parsed.job_id, line_no) if check_duplicates else None
            if first_line is not None and isinstance(parsed, JobLine):
                parsed = BadLine(
                    line_no,
                    parsed.job_id,
                    f"id: duplicate id {parsed.job_id!r} (first used on line {first_line})",
                    "id",
                )
            if shard is None or shard.holds(parsed.job_id):
                yield parsed
