"""The sans-I/O protocol on recorded answer bodies: no network, no event loop."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nebula_async as na
from nebula_async._protocol import (
    IMG2IMG_PATH,
    LOGIN_PATH,
    authorization_value,
    build_img2img_request,
    build_login_request,
    decipher_img2img,
    decipher_login,
    is_image_url,
    is_loopback_host,
    normalize_base_url,
    parse_retry_after,
    truncate_text,
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


@pytest.mark.parametrize(
    "url",
    [
        "http://ai-nebula.com",
        "HTTP://ai-nebula.com/",
        "http://10.0.0.7:8080",
        "http://127.1",  # a legacy form: not recognised as loopback
        "http://localhost.example.com",
        "http://[::2]:80",
    ],
)
def test_plain_http_off_loopback_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(na.ValidationError, match="unencrypted") as caught:
        normalize_base_url(url)
    assert caught.value.field == "base_url"
    assert normalize_base_url(url, allow_insecure_http=True) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1",
        "http://127.8.9.10:81/",
        "http://localhost:8080",
        "http://LOCALHOST",
        "http://[::1]:9000",
        "http://[::ffff:127.0.0.1]",
        "https://anything.example",
    ],
)
def test_plain_http_to_loopback_and_https_need_no_permission(url: str) -> None:
    assert normalize_base_url(url) == url.rstrip("/")


def test_allow_insecure_http_must_be_a_bool() -> None:
    with pytest.raises(na.ValidationError) as caught:
        normalize_base_url("http://h", allow_insecure_http="yes")  # type: ignore[arg-type]
    assert caught.value.field == "allow_insecure_http"


def test_loopback_hosts() -> None:
    assert all(
        map(is_loopback_host, ["127.0.0.1", "127.255.0.1", "::1", "localhost", "::ffff:127.0.0.2"])
    )
    assert not any(
        map(is_loopback_host, [None, "", "128.0.0.1", "::", "0.0.0.0", "127.1", "x.localhost"])
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example/a.png",
        "HTTP://cdn.example",
        "http://[::1]:8/x",
        "https://h/a b.png",
        "https://user@h/x",
    ],
)
def test_image_urls_that_may_be_fetched(url: str) -> None:
    assert is_image_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "data:image/png;base64,AAAA",
        "https://",
        "https:///path",
        "http://?q",
        "http://@h",
        "http://:80/x",
        " https://h/x",
        "https://h/x\r\nSet-Cookie: a=b",
        "ftp://h/x",
        "//h/x",
        "https:/h/x",
    ],
)
def test_image_urls_refused(url: str) -> None:
    assert not is_image_url(url)


@pytest.mark.parametrize("bad", ["", "javascript:alert(1)", "file:///etc/passwd", "data:,x"])
def test_an_answer_with_a_bad_image_url_is_malformed_at_its_path(bad: str) -> None:
    good = "https://cdn.example/1.png"
    for images in (
        [{"url": bad}],
        [{"url": good}, {"url": bad}],
        [{"b64_json": "aGk="}, {"url": bad}],
    ):
        raw = orjson.dumps({"code": 200, "msg": "ok", "data": {"images": images}})
        with pytest.raises(na.ResponseDecodeError) as caught:
            decipher_img2img(200, {}, raw)
        assert caught.value.path == f"$.data.images[{len(images) - 1}].url"


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (None, "$.data"),
        ({}, "$.data.images"),
        ({"images": {}}, "$.data.images"),
        ({"images": [7]}, "$.data.images[0]"),
        ({"images": [{"url": 5}]}, "$.data.images[0].url"),
        ({"images": [{"url": "https://x/1.png", "b64_json": 5}]}, "$.data.images[0].b64_json"),
        ({"images": [{"url": "https://x/1.png"}, {"url": None}]}, "$.data.images[1]"),
        # The first problem in the answer's order, whichever check finds it.
        ({"images": [{"url": "u"}, {"url": None, "b64_json": None}]}, "$.data.images[0].url"),
    ],
)
def test_an_answer_is_read_strictly_and_its_first_problem_named(data: object, path: str) -> None:
    raw = orjson.dumps({"code": 200, "msg": "ok", "data": data})
    with pytest.raises(na.ResponseDecodeError) as caught:
        decipher_img2img(200, {}, raw)
    assert caught.value.path == path
    assert str(caught.value).endswith(f"@ {path}")
    assert (
        decipher_img2img(200, {}, orjson.dumps({"code": 200, "data": {"images": []}})).images == []
    )


def test_truncate_text() -> None:
    assert truncate_text("short") == "short"
    assert truncate_text("x" * 1000) == "x" * 1000
    assert truncate_text("x" * 1001) == "x" * 1000 + "... (1 more)"
    assert truncate_text("abcdef", 2) == "ab... (4 more)"


def test_long_server_texts_are_cut_on_errors_and_results() -> None:
    huge = "é" * 100_000
    images = {"images": [{"url": "https://cdn.example/1.png"}]}
    result = decipher_img2img(200, {}, orjson.dumps({"code": 200, "msg": huge, "data": images}))
    assert result.msg == "é" * 1000 + "... (99000 more)"
    b64 = decipher_img2img(
        200,
        {},
        orjson.dumps({"code": 200, "msg": huge, "data": {"images": [{"b64_json": "aGk="}]}}),
    )
    assert len(b64.msg) < 1020
    for status, code in ((200, 500), (503, None), (400, 400)):
        raw = orjson.dumps({"code": code, "msg": huge})
        with pytest.raises(na.APIStatusError) as caught:
            decipher_img2img(status, {}, raw)
        assert len(caught.value.msg) < 1020
        assert len(str(caught.value)) < 1100
    # A huge non-integer code, quoted in the error, is cut too.
    with pytest.raises(na.ResponseDecodeError) as decode_error:
        decipher_img2img(200, {}, orjson.dumps({"code": huge, "data": images}))
    assert len(str(decode_error.value)) < 1100
    # A million bad images: the first problem is the message, one short text.
    many = {"images": [{"url": 5}] * 50_000}
    with pytest.raises(na.ResponseDecodeError) as many_errors:
        decipher_img2img(200, {}, orjson.dumps({"code": 200, "data": many}))
    assert len(str(many_errors.value)) < 1100
    assert many_errors.value.path == "$.data.images[0].url"
    # The login answer's refusal text as well.
    with pytest.raises(na.AuthenticationError) as login_error:
        decipher_login(200, {}, orjson.dumps({"code": 500, "msg": huge}))
    assert len(login_error.value.msg) < 1020


def test_the_login_request_carries_its_own_answer_cap() -> None:
    request = build_login_request("https://h", "u", "p")
    assert request.max_response_bytes == 2**20
    assert build_img2img_request("https://h", "Bearer t", b"{}").max_response_bytes is None


# -- any answer: an ImageResult or a NebulaError, never another exception --------------


def assert_deciphered(status: int, headers: dict[str, str], raw: bytes) -> None:
    """An answer gives a result only for HTTP 2xx with body code 200, else a NebulaError."""
    try:
        result = decipher_img2img(status, headers, raw, now=lambda: NOW)
    except na.NebulaError:
        return
    assert 200 <= status < 300
    assert result.code == 200
    assert all(image.url is not None or image.b64_json is not None for image in result.images)


STATUSES = [200, 201, 400, 401, 429, 500, 502, 503]
HEADERS: list[dict[str, str]] = [{}, {"Retry-After": "3"}]
URL = "https://cdn.example/a.png"
# Shapes at and around the common answer: each differs from it in one way.
EDGE_BODIES: list[Any] = [
    {"code": 200, "msg": "ok", "data": {"images": [{"url": URL}]}},
    {"code": 200, "data": {"images": [{"url": URL}, {"url": URL + "?2"}]}},  # no msg
    {"code": 200, "msg": None, "data": {"images": [{"url": URL}]}},
    {"code": 200, "msg": 7, "data": {"images": [{"url": URL}]}},
    {"code": 200, "msg": "ok", "data": {"images": []}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": URL, "b64_json": None}]}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": URL, "b64_json": "aGk="}]}},
    {"code": 200, "msg": "ok", "data": {"images": [{"b64_json": "aGk="}]}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": URL, "size": "1K"}], "usage": {}}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": URL}]}, "traceId": "t"},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": None}]}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": 5}]}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": ""}]}},
    {"code": 200, "msg": "ok", "data": {"images": [{"url": URL}, {"url": "file:///x"}]}},
    {"code": 200, "msg": "x" * 1001, "data": {"images": [{"url": URL}]}},
    {"code": 400, "msg": "x" * 1001},
    {"code": 200, "msg": "ok", "data": {"images": [{}]}},
    {"code": 200, "msg": "ok", "data": {"images": [URL]}},
    {"code": 200, "msg": "ok", "data": {"images": [[URL]]}},
    {"code": 200, "msg": "ok", "data": {"images": {"url": URL}}},
    {"code": 200, "msg": "ok", "data": {"images": URL}},
    {"code": 200, "msg": "ok", "data": {"images": None}},
    {"code": 200, "msg": "ok", "data": {}},
    {"code": 200, "msg": "ok", "data": None},
    {"code": 200, "msg": "ok", "data": [{"url": URL}]},
    {"code": 200, "msg": "ok"},
    {"code": True, "msg": "ok", "data": {"images": [{"url": URL}]}},
    {"code": 200.0, "msg": "ok", "data": {"images": [{"url": URL}]}},
    {"code": "200", "msg": "ok", "data": {"images": [{"url": URL}]}},
    {"code": 201, "msg": "ok", "data": {"images": [{"url": URL}]}},
    {"code": 500, "msg": "boom", "data": {"images": [{"url": URL}]}},
    {"msg": "ok", "data": {"images": [{"url": URL}]}},
    [{"code": 200}],
    "ok",
    None,
]
EDGE_RAW = [
    *(orjson.dumps(value) for value in EDGE_BODIES),
    *(path.read_bytes() for path in sorted(RECORDED.iterdir())),
    b"",
    b"  \n",
    b"{",
    b'{"code": 200, "data": {"images": [{"url": "x"}]}} trailing',
    b'{"code": 99999999999999999999999, "data": {}}',
    b"\xff\xfe",
]


@pytest.mark.parametrize("raw", EDGE_RAW, ids=lambda raw: raw[:50].decode("utf-8", "replace"))
def test_recorded_and_edge_bodies(raw: bytes) -> None:
    for status in STATUSES:
        for headers in HEADERS:
            assert_deciphered(status, headers, raw)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_IMAGE = st.fixed_dictionaries(
    {},
    optional={
        "url": st.sampled_from([URL, "http://h", "https://", "file:///x", ""])
        | st.text(max_size=12)
        | _SCALARS,
        "b64_json": st.none() | st.text(max_size=8) | _VALUES,
        "extra": _VALUES,
    },
)
_DATA = (
    st.fixed_dictionaries(
        {}, optional={"images": st.lists(_IMAGE | _VALUES, max_size=3) | _VALUES, "usage": _VALUES}
    )
    | _VALUES
)
_ENVELOPE = (
    st.fixed_dictionaries(
        {},
        optional={
            "code": st.sampled_from([200, 200, 200, 400, 401, 429, 500]) | _SCALARS,
            "msg": st.text(max_size=10) | _SCALARS,
            "data": _DATA,
            "traceId": _VALUES,
        },
    )
    | _VALUES
)


@settings(max_examples=400, deadline=None)
@given(
    envelope=_ENVELOPE,
    status=st.sampled_from([200, 200, 200, 201, 401, 429, 500, 503]),
    headers=st.sampled_from(HEADERS),
)
def test_generated_answers(envelope: Any, status: int, headers: dict[str, str]) -> None:
    assert_deciphered(status, headers, orjson.dumps(envelope))
