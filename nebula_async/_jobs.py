"""Input items to jobs: ids (named, or the item's position), coercion, repeated ids,
and a job's fingerprint (what a results line records so a rerun knows the job).

The library (``stream``, ``run_batch``), the CLI and the Ray integration build jobs
from dicts through one function, :func:`job_from_mapping`; the id rule is
``Job``'s own (its ``id`` converter), never repeated here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any, Final

import attrs
import orjson

from ._codec import from_payload, to_payload
from ._exceptions import APIStatusError, ValidationError
from ._models import Img2ImgRequest, Job, normalize_job_id

__all__ = [
    "FINGERPRINT_VERSION",
    "JobInput",
    "RefusedItem",
    "RepeatedIdCheck",
    "coerce_job",
    "data_uri_identity",
    "error_record",
    "explicit_job_id",
    "image_identity",
    "job_fingerprint",
    "job_from_mapping",
    "job_id_of",
    "position_id",
    "shard_of",
]

JobInput = Job | Img2ImgRequest | Mapping[str, Any]
_JOB_KEYS: Final = frozenset({"id", "images"})
_POSITION_DIGITS: Final = 18
FINGERPRINT_VERSION: Final = "v1"
"""Bumped if the canonical form below ever changes, so old fingerprints never match."""
_FINGERPRINT_HEX: Final = 32  # 128 bits: no two jobs of any file share one by chance


@attrs.frozen
class RefusedItem:
    """An input item refused as it was read (``admit``): fails as its job, unsent."""

    job_id: str
    error: ValidationError


def coerce_job(item: object, index: int) -> Job:
    """Turn one input item into a :class:`Job` with an id (its position by default).

    Raises :class:`ValidationError` naming the field for a bad item.
    """
    if isinstance(item, Job):
        return item if item.id is not None else Job(item.request, id=str(index), images=item.images)
    if isinstance(item, Img2ImgRequest):
        return Job(item, id=str(index))
    if isinstance(item, Mapping):
        return job_from_mapping(item, default_id=str(index))
    raise ValidationError(
        f"job {index}: expected a Job, an Img2ImgRequest or a dict, got {type(item).__name__}",
        field="job",
    )


def job_from_mapping(item: Mapping[str, Any], *, default_id: str) -> Job:
    """A :class:`Job` from a dict of request fields (any style :func:`from_payload`
    reads: snake_case or camelCase, dotted or nested) plus ``id`` and ``images``.

    ``default_id`` is used when the dict names no id (a batch passes the item's
    position, the CLI the line number). Raises :class:`ValidationError` naming the
    field.
    """
    fields = {key: value for key, value in item.items() if key not in _JOB_KEYS}
    job_id = item.get("id")
    return Job(
        from_payload(fields),
        id=default_id if job_id is None else job_id,
        images=item.get("images"),
    )


def image_identity(image: str) -> str:
    """What a fingerprint records of an ``image`` value: a ``data:`` URI becomes
    ``data:<mime>;sha256,<hex>`` of its decoded bytes (so a local file and the data
    URI of its content agree, and 10 MB URIs are not hashed as text twice); a URL
    stays itself."""
    if image[:5].lower() != "data:":
        return image
    header, comma, data = image.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        return image
    try:
        content = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return image
    return data_uri_identity(header[5 : -len(";base64")], hashlib.sha256(content).hexdigest())


def data_uri_identity(mime: str, sha256_hex: str) -> str:
    """:func:`image_identity` of a data URI of type ``mime`` whose bytes hash to
    ``sha256_hex`` (the CLI computes it from a local file without encoding it)."""
    return f"data:{mime.strip().lower()};sha256,{sha256_hex}"


def job_fingerprint(job: Job, *, image: str | None = None) -> str:
    """A stable hash of a job's canonical wire payload and the images it wants.

    The payload is the flat camelCase form with every default filled in and keys
    sorted, so snake_case and camelCase input, dotted or nested, and an ``n``
    written out or left to its default all give one fingerprint; ``images`` counts
    as the total wanted (``images`` or ``n``). ``image`` overrides the identity of
    the request's image (:func:`image_identity`). Shared by the CLI's results lines
    and the Ray integration's output rows.

    >>> import nebula_async as na
    >>> a = na.Job(na.Img2ImgRequest(model="m", prompt="p", n=2))
    >>> b = job_from_mapping({"model": "m", "prompt": "p", "n": 2, "images": 2}, default_id="9")
    >>> job_fingerprint(a) == job_fingerprint(b)
    True
    """
    payload = to_payload(job.request, style="flat")
    if image is not None:
        payload["image"] = image
    elif isinstance(payload.get("image"), str):
        payload["image"] = image_identity(payload["image"])
    canonical = orjson.dumps(
        {"v": FINGERPRINT_VERSION, "request": payload, "images": job.total_images},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()[:_FINGERPRINT_HEX]


def shard_of(job_id: str, shards: int) -> int:
    """The shard (0 to ``shards - 1``) a job id belongs to, the same in every process
    and every run (a hash of the id, not Python's salted ``hash``)."""
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def explicit_job_id(item: object) -> str | None:
    """The id an input item names itself (a Job's ``id``, a dict's ``"id"``), or None
    when its job will be known by its position.

    On the hot path of ``run_batch`` (its repeated-id check): concrete classes are
    tested before the ``Mapping`` ABC, whose ``isinstance`` costs several times more.
    """
    if isinstance(item, Job):
        return item.id
    if isinstance(item, Img2ImgRequest):
        return None
    if isinstance(item, dict | Mapping):
        job_id = item.get("id")
        if job_id is None:
            return None
        try:
            return normalize_job_id(job_id)
        except ValidationError:
            return None  # not an id at all: the job fails on it when it is built
    return None


def job_id_of(item: object, index: int) -> str:
    """The id an item's job will have, or the best one to report if it cannot be one."""
    explicit = explicit_job_id(item)
    return str(index) if explicit is None else explicit


def position_id(job_id: str) -> int | None:
    """The input position whose default id is ``job_id`` ("7" -> 7), or None."""
    if not (job_id.isascii() and job_id.isdigit()) or (job_id[0] == "0" and job_id != "0"):
        return None
    # No input has 10**18 items, and int() refuses strings of over 4,300 digits.
    if len(job_id) > _POSITION_DIGITS:
        return None
    return int(job_id)


class RepeatedIdCheck:
    """Refuses a job whose id an earlier job of the batch already has, in input order.

    ``check(index, item)`` is ``run_pipeline``'s ``admit`` hook. Only the ids that
    items name themselves are kept: a job known by its position ``i`` has the id
    ``str(i)``, unique among positions, so it can only clash with a named id. The
    common batch of bare requests therefore keeps nothing per job (a growing set
    also made glibc trim and regrow its heap, a page fault every few requests).
    """

    __slots__ = ("_named", "_named_at")

    def __init__(self) -> None:
        self._named: dict[str, int] = {}  # ids the input named -> where first named
        self._named_at: set[int] = set()  # the positions of the jobs that named one

    def claim(self, job_id: str, where: int) -> int | None:
        """Note that the job at ``where`` names ``job_id``; returns where an earlier
        job named it (the job is then a repeat), or None.

        The CLI calls this alone (its every job names an id, the line number by
        default); :meth:`check` adds the ids that positions give.
        """
        first = self._named.setdefault(job_id, where)
        return None if first == where else first

    def check(self, index: int, item: object) -> object:
        named = explicit_job_id(item)
        if named is None:
            if not self._named:
                return item  # no id named yet: positions never repeat one another
            job_id = str(index)
            repeated = job_id in self._named
        else:
            job_id = named
            # Position ``earlier`` has the id ``named`` unless it named another one.
            earlier = position_id(named)
            repeated = self.claim(named, index) is not None or (
                earlier is not None and earlier < index and earlier not in self._named_at
            )
            self._named_at.add(index)
        if repeated:
            error = ValidationError(
                f"job {index}: id {job_id!r} is already used by an earlier job of this "
                "batch; ids must be unique",
                field="id",
            )
            return RefusedItem(job_id, error)
        return item


def error_record(error: BaseException | None) -> dict[str, Any] | None:
    """The JSON shape of a job's error (type, message, status_code, code, field), as
    the CLI's results lines and the Ray integration's output rows hold it."""
    if error is None:
        return None
    return {
        "type": type(error).__name__,
        "message": str(error),
        "status_code": error.status_code if isinstance(error, APIStatusError) else None,
        "code": error.code if isinstance(error, APIStatusError) else None,
        "field": error.field if isinstance(error, ValidationError) else None,
    }
