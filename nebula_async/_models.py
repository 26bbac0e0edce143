"""The data model: requests, jobs, results and policies.

Every class is a plain frozen, slotted attrs class built through its own
``__init__``, with keyword-only options (``Job``, ``RateLimit`` and
``GeneratedImage`` take their first fields positionally). Validation of the input
models (requests, jobs, policies) runs in ``__init__`` (attrs validators and
converters) and raises :class:`ValidationError` naming the field, so bad input is
refused before anything is sent, whatever its type or size: a request that passes
is one the wire can carry (``orjson.dumps(to_payload(request))`` cannot fail). An
unknown, missing or wrongly positional argument to any model, results included,
is a ``ValidationError`` too, not a bare ``TypeError`` (:func:`_checked_call`; on
the results it costs 5.9k instructions per ``img2img`` and 15.8k per ``run_batch``
job, whole client, 0.8% and 2.4% of a request, measured 2026-12-03). The
results' values are not checked, so a result a user builds by hand is taken as
given: they are the client's output, read from answers that ``_protocol`` has
checked field by field, and a check on each would be paid again on every
request.
"""

from __future__ import annotations

import functools
import math
import re
import reprlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import attrs
from attrs import validators as v

from ._exceptions import NebulaError, ValidationError

__all__ = [
    "BatchReport",
    "GeneratedImage",
    "ImageResult",
    "Img2ImgRequest",
    "Job",
    "JobResult",
    "MAX_JOB_ID_LENGTH",
    "MAX_JOB_IMAGES",
    "MAX_JSON_DEPTH",
    "RateLimit",
    "RetryPolicy",
    "Timeout",
    "normalize_job_id",
]

MAX_IMAGES_PER_SUBMISSION: Final = 15
#: The most images one :class:`Job` may want (``ceil(images / n)`` submissions).
MAX_JOB_IMAGES: Final = 10_000
#: The longest job id, in characters (an integer id: its decimal digits and sign).
MAX_JOB_ID_LENGTH: Final = 256
#: The deepest nesting of lists and objects in ``prompt_options`` and
#: ``sequential_image_generation_options`` (orjson refuses depth 255; a cycle ends here).
MAX_JSON_DEPTH: Final = 32
SIZE_TIERS: Final = frozenset({"1K", "2K", "3K", "4K"})
RESPONSE_FORMATS: Final = frozenset({"url", "b64_json"})
SEQUENTIAL_MODES: Final = frozenset({"auto", "disabled"})

# The integers orjson encodes (it refuses the rest with "Integer exceeds 64-bit range").
_JSON_INT_MIN: Final = -(2**63)
_JSON_INT_MAX: Final = 2**64 - 1
_FLOAT_MAX: Final = sys.float_info.max

_PIXEL_SIZE = re.compile(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})")
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+")
_HTTP_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f/?#]+[^\s\x00-\x1f\x7f]*", re.IGNORECASE)
# A lone surrogate cannot be encoded as UTF-8 (orjson refuses it); control characters
# (C0, DEL, C1) have no place in a name, and in a prompt only tab and line breaks do.
_LINE = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]*")
_PROMPT = re.compile(r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]*")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_JOB_ID = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]+")
_LARGEST_INT_ID: Final = 10 ** (MAX_JOB_ID_LENGTH - 1) - 1

