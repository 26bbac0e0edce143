"""Any value of any type or size, for any field: a ValidationError naming the field,
or a valid object; never another exception (issue 9 point 4).

A valid request is one the wire carries: it encodes with ``orjson.dumps`` in every
payload style and reads back equal through ``from_payload``, as a dict and through
JSON bytes.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nebula_async as na
from nebula_async._codec import DTO_PREFIX, wire_name
from nebula_async._models import (
    MAX_JOB_ID_LENGTH,
    MAX_JOB_IMAGES,
    MAX_JSON_DEPTH,
    normalize_job_id,
)

STYLES = ("dotted", "nested", "flat")
FIELDS = tuple(field.name for field in attrs.fields(na.Img2ImgRequest))
BASE = {"model": "m", "prompt": "p"}
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Hostile:
    """An object whose every comparison, hash, repr and truth test raises."""

    def _fail(self, *args: object) -> Any:
        raise RuntimeError("hostile")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _fail  # type: ignore[assignment]
    __hash__ = __repr__ = __str__ = __bool__ = __len__ = __float__ = __index__ = _fail  # type: ignore[assignment]


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"k": value}
    return value


cyclic: dict[str, Any] = {}
cyclic["self"] = cyclic

EDGES = [
    None, True, False, 0, -1, 1, 15, 16, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
    -(2**63), -(2**63) - 1, 10**400, -(10**400), 0.0, -0.0, 0.5, 1e-320, 1e308,
    float("nan"), float("inf"), float("-inf"), "", " ", "\x00", "a\x00b", "\ud800", "\x85",
    "\t", "a\nb", "url", "b64_json", "auto", "disabled", "1K", "2048x2048", "4000x100",
    "https://x.example/a.png", "http://h/\x00", "data:image/png;base64,AAAA",
    b"bytes", 1j, [], {}, (), set(), frozenset(), [1, 2], (1, 2), {"a": 1}, {1: 2},
    {"a": {1, 2}}, {"a": float("nan")}, {"a": 2**64}, {"a": "\ud800"}, {"\ud800": 1},
    {"max_images": 3}, {"max_images": 16}, {"max_images": True}, type, print, Ellipsis,
]  # fmt: skip
# Built when drawn: hypothesis shows a sampled value's repr, which these refuse or flood.
# (Hostile objects are tried by the parametrized tests: hypothesis itself touches them.)
MONSTERS = [
    lambda: 10**5000, lambda: "x" * 100_000, lambda: deep(MAX_JSON_DEPTH - 1),
    lambda: deep(MAX_JSON_DEPTH + 1), lambda: deep(300), lambda: cyclic, object,
]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(EDGES),
    st.sampled_from(MONSTERS).map(lambda make: make()),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=8),
    st.complex_numbers(),
    st.decimals(),
    st.fractions(),
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.frozensets(st.integers() | st.text(max_size=4), max_size=3),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
        st.dictionaries(st.integers() | st.none(), children, max_size=2),
    ),
    max_leaves=12,
)

# Values a field may well take, so that valid requests come up often too.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "model": text,
    "prompt": text | st.sampled_from(["a\tb\nc", "fox"]),
    "n": st.integers(-2, 20),
    "size": st.sampled_from(["1K", "4K", "2048x2048", "64x1024", "1024x64", "5K", "0x0"]) | text,
    "temperature": st.integers(-(2**64), 2**65),
    "watermark": st.booleans(),
    "image": st.sampled_from(["https://e.com/i.png", "data:image/png;base64,QUJD", "ftp://x"]),
    "prompt_options": st.dictionaries(st.text(max_size=4), anything, max_size=4),
    "optimize_prompt": text,
    "quality": text,
    "response_format": st.sampled_from(["url", "b64_json", "png"]),
    "score": st.floats() | st.integers(-(2**64), 2**65),
    "sequential_image_generation": st.sampled_from(["auto", "disabled", "on"]),
    "sequential_image_generation_options": st.dictionaries(
        st.sampled_from(["max_images", "other"]), anything | st.integers(0, 16), max_size=2
    ),
}


def value_for(field: str) -> st.SearchStrategy[Any]:
    return anything | GOOD.get(field, anything)


def assert_valid_request(request: na.Img2ImgRequest) -> None:
    """Encodes in every style and reads back equal, as a dict and through JSON."""
    for style in STYLES:
        payload = na.to_payload(request, style=style)
        body = orjson.dumps(payload)
        assert na.from_payload(payload) == request
        assert na.from_payload(orjson.loads(body)) == request


def attempt(make: Any) -> Any:
    """What ``make()`` returns, or the ValidationError it raises (any other escapes)."""
    try:
        return make()
    except na.ValidationError as exc:
        return exc


def names_a_field(error: na.ValidationError, fields: set[str]) -> bool:
    """The error's field is one of ``fields`` or a path under one (``prompt_options.a``)."""
    field = error.field
    return field is not None and any(
        field == name or field.startswith((f"{name}.", f"{name}[")) for name in fields
    )


