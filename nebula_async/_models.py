"""The data model: requests, jobs, results and policies.

Every class is a frozen, slotted attrs class with keyword-only options. Validation
runs in ``__init__`` and raises :class:`ValidationError` naming the field, so bad
input is refused before anything is sent. An unknown keyword is a
``ValidationError`` too, not a bare ``TypeError``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import attrs

from ._exceptions import NebulaError, ValidationError

__all__ = [
    "BatchReport",
    "GeneratedImage",
    "ImageResult",
    "Img2ImgRequest",
    "Job",
    "JobResult",
    "RateLimit",
    "RetryPolicy",
    "Timeout",
]

MAX_IMAGES_PER_SUBMISSION: Final = 15
SIZE_TIERS: Final = frozenset({"1K", "2K", "3K", "4K"})
RESPONSE_FORMATS: Final = frozenset({"url", "b64_json"})
SEQUENTIAL_MODES: Final = frozenset({"auto", "disabled"})

_PIXEL_SIZE = re.compile(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})")
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+")
_HTTP_URL = re.compile(r"https?://[^\s/?#]+[^\s]*", re.IGNORECASE)

_C = TypeVar("_C", bound=type)


def _friendly_init(cls: _C) -> _C:
    """Turn the ``TypeError`` of a bad call (unknown keyword, missing or positional
    argument) into a ``ValidationError`` that names the field.

    Only the failure path pays: a good call goes straight to the attrs ``__init__``.
    """
    attrs_init = vars(cls)["__init__"]
    field_names = [f.name for f in attrs.fields(cls)]
    known = {f.alias or f.name for f in attrs.fields(cls)}

    @functools.wraps(attrs_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            attrs_init(self, *args, **kwargs)
        except TypeError as exc:
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ValidationError(
                    f"{cls.__name__}: unknown field {unknown[0]!r}; "
                    f"accepted fields: {', '.join(field_names)}",
                    field=unknown[0],
                ) from None
            missing = re.search(
                r"missing \d+ required (?:keyword-only )?argument[s]?: '(\w+)'", str(exc)
            )
            if missing:
                raise ValidationError(
                    f"{cls.__name__}: field {missing.group(1)!r} is required",
                    field=missing.group(1),
                ) from None
            if "positional" in str(exc):
                raise ValidationError(
                    f"{cls.__name__}: options are keyword-only ({exc})", field=None
                ) from None
            raise

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def _fail(field: str, message: str) -> ValidationError:
    return ValidationError(f"{field}: {message}", field=field)


def _type_name(value: object) -> str:
    return type(value).__name__


# -- field validators -----------------------------------------------------------------
# Each takes (instance, attribute, value) as attrs calls them, and raises ValidationError.


def _non_empty_str(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, f"must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _fail(attribute.name, "must be a non-empty string")


def _optional_str(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise _fail(attribute.name, f"must be a string or None, got {_type_name(value)}")


def _strict_int(field: str, value: object) -> int:
    # bool is an int subclass; the API documents an integer, so True is refused.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, f"must be an integer, got {_type_name(value)} {value!r}")
    return value


def _int_between(low: int, high: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        number = _strict_int(attribute.name, value)
        if not low <= number <= high:
            raise _fail(attribute.name, f"must be an integer from {low} to {high}, got {number}")

    return check


def _int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _strict_int(attribute.name, value)


def _bool(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute.name, f"must be true or false, got {_type_name(value)} {value!r}")


def _one_of(choices: frozenset[str]) -> Callable[[object, attrs.Attribute[Any], object], None]:
    accepted = ", ".join(repr(c) for c in sorted(choices))

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and value not in choices:
            raise _fail(attribute.name, f"must be one of {accepted}, got {value!r}")

    return check


def _size(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    accepted = "a tier (1K, 2K, 3K, 4K) or WIDTHxHEIGHT pixels such as 2048x2048"
    if not isinstance(value, str):
        raise _fail(attribute.name, f"must be {accepted}, got {_type_name(value)}")
    if value in SIZE_TIERS:
        return
    match = _PIXEL_SIZE.fullmatch(value)
    if not match:
        raise _fail(attribute.name, f"must be {accepted}, got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not 1 / 16 <= width / height <= 16:
        raise _fail(attribute.name, f"aspect ratio must be within 1:16 to 16:1, got {value!r}")


def _image(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    accepted = "an http(s) URL or a data:image/<format>;base64,<data> URI"
    if not isinstance(value, str):
        raise _fail(attribute.name, f"must be {accepted}, got {_type_name(value)}")
    if _HTTP_URL.fullmatch(value) or _DATA_URI.fullmatch(value):
        return
    shown = value if len(value) <= 60 else value[:57] + "..."
    raise _fail(attribute.name, f"must be {accepted}, got {shown!r}")


def _optional_mapping(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise _fail(attribute.name, f"must be an object (dict) or None, got {_type_name(value)}")


def _optional_number(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(attribute.name, f"must be a finite number or None, got {value!r}")


def _sequential_options(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _optional_mapping(_, attribute, value)
    if isinstance(value, Mapping) and "max_images" in value:
        max_images = value["max_images"]
        if isinstance(max_images, bool) or not isinstance(max_images, int):
            raise _fail(f"{attribute.name}.max_images", f"must be an integer, got {max_images!r}")
        if not 1 <= max_images <= MAX_IMAGES_PER_SUBMISSION:
            raise _fail(f"{attribute.name}.max_images", f"must be from 1 to 15, got {max_images}")


# -- requests ---------------------------------------------------------------------------


@_friendly_init
@attrs.frozen(kw_only=True, repr=False)
class Img2ImgRequest:
    """One image-to-image submission, as the ``img2imgSubmit`` endpoint takes it.

    Required fields of the API (``model``, ``prompt``, ``n``, ``size``,
    ``temperature``, ``watermark``) are always sent; the optional ones only when
    not None.

    >>> import nebula_async as na
    >>> req = na.Img2ImgRequest(model="doubao-seedream-4-0-250828",
    ...                         prompt="a watercolour fox", image="https://example.com/in.png", n=2)
    >>> req.size
    '2048x2048'
    """

    model: str = attrs.field(validator=_non_empty_str)
    prompt: str = attrs.field(validator=_non_empty_str)
    n: int = attrs.field(default=1, validator=_int_between(1, MAX_IMAGES_PER_SUBMISSION))
    size: str = attrs.field(default="2048x2048", validator=_size)
    temperature: int = attrs.field(default=1, validator=_int)
    watermark: bool = attrs.field(default=False, validator=_bool)
    image: str | None = attrs.field(default=None, validator=_image)
    prompt_options: Mapping[str, Any] | None = attrs.field(
        default=None, validator=_optional_mapping
    )
    optimize_prompt: str | None = attrs.field(default=None, validator=_optional_str)
    quality: str | None = attrs.field(default=None, validator=_optional_str)
    response_format: str | None = attrs.field(default=None, validator=_one_of(RESPONSE_FORMATS))
    score: float | None = attrs.field(default=None, validator=_optional_number)
    sequential_image_generation: str | None = attrs.field(
        default=None, validator=_one_of(SEQUENTIAL_MODES)
    )
    sequential_image_generation_options: Mapping[str, Any] | None = attrs.field(
        default=None, validator=_sequential_options
    )

    def __repr__(self) -> str:
        # A data: URI can be megabytes; show its head only.
        parts = []
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if (
                field.default is not attrs.NOTHING
                and value == field.default
                and field.name
                not in (
                    "n",
                    "size",
                )
            ):
                continue
            if isinstance(value, str) and len(value) > 80:
                value = f"{value[:60]}...<{len(value)} chars>"
            parts.append(f"{field.name}={value!r}")
        return f"Img2ImgRequest({', '.join(parts)})"


def _job_images(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    number = _strict_int(attribute.name, value)
    if number < 1:
        raise _fail(attribute.name, f"must be at least 1, got {number}")


def _job_request(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Img2ImgRequest):
        raise _fail(attribute.name, f"must be an Img2ImgRequest, got {_type_name(value)}")


def _job_id(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _fail("id", f"must be a string or an integer, got {_type_name(value)}")


@_friendly_init
@attrs.frozen
class Job:
    """A request and how many images it should produce in total.

    A job wanting more images than ``request.n`` is sent as
    ``ceil(images / request.n)`` submissions of at most ``request.n`` images each
    (the last one smaller); their URLs are gathered into one :class:`JobResult`.

    >>> import nebula_async as na
    >>> job = na.Job(na.Img2ImgRequest(model="m", prompt="p", n=2), id="fox", images=5)
    >>> job.submission_sizes()
    [2, 2, 1]
    """

    request: Img2ImgRequest = attrs.field(validator=_job_request)
    id: str | None = attrs.field(default=None, kw_only=True, converter=_job_id)
    images: int | None = attrs.field(default=None, kw_only=True, validator=_job_images)

    @property
    def total_images(self) -> int:
        """The number of images the job wants (``images``, else ``request.n``)."""
        return self.request.n if self.images is None else self.images

    def submission_sizes(self) -> list[int]:
        """The ``n`` of each submission, in order."""
        per_call = self.request.n
        total = self.total_images
        full, rest = divmod(total, per_call)
        return [per_call] * full + ([rest] if rest else [])


# -- results ------------------------------------------------------------------------------


@attrs.frozen
class GeneratedImage:
    """One generated image: a ``url``, or ``b64_json`` when ``response_format="b64_json"``."""

    url: str | None = None
    b64_json: str | None = attrs.field(
        default=None, repr=lambda v: f"<{len(v)} chars>" if v else "None"
    )


@attrs.frozen(kw_only=True)
class ImageResult:
    """The answer to one successful submission.

    ``urls`` lists the URL of every image that came as a URL, in the service's order.
    """

    images: list[GeneratedImage]
    code: int = 200
    msg: str = ""

    @property
    def urls(self) -> list[str]:
        """Every image URL of the answer, in order (a new list on each read)."""
        return [image.url for image in self.images if image.url is not None]


@attrs.frozen(kw_only=True)
class JobResult:
    """The outcome of one job, all of its submissions gathered.

    ``urls`` holds the URLs of every successful submission in submission order, so a
    partly failed job keeps what it got; ``ok`` is True only when every submission
    succeeded; ``error`` is the first failed submission's final error.
    """

    job_id: str
    urls: list[str] = attrs.field(factory=list)
    images: list[GeneratedImage] = attrs.field(factory=list)
    errors: list[NebulaError] = attrs.field(factory=list)
    submissions: int = 0
    attempts: int = 0
    retries: int = 0
    rate_limited: int = 0
    elapsed_s: float = 0.0
    requested_images: int = 0

    @property
    def error(self) -> NebulaError | None:
        """The first failed submission's final error, or None."""
        return self.errors[0] if self.errors else None

    @property
    def ok(self) -> bool:
        """True when every submission succeeded."""
        return not self.errors


