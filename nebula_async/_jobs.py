"""Input items to jobs: ids (named, or the item's position), coercion, repeated ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._codec import from_payload
from ._exceptions import ValidationError
from ._models import Img2ImgRequest, Job

__all__ = [
    "JobInput",
    "RefusedItem",
    "RepeatedIdCheck",
    "coerce_job",
    "explicit_job_id",
    "job_id_of",
    "position_id",
]

JobInput = Job | Img2ImgRequest | Mapping[str, Any]
_JOB_KEYS: Final = frozenset({"id", "images"})
_POSITION_DIGITS: Final = 18


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
        fields = {key: value for key, value in item.items() if key not in _JOB_KEYS}
        job_id = item.get("id")
        return Job(
            from_payload(fields),
            id=str(index) if job_id is None else job_id,
            images=item.get("images"),
        )
    raise ValidationError(
        f"job {index}: expected a Job, an Img2ImgRequest or a dict, got {type(item).__name__}",
        field="job",
    )


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
        if isinstance(job_id, str | int) and not isinstance(job_id, bool):
            return str(job_id)
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
        self._named: set[str] = set()  # ids the input named
        self._named_at: set[int] = set()  # the positions of the jobs that named one

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
            repeated = named in self._named or (
                earlier is not None and earlier < index and earlier not in self._named_at
            )
            self._named_at.add(index)
            self._named.add(named)
        if repeated:
            error = ValidationError(
                f"job {index}: id {job_id!r} is already used by an earlier job of this "
                "batch; ids must be unique",
                field="id",
            )
            return RefusedItem(job_id, error)
        return item
