"""The sans-I/O protocol on recorded answer bodies: no network, no event loop."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import orjson
import pytest

import nebula_async as na
from nebula_async._protocol import (
    IMG2IMG_PATH,
    LOGIN_PATH,
    authorization_value,
    build_img2img_request,
    build_login_request,
    decipher_img2img,
    decipher_login,
    normalize_base_url,
    parse_retry_after,
)

RECORDED = Path(__file__).parent / "recorded"
NOW = 1_700_000_000.0


def body(name: str) -> bytes:
    return (RECORDED / name).read_bytes()


def decipher(status: int, name: str, headers: dict[str, str] | None = None) -> na.ImageResult:
    return decipher_img2img(status, headers or {}, body(name), now=lambda: NOW)


def test_success_gives_urls_in_order() -> None:
    result = decipher(200, "ok_two_urls.json")
    assert result.urls == ["https://cdn.example/a.png", "https://cdn.example/b.png"]
    assert result.code == 200
    assert result.msg == "Operation successful"


def test_b64_image_and_unknown_fields_are_tolerated() -> None:
    result = decipher(200, "ok_b64_extra_fields.json")
    assert result.urls == []
    assert result.images == [na.GeneratedImage(b64_json="iVBORw0KGgo=")]


@pytest.mark.parametrize(
    ("name", "cls", "code"),
    [
        ("body_400.json", na.BadRequestError, 400),
        ("body_401.json", na.AuthenticationError, 401),
        ("body_403.json", na.AuthenticationError, 403),
        ("body_429.json", na.RateLimitError, 429),
        ("body_500.json", na.ServerError, 500),
    ],
)
def test_http_200_body_code_decides(name: str, cls: type[na.APIStatusError], code: int) -> None:
    with pytest.raises(cls) as info:
        decipher(200, name)
    error = info.value
    assert type(error) is cls
    assert error.status_code == 200
    assert error.code == code
    assert error.msg
    assert error.msg in str(error)


def test_http_429_with_retry_after_seconds() -> None:
    with pytest.raises(na.RateLimitError) as info:
        decipher(429, "http_429_body.json", {"Retry-After": "7"})
    assert info.value.status_code == 429
    assert info.value.code == 429
    assert info.value.retry_after == 7.0


def test_http_429_with_retry_after_http_date() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 30, tz=UTC), usegmt=True)
    with pytest.raises(na.RateLimitError) as info:
        decipher(429, "empty.json", {"retry-after": when})
    assert info.value.retry_after == pytest.approx(30.0)
    assert info.value.code is None


def test_non_2xx_status_decides_class_over_body_code() -> None:
    # HTTP 503 with a body claiming 400: the HTTP status wins, the body code is kept.
    with pytest.raises(na.ServerError) as info:
        decipher(503, "body_400.json")
    assert info.value.status_code == 503
    assert info.value.code == 400


def test_gateway_502_html_body() -> None:
    with pytest.raises(na.ServerError) as info:
        decipher(502, "gateway_502.html")
    error = info.value
    assert error.status_code == 502
    assert error.code is None
    assert "502 Bad Gateway" in error.msg
    assert "<" not in error.msg


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("truncated.json", "$"),
        ("empty.json", "$"),
        ("not_object.json", "$"),
        ("missing_images.json", "$.data.images"),
        ("mistyped_url.json", "$.data.images[0].url"),
    ],
)
def test_malformed_answers_say_where(name: str, path: str) -> None:
    with pytest.raises(na.ResponseDecodeError) as info:
        decipher(200, name)
    assert info.value.path == path
    assert info.value.status_code == 200


def test_missing_code_is_a_decode_error() -> None:
    with pytest.raises(na.ResponseDecodeError, match=r"\$\.code"):
        decipher_img2img(200, {}, b'{"msg": "ok", "data": {"images": []}}')


def test_unknown_body_code_is_a_plain_status_error() -> None:
    with pytest.raises(na.APIStatusError) as info:
        decipher_img2img(200, {}, b'{"code": 601, "msg": "warning"}')
    assert type(info.value) is na.APIStatusError
    assert info.value.effective_code == 601


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "2.5"}, 2.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"RETRY-AFTER": "4"}, 4.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=lambda: NOW) == expected


def test_retry_after_date_in_the_past_is_zero() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW - 100, tz=UTC), usegmt=True)
    assert parse_retry_after({"Retry-After": when}, now=lambda: NOW) == 0.0


def test_bearer_prefix_is_sent_exactly_once() -> None:
    assert authorization_value("abc") == "Bearer abc"
    assert authorization_value("Bearer abc") == "Bearer abc"
    assert authorization_value("bearer   abc ") == "Bearer abc"


def test_build_img2img_request() -> None:
    payload = orjson.dumps(na.to_payload(na.Img2ImgRequest(model="m", prompt="p")))
    request = build_img2img_request("https://host", "Bearer t", payload)
    assert request.method == "POST"
    assert request.url == "https://host" + IMG2IMG_PATH
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["Content-Type"] == "application/json"
    assert orjson.loads(request.body)["batchImageGenerationDTO.model"] == "m"
    assert "Bearer t" not in repr(request.body)


def test_login_request_and_answers() -> None:
    request = build_login_request("http://127.0.0.1:1", "alice", "s3cret")
    assert request.url.endswith(LOGIN_PATH)
    assert orjson.loads(request.body) == {"username": "alice", "password": "s3cret"}
    assert "s3cret" not in repr(request)
    token = decipher_login(200, {}, body("login_ok.json"))
    assert token == "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"
    # RuoYi reports a wrong password as body code 500: still an authentication error.
    with pytest.raises(na.AuthenticationError, match="password incorrect"):
        decipher_login(200, {}, body("login_refused_500.json"))
    with pytest.raises(na.RateLimitError):
        decipher_login(200, {}, body("body_429.json"))
    with pytest.raises(na.ServerError):
        decipher_login(502, {}, body("gateway_502.html"))
    with pytest.raises(na.ResponseDecodeError, match=r"\$\.data"):
        decipher_login(200, {}, b'{"code": 200, "msg": "ok", "data": null}')


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "https://"])
def test_base_url_must_be_http(url: str) -> None:
    with pytest.raises(na.ValidationError, match="base_url"):
        normalize_base_url(url)


def test_base_url_trailing_slash_removed() -> None:
    assert normalize_base_url("https://ai-nebula.com/") == "https://ai-nebula.com"