_C = TypeVar("_C", bound=type)
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _fail(field: str, message: str) -> ValidationError:
    return ValidationError(f"{field}: {message}", field=field)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _shown(value: object) -> str:
    """A short repr of any value, for a message; never raises."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # repr() refuses over 4,300 digits
    try:
        return _short.repr(value)
    except Exception:  # a broken __repr__, a huge int inside a container...
        return f"a {type(value).__name__}"


# -- calls and validators ----------------------------------------------------------------


def _call_problem(
    cls: type, positional: tuple[str, ...], accepted: frozenset[str], required: tuple[str, ...],
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> ValidationError | None:  # fmt: skip
    """What is wrong with calling ``cls(*args, **kwargs)``, from the arguments alone."""
    name = cls.__name__
    if len(args) > len(positional):
        names = [f.alias for f in attrs.fields(cls) if f.init]
        if len(names) > len(positional):
            extra = names[len(positional)]
            return _fail(extra, f"must be given by keyword ({name} options are keyword-only)")
        return ValidationError(
            f"{name} takes at most {len(positional)} arguments, got {len(args)}", field=None
        )
    by_position = positional[: len(args)]
    for key in kwargs:
        if key not in accepted:
            fields = ", ".join(f.alias for f in attrs.fields(cls) if f.init)
            return _fail(key, f"unknown field of {name}; accepted fields: {fields}")
        if key in by_position:
            return _fail(key, f"given twice, by position and by keyword, to {name}")
    for key in required:
        if key not in kwargs and key not in by_position:
            return _fail(key, f"is required ({name} has no default for it)")
    return None


def _checked_call(cls: _C) -> _C:
    """Make a call that ``cls``'s attrs ``__init__`` cannot bind (an unknown,
    missing or twice-given field, too many positional arguments) a
    ``ValidationError`` naming the field.

    What is wrong is computed from the arguments, not read from the interpreter's
    ``TypeError`` text; only a failed call pays for it (checking every call first
    measured 0.6-2 us more per result built). Our validators raise
    ``ValidationError``, so a ``TypeError`` comes from binding; one that the
    arguments do not explain is raised unchanged.
    """
    attrs_init = vars(cls)["__init__"]
    fields = [field for field in attrs.fields(cls) if field.init]
    positional = tuple(f.alias for f in fields if not f.kw_only)
    accepted = frozenset(f.alias for f in fields)
    required = tuple(f.alias for f in fields if f.default is attrs.NOTHING)

    @functools.wraps(attrs_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            attrs_init(self, *args, **kwargs)
        except TypeError:
            problem = _call_problem(cls, positional, accepted, required, args, kwargs)
            if problem is None:
                raise
            raise problem from None

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def _named(expected: str, *checks: _Validator) -> _Validator:
    """attrs validators, run in order, whose failure is a ``ValidationError``
    ``"<field>: must be <expected>, got <value>"``.

    attrs' own validators raise ``TypeError`` or ``ValueError``, but their messages
    also call the value's ``repr`` (which may raise anything, or refuse an int of
    over 4,300 digits): whatever checking a value raises is that value's fault. A
    ``ValidationError`` from a check of ours passes unchanged.
    """

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        try:
            for one in checks:
                one(instance, attribute, value)
        except ValidationError:
            raise
        except Exception:
            raise _fail(attribute.name, f"must be {expected}, got {_shown(value)}") from None

    return check


def _optional(check: _Validator) -> _Validator:
    return v.optional(check)


_not_bool = v.not_(v.instance_of(bool))
_integer: _Validator = v.and_(v.instance_of(int), _not_bool)  # bool is an int, but not a count
_number: _Validator = v.and_(v.instance_of((int, float)), _not_bool)


def _finite(_: object, attribute: attrs.Attribute[Any], value: int | float) -> None:
    """A float that is not NaN or infinite; an int that a float can hold."""
    if not -_FLOAT_MAX <= value <= _FLOAT_MAX:  # exact for ints, False for NaN
        raise ValueError(f"{attribute.name} is not finite")


def _json_int(_: object, attribute: attrs.Attribute[Any], value: int | float) -> None:
    if isinstance(value, int) and not _JSON_INT_MIN <= value <= _JSON_INT_MAX:
        raise ValueError(f"{attribute.name} is over 64 bits")


def _finite_reciprocal(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    # A rate's interval is 1 / rate: a positive subnormal rate gives an infinite one.
    if not math.isfinite(1 / value):
        raise ValueError(f"{attribute.name} is too small")


def _int_between(low: int, high: int) -> _Validator:
    return _named(f"an integer from {low} to {high}", _integer, v.ge(low), v.le(high))


def _text(pattern: re.Pattern[str]) -> _Validator:
    return v.and_(v.instance_of(str), v.matches_re(pattern))


def _not_blank(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value.strip():
        raise ValueError(f"{attribute.name} is blank")


_bool = _named("true or false", v.instance_of(bool))
_json_integer = _named("an integer of at most 64 bits", _integer, _json_int)
_positive = _named("a positive finite number", _number, _finite, v.gt(0))
_non_negative = _named("a finite number >= 0", _number, _finite, v.ge(0))
_positive_rate = _named(
    "a positive finite number whose interval 1 / rate is finite too",
    _number,
    _finite,
    v.gt(0),
    _finite_reciprocal,
)


def _choice(choices: frozenset[str]) -> _Validator:
    accepted = ", ".join(repr(c) for c in sorted(choices))
    # The type first: ``in`` would hash the value (a list cannot be, a hostile object may raise).
    return _optional(_named(f"one of {accepted} or None", v.instance_of(str), v.in_(choices)))


def _plain_float(value: object) -> object:
    # orjson encodes int and str subclasses but refuses float ones (numpy.float64...).
    if isinstance(value, float) and type(value) is not float:
        return float(value)
    return value


# -- JSON objects -------------------------------------------------------------------------


def _json_value(value: object, path: str, depth: int) -> Any:
    """``value`` as plain JSON data orjson encodes (a new dict or list), or a
    ``ValidationError`` naming the path of the first value that is not."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if _JSON_INT_MIN <= value <= _JSON_INT_MAX:
            return int(value)
        raise _fail(path, f"must be an integer of at most 64 bits, got {_shown(value)}")
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        raise _fail(path, f"must be a finite number (JSON has no {value!r}), got {value!r}")
    if isinstance(value, str):
        if _SURROGATE.search(value) is None:
            return str.__str__(value)
        raise _fail(path, "must be text without lone surrogates (not encodable as UTF-8)")
    if depth >= MAX_JSON_DEPTH:
        raise _fail(path, f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str) or _SURROGATE.search(key) is not None:
                raise _fail(path, f"keys must be encodable strings, got {_shown(key)}")
            result[str.__str__(key)] = _json_value(item, f"{path}.{key[:60]}", depth + 1)
        return result
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise _fail(
        path,
        "must be JSON data (None, a bool, an int, a finite float, a str, a list or a "
        f"dict with str keys), got {type(value).__name__} {_shown(value)}",
    )