@attrs.frozen(kw_only=True)
class BatchReport:
    """Everything a batch produced, one :class:`JobResult` per job in input order,
    with totals and latency figures."""

    results: list[JobResult]
    elapsed_s: float
    attempts: int
    retries: int
    rate_limited: int
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float

    @property
    def urls_by_job(self) -> dict[str, list[str]]:
        """Job id -> the job's URLs, in input order.

        Ids are unique within a batch (``run_batch`` refuses a repeated id without
        sending it); should results be combined by hand, the first one of an id wins.
        """
        by_job: dict[str, list[str]] = {}
        for result in self.results:
            by_job.setdefault(result.job_id, list(result.urls))
        return by_job

    @property
    def succeeded(self) -> int:
        """Jobs whose every submission succeeded."""
        return sum(1 for result in self.results if result.ok)

    @property
    def failed(self) -> int:
        """Jobs with at least one failed submission."""
        return len(self.results) - self.succeeded

    @property
    def images(self) -> int:
        """Images generated, over all jobs."""
        return sum(len(result.images) for result in self.results)

    @property
    def throughput_per_s(self) -> float:
        """Jobs finished per second of the batch's wall time."""
        return len(self.results) / self.elapsed_s if self.elapsed_s > 0 else 0.0


# -- policies ---------------------------------------------------------------------------------