# -- requests -----------------------------------------------------------------------------


@QUICK
@given(st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), value_for(f))))
def test_any_value_for_one_request_field(field_and_value: tuple[str, Any]) -> None:
    field, value = field_and_value
    made = attempt(lambda: na.Img2ImgRequest(**{**BASE, field: value}))
    if isinstance(made, na.ValidationError):
        assert names_a_field(made, {field}), (field, made.field, str(made))
        assert isinstance(made, ValueError)
        assert str(made).startswith(f"{made.field}: ")
    else:
        assert_valid_request(made)


@QUICK
@given(
    st.dictionaries(
        st.sampled_from([*FIELDS, "bogus"]),
        st.none(),
        max_size=6,
    ).flatmap(lambda keys: st.fixed_dictionaries({key: value_for(key) for key in keys}))
)
def test_any_values_for_several_request_fields(fields: dict[str, Any]) -> None:
    made = attempt(lambda: na.Img2ImgRequest(**fields))
    if isinstance(made, na.ValidationError):
        # The bad value's field, an unknown keyword, or a required field left out.
        assert names_a_field(made, {*fields, "model", "prompt"}), (made.field, str(made))
    else:
        assert_valid_request(made)


# Keys of every payload style, and others.
KEYS = st.sampled_from(
    [*FIELDS, *(wire_name(f) for f in FIELDS), *(f"{DTO_PREFIX}.{wire_name(f)}" for f in FIELDS)]
) | st.text(max_size=8)


def payload_values(key: str) -> st.SearchStrategy[Any]:
    name = key.rpartition(".")[2]
    snake = next((f for f in FIELDS if name in (f, wire_name(f))), None)
    return value_for(snake) if snake else anything


payloads = st.dictionaries(KEYS, st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({key: payload_values(key) for key in keys})
)


@QUICK
@given(
    st.one_of(
        payloads,
        payloads.map(lambda p: {DTO_PREFIX: p}),
        st.dictionaries(st.integers() | st.text(max_size=4), anything, max_size=3),
        anything,
    )
)
def test_any_payload_reads_or_names_its_key(payload: Any) -> None:
    made = attempt(lambda: na.from_payload(payload))
    if not isinstance(made, na.ValidationError):
        assert_valid_request(made)
    elif isinstance(payload, dict):
        keys = {key for key in payload if isinstance(key, str)}
        inner = payload.get(DTO_PREFIX)
        if isinstance(inner, dict):
            keys |= {f"{DTO_PREFIX}.{key}" for key in inner if isinstance(key, str)}
        required = {"model", "prompt", f"{DTO_PREFIX}.model", f"{DTO_PREFIX}.prompt"}
        assert made.field is not None
        # The payload's own key (or a path under it), a required key it lacks, or a
        # key that is not a string ("<int key>").
        assert names_a_field(made, keys | required) or made.field.startswith("<"), (
            made.field,
            str(made),
        )