def _json_object(value: object, field: str) -> dict[str, Any] | None:
    """None, or a copy of a JSON object as plain data (so a later change to the
    caller's dict cannot make the request unencodable)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(field, f"must be an object (dict) or None, got {type(value).__name__}")
    result: dict[str, Any] = _json_value(value, field, 0)
    return result


# attrs converters (named functions, as the mypy plugin reads them).
def _prompt_options(value: object) -> dict[str, Any] | None:
    return _json_object(value, "prompt_options")


def _sequential_options(value: object) -> dict[str, Any] | None:
    return _json_object(value, "sequential_image_generation_options")


# -- requests ---------------------------------------------------------------------------


def _size(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    accepted = "a tier (1K, 2K, 3K, 4K) or WIDTHxHEIGHT pixels such as 2048x2048"
    if not isinstance(value, str):
        raise _fail(attribute.name, f"must be {accepted}, got {type(value).__name__}")
    if value in SIZE_TIERS:
        return
    match = _PIXEL_SIZE.fullmatch(value)
    if not match:
        raise _fail(attribute.name, f"must be {accepted}, got {_shown(value)}")
    width, height = int(match.group(1)), int(match.group(2))
    if not 1 / 16 <= width / height <= 16:
        raise _fail(attribute.name, f"aspect ratio must be within 1:16 to 16:1, got {value!r}")


def _image(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    accepted = "an http(s) URL or a data:image/<format>;base64,<data> URI"
    if not isinstance(value, str):
        raise _fail(attribute.name, f"must be {accepted}, got {type(value).__name__}")
    if _HTTP_URL.fullmatch(value) is None and _DATA_URI.fullmatch(value) is None:
        raise _fail(attribute.name, f"must be {accepted}, got {_shown(value)}")


def _max_images(_: object, attribute: attrs.Attribute[Any], value: dict[str, Any] | None) -> None:
    if value is not None and "max_images" in value:
        max_images = value["max_images"]
        if isinstance(max_images, bool) or not isinstance(max_images, int):
            raise _fail(f"{attribute.name}.max_images", f"must be an integer, got {max_images!r}")
        if not 1 <= max_images <= MAX_IMAGES_PER_SUBMISSION:
            raise _fail(f"{attribute.name}.max_images", f"must be from 1 to 15, got {max_images}")


_name = _named("a non-empty string without control characters", _text(_LINE), _not_blank)
_prompt = _named(
    "a non-empty string without control characters (tab and line breaks allowed)",
    _text(_PROMPT),
    _not_blank,
)
_option_text = _optional(_named("a string without control characters, or None", _text(_LINE)))


@_checked_call
@attrs.frozen(kw_only=True, repr=False)
class Img2ImgRequest:
    """One image-to-image submission, as the ``img2imgSubmit`` endpoint takes it.

    Required fields of the API (``model``, ``prompt``, ``n``, ``size``,
    ``temperature``, ``watermark``) are always sent; the optional ones only when
    not None. Every value is checked to be one the wire carries: strings without
    control characters (a prompt may hold tabs and line breaks), integers of at
    most 64 bits, finite numbers, and JSON objects (copied, at most
    ``MAX_JSON_DEPTH`` deep) for ``prompt_options`` and
    ``sequential_image_generation_options``.

    >>> import nebula_async as na
    >>> req = na.Img2ImgRequest(model="doubao-seedream-4-0-250828",
    ...                         prompt="a watercolour fox", image="https://example.com/in.png", n=2)
    >>> req.size
    '2048x2048'
    """

    model: str = attrs.field(validator=_name)
    prompt: str = attrs.field(validator=_prompt)
    n: int = attrs.field(default=1, validator=_int_between(1, MAX_IMAGES_PER_SUBMISSION))
    size: str = attrs.field(default="2048x2048", validator=_size)
    temperature: int = attrs.field(default=1, validator=_json_integer)
    watermark: bool = attrs.field(default=False, validator=_bool)
    image: str | None = attrs.field(default=None, validator=_optional(_image))
    prompt_options: dict[str, Any] | None = attrs.field(default=None, converter=_prompt_options)
    optimize_prompt: str | None = attrs.field(default=None, validator=_option_text)
    quality: str | None = attrs.field(default=None, validator=_option_text)
    response_format: str | None = attrs.field(default=None, validator=_choice(RESPONSE_FORMATS))
    score: float | None = attrs.field(
        default=None,
        converter=_plain_float,
        validator=_optional(
            _named("a finite number of at most 64 bits", _number, _finite, _json_int)
        ),
    )
    sequential_image_generation: str | None = attrs.field(
        default=None, validator=_choice(SEQUENTIAL_MODES)
    )
    sequential_image_generation_options: dict[str, Any] | None = attrs.field(
        default=None, converter=_sequential_options, validator=_max_images
    )

    def __repr__(self) -> str:
        # A data: URI can be megabytes; show its head only.
        parts = []
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if field.name not in ("n", "size") and value == field.default:
                continue
            if isinstance(value, str) and len(value) > 80:
                value = f"{value[:60]}...<{len(value)} chars>"
            parts.append(f"{field.name}={value!r}")
        return f"Img2ImgRequest({', '.join(parts)})"


def normalize_job_id(value: object) -> str:
    """The job id that ``value`` names, checked: the one rule of the library and the CLI.

    An id is a ``str`` or an ``int`` (not a bool; written in decimal). As a string it
    must hold 1 to ``MAX_JOB_ID_LENGTH`` (256) characters, not all whitespace, with
    no control character (C0, DEL, C1) and no lone surrogate, since ids are written
    to JSON lines and shown in messages. It is returned unchanged, not stripped: ids
    are compared exactly. Anything else is a :class:`ValidationError` naming ``id``.

    >>> normalize_job_id("fox-1"), normalize_job_id(7)
    ('fox-1', '7')
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if -_LARGEST_INT_ID <= value <= _LARGEST_INT_ID:
            return str(value)
        raise _fail("id", f"must be at most {MAX_JOB_ID_LENGTH} characters, got {_shown(value)}")
    if not isinstance(value, str):
        raise _fail("id", f"must be a string or an integer, got {type(value).__name__}")
    if len(value) > MAX_JOB_ID_LENGTH:
        raise _fail("id", f"must be at most {MAX_JOB_ID_LENGTH} characters, got {len(value)}")
    if _JOB_ID.fullmatch(value) is None or not value.strip():
        raise _fail(
            "id", f"must be a non-empty string without control characters, got {_shown(value)}"
        )
    return value


