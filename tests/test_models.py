"""Validation on the models: bad input is refused before anything is sent."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import nebula_async as na

BASE = {"model": "doubao-seedream-4-0-250828", "prompt": "a watercolour fox"}


def make(**overrides: Any) -> na.Img2ImgRequest:
    return na.Img2ImgRequest(**{**BASE, **overrides})


def test_defaults_follow_the_design_table() -> None:
    request = make()
    assert (request.n, request.size, request.temperature, request.watermark) == (
        1,
        "2048x2048",
        1,
        False,
    )
    optional = [
        "image",
        "prompt_options",
        "optimize_prompt",
        "quality",
        "response_format",
        "score",
        "sequential_image_generation",
        "sequential_image_generation_options",
    ]
    assert all(getattr(request, name) is None for name in optional)


def test_frozen_and_keyword_only() -> None:
    request = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.n = 2  # type: ignore[misc]
    with pytest.raises(na.ValidationError, match="keyword-only"):
        na.Img2ImgRequest("m", "p")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"model": ""}, "model", "non-empty"),
        ({"model": "   "}, "model", "non-empty"),
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"prompt": 3}, "prompt", "string"),
        ({"n": 0}, "n", "1 to 15"),
        ({"n": 16}, "n", "1 to 15"),
        ({"n": True}, "n", "integer"),
        ({"n": 2.0}, "n", "integer"),
        ({"n": "2"}, "n", "integer"),
        ({"temperature": 0.7}, "temperature", "integer"),
        ({"temperature": False}, "temperature", "integer"),
        ({"watermark": 1}, "watermark", "true or false"),
        ({"size": "5K"}, "size", "1K, 2K, 3K, 4K"),
        ({"size": "2048*2048"}, "size", "WIDTHxHEIGHT"),
        ({"size": "4000x100"}, "size", "aspect ratio"),
        ({"size": 2048}, "size", "tier"),
        ({"image": "ftp://host/x.png"}, "image", "http(s) URL"),
        ({"image": "/tmp/x.png"}, "image", "data:image"),
        ({"image": "data:text/plain;base64,AAAA"}, "image", "data:image"),
        ({"response_format": "png"}, "response_format", "'b64_json', 'url'"),
        ({"sequential_image_generation": "on"}, "sequential_image_generation", "'auto'"),
        (
            {"sequential_image_generation_options": {"max_images": 16}},
            "sequential_image_generation_options.max_images",
            "1 to 15",
        ),
        ({"prompt_options": ["a"]}, "prompt_options", "object"),
        ({"score": float("nan")}, "score", "finite"),
        ({"score": True}, "score", "number"),
        ({"colour": "red"}, "colour", "unknown field"),
    ],
)
def test_bad_values_name_the_field(overrides: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        make(**overrides)
    assert info.value.field == field
    assert field in str(info.value)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_required_field() -> None:
    with pytest.raises(na.ValidationError, match="prompt: is required") as info:
        na.Img2ImgRequest(model="m")  # type: ignore[call-arg]
    assert info.value.field == "prompt"


@pytest.mark.parametrize(
    "image",
    [
        "https://example.com/in.png",
        "http://127.0.0.1:8000/a.png?x=1",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/jpeg;base64,/9j/4AAQ",
    ],
)
def test_accepted_images(image: str) -> None:
    assert make(image=image).image == image


@pytest.mark.parametrize("size", ["1K", "2K", "3K", "4K", "1024x1024", "2560x1440", "64x1024"])
def test_accepted_sizes(size: str) -> None:
    assert make(size=size).size == size


def test_repr_shortens_data_uris() -> None:
    request = make(image="data:image/png;base64," + "A" * 10_000)
    assert len(repr(request)) < 300


def test_job_splits_into_submissions() -> None:
    request = make(n=2)
    assert na.Job(request, images=5).submission_sizes() == [2, 2, 1]
    assert na.Job(request, images=4).submission_sizes() == [2, 2]
    assert na.Job(request).submission_sizes() == [2]
    assert na.Job(make(n=15), images=1).submission_sizes() == [1]
    assert na.Job(request, id=7).id == "7"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"images": 0}, "images"), ({"images": True}, "images"), ({"id": 1.5}, "id")],
)
def test_bad_jobs(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        na.Job(make(), **kwargs)
    assert info.value.field == field


def test_job_needs_a_request() -> None:
    with pytest.raises(na.ValidationError, match="Img2ImgRequest"):
        na.Job({"model": "m"})  # type: ignore[arg-type]


def test_job_result_ok_and_error() -> None:
    error = na.ServerError("boom", status_code=500)
    partial = na.JobResult(job_id="a", urls=["u1"], errors=[error], submissions=2)
    assert not partial.ok
    assert partial.error is error
    assert na.JobResult(job_id="b", urls=["u"]).ok


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (na.RetryPolicy, {"max_attempts": 0}, "max_attempts"),
        (na.RetryPolicy, {"backoff_base": -1}, "backoff_base"),
        (na.RetryPolicy, {"retry_ambiguous": "no"}, "retry_ambiguous"),
        (na.RateLimit, {"per_second": 0}, "per_second"),
        (na.RateLimit, {"per_second": 5, "burst": 0}, "burst"),
        (na.RateLimit, {"per_second": 5, "decrease_factor": 1.5}, "decrease_factor"),
        (na.Timeout, {"attempt": -1}, "attempt"),
        (na.Timeout, {"connect": 0}, "connect"),
    ],
)
def test_bad_policies(cls: type, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        cls(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: na.Job(make(), "id-by-position"), "id"),
        (lambda: na.Job(make(), request=make()), "request"),
        (lambda: na.RateLimit(5, 2), "burst"),
        (lambda: na.Img2ImgRequest("m", "p"), "model"),
        (lambda: na.ImageResult(images=[], url="u"), "url"),
        (lambda: na.ImageResult(), "images"),
        (lambda: na.ImageResult([]), "images"),
        (lambda: na.GeneratedImage("u", url="v"), "url"),
        (lambda: na.JobResult(urls=["u"]), "job_id"),
        (lambda: na.JobResult(job_id="a", error=None), "error"),
        (lambda: na.BatchReport(results=[], total=1), "total"),
    ],
)
def test_bad_calls_name_the_field_from_the_arguments(call: Any, field: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        call()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_checked_calls_keep_the_attrs_signature() -> None:
    import inspect

    assert list(inspect.signature(na.Job).parameters) == ["request", "id", "images"]
    assert "model" in inspect.signature(na.Img2ImgRequest).parameters
    assert list(inspect.signature(na.ImageResult).parameters) == ["images", "code", "msg"]


def test_validators_run_for_evolve_too() -> None:
    job = na.Job(make(), id="a")
    with pytest.raises(na.ValidationError) as info:
        attrs.evolve(job, id="")
    assert info.value.field == "id"