def test_a_request_owns_its_objects() -> None:
    options: dict[str, Any] = {"a": [1, (2, 3)]}
    request = na.Img2ImgRequest(model="m", prompt="p", prompt_options=options)
    options["a"].append({1, 2})  # the caller's dict changes; the request's does not
    assert request.prompt_options == {"a": [1, [2, 3]]}
    assert_valid_request(request)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"response_format": []}, "response_format"),
        ({"sequential_image_generation": {}}, "sequential_image_generation"),
        ({"score": 10**400}, "score"),
        ({"score": float("inf")}, "score"),
        ({"temperature": 2**70}, "temperature"),
        ({"model": "m\x00"}, "model"),
        ({"prompt": "p\x00"}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"image": "https://h/a\x00b"}, "image"),
        ({"prompt_options": {"tags": {"a", "b"}}}, "prompt_options.tags"),
        ({"prompt_options": {"a": [{"b": 2**64}]}}, "prompt_options.a[0].b"),
        ({"prompt_options": {1: 2}}, "prompt_options"),
        ({"prompt_options": deep(300)}, "prompt_options"),
        ({"prompt_options": cyclic}, "prompt_options"),
        ({"sequential_image_generation_options": {"max_images": 16}},
         "sequential_image_generation_options.max_images"),
        ({"n": Hostile()}, "n"),
        ({"response_format": Hostile()}, "response_format"),
        ({"model": Hostile()}, "model"),
        ({"size": Hostile()}, "size"),
        ({"image": Hostile()}, "image"),
        ({"score": Hostile()}, "score"),
        ({"prompt_options": {"a": Hostile()}}, "prompt_options.a"),
    ],
)  # fmt: skip
def test_the_values_of_issue_9(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        na.Img2ImgRequest(**{**BASE, **overrides})
    assert info.value.field is not None
    assert info.value.field == field or info.value.field.startswith(field)


# -- jobs and ids -------------------------------------------------------------------------

REQUEST = na.Img2ImgRequest(model="m", prompt="p", n=3)


@QUICK
@given(
    request=st.just(REQUEST) | anything,
    job_id=anything | st.text(max_size=MAX_JOB_ID_LENGTH + 2) | st.integers(),
    images=anything | st.integers(-1, MAX_JOB_IMAGES + 1),
)
def test_any_job(request: Any, job_id: Any, images: Any) -> None:
    job = attempt(lambda: na.Job(request, id=job_id, images=images))
    if isinstance(job, na.ValidationError):
        assert job.field in {"request", "id", "images"}, (job.field, str(job))
    else:
        sizes = job.submission_sizes()
        assert sum(sizes) == job.total_images <= MAX_JOB_IMAGES
        assert job.id is None or job.id == normalize_job_id(job.id)


@QUICK
@given(anything | st.text(max_size=MAX_JOB_ID_LENGTH + 2) | st.integers())
def test_any_job_id(value: Any) -> None:
    job_id = attempt(lambda: normalize_job_id(value))
    if isinstance(job_id, na.ValidationError):
        assert job_id.field == "id"
    else:
        assert type(job_id) is str
        assert 1 <= len(job_id) <= MAX_JOB_ID_LENGTH
        assert job_id.strip()
        assert orjson.loads(orjson.dumps(job_id)) == job_id
        assert normalize_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "value", ["", " ", "\t", "a\nb", "a\x00", "\x85", "\ud800", "x" * (MAX_JOB_ID_LENGTH + 1),
              10**MAX_JOB_ID_LENGTH, True, None, 1.0, b"x", ["a"]],
)  # fmt: skip
def test_refused_job_ids(value: Any) -> None:
    with pytest.raises(na.ValidationError) as info:
        normalize_job_id(value)
    assert info.value.field == "id"


def test_accepted_job_ids() -> None:
    assert normalize_job_id(" a ") == " a "  # kept as given: ids compare exactly
    assert normalize_job_id(-7) == "-7"
    assert normalize_job_id("x" * MAX_JOB_ID_LENGTH) == "x" * MAX_JOB_ID_LENGTH
    assert normalize_job_id("renard-été-🦊") == "renard-été-🦊"


def test_job_images_maximum() -> None:
    assert na.Job(REQUEST, images=MAX_JOB_IMAGES).total_images == MAX_JOB_IMAGES
    with pytest.raises(na.ValidationError, match="10000") as info:
        na.Job(REQUEST, images=2**62)
    assert info.value.field == "images"


# -- policies -----------------------------------------------------------------------------

numbers = st.floats() | st.integers(-10, 10**6) | st.sampled_from([10**400, 1e-320, 0.5, 0.999])


def policy_case(cls: type, required: dict[str, Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    names = [f.name for f in attrs.fields(cls)]
    return st.sampled_from(names).flatmap(
        lambda name: st.tuples(st.just(cls), st.just(required), st.just(name), anything | numbers)
    )


@QUICK
@given(
    policy_case(na.RetryPolicy, {})
    | policy_case(na.Timeout, {})
    | policy_case(na.RateLimit, {"per_second": 5.0})
)
def test_any_policy_keyword(case: tuple[Any, ...]) -> None:
    cls, required, name, value = case
    policy = attempt(lambda: cls(**{**required, name: value}))
    if isinstance(policy, na.ValidationError):
        assert policy.field == name, (cls, name, policy.field, str(policy))
    else:
        for field in attrs.fields(cls):
            number = getattr(policy, field.name)
            if isinstance(number, int | float) and not isinstance(number, bool):
                assert math.isfinite(float(number))
        if isinstance(policy, na.RateLimit):
            assert math.isfinite(1 / policy.per_second)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: na.RateLimit(10**400), "per_second"),
        (lambda: na.RateLimit(1e-320), "per_second"),
        (lambda: na.RateLimit(5, burst=[]), "burst"),
        (lambda: na.Timeout(attempt=10**400), "attempt"),
        (lambda: na.Timeout(read=float("nan")), "read"),
        (lambda: na.RetryPolicy(backoff_max=float("inf")), "backoff_max"),
        (lambda: na.RetryPolicy(max_attempts=10**400), "max_attempts"),
        (lambda: na.RetryPolicy(bogus=1), "bogus"),
        (lambda: na.RateLimit(), "per_second"),
        (lambda: na.RateLimit(5, 2), "burst"),
        (lambda: na.RateLimit(Hostile()), "per_second"),
        (lambda: na.Timeout(connect=Hostile()), "connect"),
        (lambda: na.RetryPolicy(retry_ambiguous=Hostile()), "retry_ambiguous"),
    ],
)
def test_the_policy_values_of_issue_9(call: Any, field: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        call()
    assert info.value.field == field