def _positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _fail(attribute.name, f"must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise _fail(attribute.name, f"must be finite, got {value!r}")


def _optional_positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _positive(_, attribute, value)


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise _fail(attribute.name, f"must be a number >= 0, got {value!r}")


@_friendly_init
@attrs.frozen(kw_only=True)
class RetryPolicy:
    """When and how long to wait before repeating a failed attempt.

    ``max_attempts`` counts the first attempt (4 = 1 try + 3 retries). Delays grow
    as ``backoff_base * 2**retry`` up to ``backoff_max``, with full jitter. A server's
    ``Retry-After`` is honoured instead, unless it exceeds ``retry_after_max``: then
    the error is raised at once. With ``retry_ambiguous=False`` only failures where
    the request surely was not processed (connect errors, 429, 503) are repeated,
    since a resent generation may be billed twice.

    >>> import nebula_async as na
    >>> na.RetryPolicy(max_attempts=6, backoff_max=10.0).max_attempts
    6
    """

    max_attempts: int = attrs.field(default=4, validator=_int_between(1, 1000))
    backoff_base: float = attrs.field(default=0.5, validator=_non_negative)
    backoff_max: float = attrs.field(default=30.0, validator=_non_negative)
    retry_after_max: float = attrs.field(default=120.0, validator=_non_negative)
    retry_ambiguous: bool = attrs.field(default=True, validator=_bool)


@_friendly_init
@attrs.frozen
class RateLimit:
    """A request-rate cap: ``per_second`` sends, with up to ``burst`` at once.

    Enforced by GCRA (see :mod:`nebula_async._limits`). With ``adaptive=True`` a 429
    cuts the rate by ``decrease_factor`` and it then recovers linearly at
    ``recovery_per_s`` requests/s per second (default ``per_second / 10``) back to
    ``per_second``, never below ``min_per_second``.

    >>> import nebula_async as na
    >>> na.RateLimit(50, burst=5).burst
    5
    """

    per_second: float = attrs.field(validator=_positive)
    burst: int = attrs.field(default=1, kw_only=True, validator=_int_between(1, 1_000_000))
    adaptive: bool = attrs.field(default=True, kw_only=True, validator=_bool)
    decrease_factor: float = attrs.field(default=0.5, kw_only=True, validator=_positive)
    recovery_per_s: float | None = attrs.field(
        default=None, kw_only=True, validator=_optional_positive
    )
    min_per_second: float | None = attrs.field(
        default=None, kw_only=True, validator=_optional_positive
    )

    def __attrs_post_init__(self) -> None:
        if not self.decrease_factor < 1:
            raise _fail("decrease_factor", f"must be below 1, got {self.decrease_factor!r}")


@_friendly_init
@attrs.frozen(kw_only=True)
class Timeout:
    """Time limits for one HTTP attempt, in seconds (None: no limit).

    ``attempt`` bounds one attempt from sending to the last body byte; ``connect``
    bounds opening a connection; ``read`` bounds the wait for each chunk of the
    answer. None of them counts time spent waiting for a concurrency or rate slot.

    >>> import nebula_async as na
    >>> na.Timeout(attempt=90.0, connect=5.0).read is None
    True
    """

    attempt: float | None = attrs.field(default=120.0, validator=_optional_positive)
    connect: float | None = attrs.field(default=10.0, validator=_optional_positive)
    read: float | None = attrs.field(default=None, validator=_optional_positive)
