"""The aggregator: a job's submission outcomes, in submission order, into one result."""

from __future__ import annotations

from ._exceptions import NebulaError
from ._models import GeneratedImage, ImageResult, JobResult

__all__ = ["aggregate", "detach_error"]


def detach_error(error: BaseException) -> None:
    """Drop the tracebacks of an error kept in a result, and of its causes.

    A traceback pins every frame it passed through, request bodies (data: URIs of
    megabytes) included, for as long as the result is kept.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current.__context__ = None if current.__cause__ is not None else current.__context__
        current = current.__cause__ or current.__context__


def aggregate(
    job_id: str,
    outcomes: list[ImageResult | NebulaError],
    *,
    attempts: int,
    retries: int,
    rate_limited: int,
    elapsed_s: float,
    requested_images: int,
) -> JobResult:
    """Gather a job's submission outcomes, in submission order, into one result.

    Successful submissions give their URLs and images even when others failed, so a
    partly failed job keeps what it got; every failure is kept in ``errors``,
    detached from its traceback (:func:`detach_error`).
    """
    images: list[GeneratedImage] = []
    errors: list[NebulaError] = []
    for outcome in outcomes:
        if isinstance(outcome, ImageResult):
            images.extend(outcome.images)
        else:
            detach_error(outcome)
            errors.append(outcome)
    return JobResult(
        job_id=job_id,
        urls=[image.url for image in images if image.url is not None],
        images=images,
        errors=errors,
        submissions=len(outcomes),
        attempts=attempts,
        retries=retries,
        rate_limited=rate_limited,
        elapsed_s=elapsed_s,
        requested_images=requested_images,
    )