@_checked_call
@attrs.frozen
class Job:
    """A request and how many images it should produce in total.

    A job wanting more images than ``request.n`` is sent as
    ``ceil(images / request.n)`` submissions of at most ``request.n`` images each
    (the last one smaller); their URLs are gathered into one :class:`JobResult`.
    ``images`` is at most ``MAX_JOB_IMAGES`` (10,000): split bigger work into
    several jobs. ``id`` follows :func:`normalize_job_id` (None: the job's position
    in its batch).

    >>> import nebula_async as na
    >>> job = na.Job(na.Img2ImgRequest(model="m", prompt="p", n=2), id="fox", images=5)
    >>> job.submission_sizes()
    [2, 2, 1]
    """

    request: Img2ImgRequest = attrs.field(
        validator=_named("an Img2ImgRequest", v.instance_of(Img2ImgRequest))
    )
    id: str | None = attrs.field(
        default=None, kw_only=True, converter=attrs.converters.optional(normalize_job_id)
    )
    images: int | None = attrs.field(
        default=None, kw_only=True, validator=_optional(_int_between(1, MAX_JOB_IMAGES))
    )

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


@_checked_call
@attrs.frozen
class GeneratedImage:
    """One generated image: a ``url``, or ``b64_json`` when ``response_format="b64_json"``."""

    url: str | None = None
    b64_json: str | None = attrs.field(
        default=None, repr=lambda v: f"<{len(v)} chars>" if v else "None"
    )


@_checked_call
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


@_checked_call
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


@_checked_call
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


@_checked_call
@attrs.frozen(kw_only=True)
class RetryPolicy:
    """When and how long to wait before repeating a failed attempt.

    ``max_attempts`` counts the first attempt (4 = 1 try + 3 retries). Delays grow
    as ``backoff_base * 2**retry`` up to ``backoff_max``, with full jitter. A server's
    ``Retry-After`` is honoured instead, unless it exceeds ``retry_after_max``: then
    the error is raised at once. With ``retry_ambiguous=False`` only failures where
    the request surely was not processed (connect errors, 429, 503) are repeated,
    since a resent generation may be billed twice. Durations are finite seconds.

    >>> import nebula_async as na
    >>> na.RetryPolicy(max_attempts=6, backoff_max=10.0).max_attempts
    6
    """

    max_attempts: int = attrs.field(default=4, validator=_int_between(1, 1000))
    backoff_base: float = attrs.field(default=0.5, validator=_non_negative)
    backoff_max: float = attrs.field(default=30.0, validator=_non_negative)
    retry_after_max: float = attrs.field(default=120.0, validator=_non_negative)
    retry_ambiguous: bool = attrs.field(default=True, validator=_bool)


@_checked_call
@attrs.frozen
class RateLimit:
    """A request-rate cap: ``per_second`` sends, with up to ``burst`` at once.

    Enforced by GCRA (see :mod:`nebula_async._limits`). ``adaptive=False``: exactly
    ``per_second``. ``adaptive=True``: ``per_second`` is a ceiling, steered under
    by the embedded limiter's rate controller (:mod:`nebula_async._adaptive`),
    which starts at half of it, reads the server's limit from the window of each
    429, runs just under that and probes for a raised one, never below
    ``min_per_second`` (default 0.1/s, or ``per_second`` if lower).

    ``decrease_factor`` and ``recovery_per_s`` do not affect this limit: the
    controller reads a limit instead of cutting by a factor. They are the knobs
    of the multiplicative-decrease, linear-recovery rate that
    :class:`~nebula_async.SharedRateLimit` (its fields of the same names) keeps
    in Redis for all its processes; here they are accepted and validated only.
    Rates are positive finite numbers whose interval (``1 / rate``) is finite too.

    >>> import nebula_async as na
    >>> na.RateLimit(50, burst=5).burst
    5
    """

    per_second: float = attrs.field(validator=_positive_rate)
    burst: int = attrs.field(default=1, kw_only=True, validator=_int_between(1, 1_000_000))
    adaptive: bool = attrs.field(default=True, kw_only=True, validator=_bool)
    decrease_factor: float = attrs.field(
        default=0.5,
        kw_only=True,
        validator=_named("a number above 0 and below 1", _number, v.gt(0), v.lt(1)),
    )
    recovery_per_s: float | None = attrs.field(
        default=None, kw_only=True, validator=_optional(_positive_rate)
    )
    min_per_second: float | None = attrs.field(
        default=None, kw_only=True, validator=_optional(_positive_rate)
    )


@_checked_call
@attrs.frozen(kw_only=True)
class Timeout:
    """Time limits for one HTTP attempt, in seconds (None: no limit).

    ``attempt`` bounds one attempt from sending to the last body byte; ``connect``
    bounds opening a connection; ``read`` bounds the wait for each chunk of the
    answer. None of them counts time spent waiting for a concurrency or rate slot.
    Each is a positive finite number or None.

    >>> import nebula_async as na
    >>> na.Timeout(attempt=90.0, connect=5.0).read is None
    True
    """

    attempt: float | None = attrs.field(default=120.0, validator=_optional(_positive))
    connect: float | None = attrs.field(default=10.0, validator=_optional(_positive))
    read: float | None = attrs.field(default=None, validator=_optional(_positive))
