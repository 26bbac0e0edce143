"""The sans-I/O protocol: build requests and decipher answers, with no network.

Everything here is a plain function of bytes, headers and numbers, so every
protocol decision is tested on recorded bodies without an event loop
(gidgethub's design). The aiohttp shell in ``_transport`` only moves bytes.

Deciphering follows DESIGN section 3: a non-2xx HTTP status decides the error
class (keeping the body ``code`` when the body has one); under HTTP 2xx the body
``code`` decides, since the backend reports most failures as HTTP 200.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import orjson

from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    ValidationError,
)
from ._models import GeneratedImage, ImageResult

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "HttpRequest",
    "IMG2IMG_PATH",
    "LOGIN_MAX_RESPONSE_BYTES",
    "LOGIN_PATH",
    "MAX_TEXT_CHARS",
    "RawResponse",
    "authorization_value",
    "build_img2img_request",
    "build_login_request",
    "decipher_img2img",
    "decipher_login",
    "has_control_characters",
    "is_image_url",
    "is_loopback_host",
    "normalize_base_url",
    "parse_retry_after",
    "status_error_class",
    "truncate_text",
]

DEFAULT_BASE_URL: Final = "https://ai-nebula.com"
IMG2IMG_PATH: Final = "/prod-api/nebula/v4/api/img2imgSubmit"
LOGIN_PATH: Final = "/prod-api/v3/auth/getToken"
JSON_HEADERS: Final = {"Content-Type": "application/json", "Accept": "application/json"}
_SNIPPET = 200
#: The largest answer read, before and after decompression. The biggest legitimate
#: one is n=15 ``b64_json`` images at the largest size, 4096x4096 (16.8 MP): as a
#: PNG that cannot be compressed, 3 bytes a pixel + a filter byte a row + zlib's
#: stored-block framing = 50.35 MB, 67.14 MB in base64, so 15 of them are 1,007 MB
#: (960 MiB) of JSON strings. 1 GiB leaves room for the envelope. A lower cap would
#: throw away an answer already paid for; with ``url`` answers (a few KB) a much
#: lower one (``max_response_bytes=16 * 2**20``) is safe.
DEFAULT_MAX_RESPONSE_BYTES: Final = 2**30
#: The getToken answer holds one token (a JWT of a few hundred bytes).
LOGIN_MAX_RESPONSE_BYTES: Final = 2**20
#: Server texts (``msg``, quoted values) longer than this are cut on errors and results.
MAX_TEXT_CHARS: Final = 1000
_TAGS = re.compile(r"<[^>]+>")
# C0 controls and DEL: a CR or LF in a header value would split the HTTP message.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


def truncate_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many more there were.

    Server texts end up on errors and results, which a batch keeps by the
    thousand: a 400 MB ``msg`` must not stay on one.

    >>> truncate_text("x" * 1005)[-14:]
    'xx... (5 more)'
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more)"


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a C0 control or DEL, which no HTTP header value may.

    >>> has_control_characters("abc"), has_control_characters("a\\r\\nb")
    (False, True)
    """
    return _CONTROL.search(text) is not None


def _redacted_headers(headers: Mapping[str, str]) -> str:
    shown = {
        name: "<redacted>" if name.lower() in _SECRET_HEADERS else value
        for name, value in headers.items()
    }
    return repr(shown)


_SPACES = re.compile(r"\s+")


#: (status, headers, body). A body read in pieces is the bytearray it was gathered
#: in: converting it to bytes would hold a second copy of an answer of up to 1 GiB.
RawResponse = tuple[int, Mapping[str, str], bytes | bytearray]


@attrs.frozen
class HttpRequest:
    """What to send: method, absolute URL, headers and the body bytes."""

    method: str
    url: str
    headers: Mapping[str, str] = attrs.field(repr=_redacted_headers)
    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} bytes>")
    #: A tighter cap on the answer than the transport's own, or None for that one.
    max_response_bytes: int | None = None


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a URL's host, IPv6 without brackets) names this machine:
    ``localhost``, 127.0.0.0/8 or ``::1`` (also as ``::ffff:127.x.x.x``).

    Only literal addresses and the name ``localhost`` count: any other name may
    resolve elsewhere. Legacy forms such as ``127.1`` do not count either.

    >>> is_loopback_host("127.0.0.1"), is_loopback_host("::1"), is_loopback_host("example.com")
    (True, True, False)
    """
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def normalize_base_url(base_url: str, *, allow_insecure_http: bool = False) -> str:
    """``https://host/`` -> ``https://host``; only http(s) URLs without credentials.

    ``http://`` sends the token and the getToken password in cleartext, so it is
    refused unless the host is loopback (see :func:`is_loopback_host`) or
    ``allow_insecure_http`` is True.

    >>> normalize_base_url("https://ai-nebula.com/")
    'https://ai-nebula.com'
    >>> normalize_base_url("http://127.0.0.1:8080")
    'http://127.0.0.1:8080'
    """
    if not isinstance(allow_insecure_http, bool):
        raise ValidationError(
            f"allow_insecure_http: must be true or false, got {allow_insecure_http!r}",
            field="allow_insecure_http",
        )
    url = base_url.strip().rstrip("/") if isinstance(base_url, str) else ""
    if "@" in url:
        # user:password@host. Never echo what precedes the last "@": a password may
        # hold "/", "?" or "#", so no URL parser can be trusted to find its end.
        scheme = url.partition("://")[0].lower()
        shown = (scheme + "://" if scheme in ("http", "https") else "") + "***@"
        shown += url.rpartition("@")[2]
        raise ValidationError(
            f"base_url: must not hold credentials (user:password@host), got {shown!r}; "
            "pass username= and password= instead",
            field="base_url",
        )
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url, re.IGNORECASE):
        raise ValidationError(
            f"base_url: must be an http(s) URL, got {truncate_text(repr(base_url), 200)}",
            field="base_url",
        )
    if url[:5].lower() == "http:" and not allow_insecure_http:
        try:
            host = urlsplit(url).hostname
        except ValueError:  # an unbalanced "[" in the host
            host = None
        if not is_loopback_host(host):
            raise ValidationError(
                f"base_url: http:// would send the token and password unencrypted to "
                f"{truncate_text(repr(url), 200)}; use https://, or pass "
                "allow_insecure_http=True (plain http is accepted without it only for "
                "localhost, 127.0.0.0/8 and [::1])",
                field="base_url",
            )
    return url


# http(s), "://", a host (not empty, not userinfo or a port alone), no control characters.
_IMAGE_URL: Final = re.compile(r"https?://[^\x00-\x20\x7f/?#@:\\][^\x00-\x1f\x7f]*", re.IGNORECASE)


def is_image_url(url: str) -> bool:
    """Whether an answer's image URL is one a client may fetch: http(s) with a host.

    ``""``, ``javascript:``, ``file:`` and ``data:`` URLs are not.

    >>> is_image_url("https://cdn.example/1.png"), is_image_url("file:///etc/passwd")
    (True, False)
    """
    return _IMAGE_URL.fullmatch(url) is not None


def authorization_value(token: str) -> str:
    """The ``Authorization`` header for a token given with or without ``Bearer ``.

    A token that is empty or holds control characters (a CR or LF would split
    the HTTP message) is a :class:`ValidationError` naming ``token``.

    >>> authorization_value("abc"), authorization_value("Bearer abc")
    ('Bearer abc', 'Bearer abc')
    """
    token = token.strip() if isinstance(token, str) else ""
    if token[:7].lower() == "bearer " or token.lower() == "bearer":
        token = token[7:].lstrip()
    if not token or has_control_characters(token):
        raise ValidationError(
            "token: must be a non-empty string without control characters "
            "(a line break or tab inside the token?)",
            field="token",
        )
    return "Bearer " + token


def build_img2img_request(base_url: str, authorization: str, body: bytes) -> HttpRequest:
    """The img2img submission; ``body`` is the JSON payload, already encoded."""
    headers = {**JSON_HEADERS, "Authorization": authorization}
    return HttpRequest("POST", base_url + IMG2IMG_PATH, headers, body)


def build_login_request(base_url: str, username: str, password: str) -> HttpRequest:
    """The getToken call that trades a username and password for a token."""
    body = orjson.dumps({"username": username, "password": password})
    return HttpRequest(
        "POST",
        base_url + LOGIN_PATH,
        dict(JSON_HEADERS),
        body,
        max_response_bytes=LOGIN_MAX_RESPONSE_BYTES,
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def parse_retry_after(
    headers: Mapping[str, str], *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, or ``Retry-After``
    as seconds or as an HTTP date (relative to ``now()``, wall-clock). None if absent
    or unreadable; never negative.

    >>> parse_retry_after({"Retry-After": "3"})
    3.0
    """
    milliseconds = _header(headers, "retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = _header(headers, "Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - now()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def status_error_class(effective_code: int) -> type[APIStatusError]:
    """The exception class for a refusal code (HTTP status or body code)."""
    if effective_code in (401, 403):
        return AuthenticationError
    if effective_code == 429:
        return RateLimitError
    if 400 <= effective_code < 500:
        return BadRequestError
    if 500 <= effective_code < 600:
        return ServerError
    return APIStatusError


def _snippet(body: bytes | bytearray) -> str:
    text = body[: _SNIPPET * 4].decode("utf-8", "replace")
    text = _SPACES.sub(" ", _TAGS.sub(" ", text)).strip()
    return text[:_SNIPPET]


def _load(body: bytes | bytearray) -> tuple[Any, str | None]:
    """The decoded JSON and None, or None and what was wrong."""
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError as exc:
        return None, "empty body" if not body.strip() else f"invalid JSON ({exc})"


def _status_error(
    status: int, code: int | None, msg: str, headers: Mapping[str, str], now: Callable[[], float]
) -> APIStatusError:
    effective = status if not 200 <= status < 300 or code is None else code
    cls = status_error_class(effective)
    where = f"HTTP {status}" if code is None else f"HTTP {status}, code {code}"
    return cls(
        f"{where}: {msg}" if msg else where,
        status_code=status,
        code=code,
        msg=msg,
        retry_after=parse_retry_after(headers, now=now),
    )


def _envelope(
    status: int, headers: Mapping[str, str], body: bytes | bytearray, now: Callable[[], float]
) -> tuple[int, str, Any]:
    """Read ``{"code", "msg", "data"}``; raise for anything but body code 200."""
    envelope, problem = _load(body)
    is_object = isinstance(envelope, dict)
    code = envelope.get("code") if is_object else None
    if isinstance(code, bool) or not isinstance(code, int):
        code = None
    raw_msg = envelope.get("msg") if is_object else None
    msg = raw_msg if isinstance(raw_msg, str) else ("" if is_object else _snippet(body))
    msg = truncate_text(msg)

    if 300 <= status < 400:
        # Redirects are not followed: a POST must not turn into a GET elsewhere, nor
        # carry the token to another host.
        location = _header(headers, "Location") or "no Location"
        msg = f"redirected to {location[:_SNIPPET]}; set base_url to the final address"
    if not 200 <= status < 300:
        raise _status_error(status, code, msg, headers, now)
    if problem is not None:
        raise ResponseDecodeError(f"malformed answer: {problem}", status_code=status, path="$")
    if not is_object:
        raise ResponseDecodeError(
            f"malformed answer: expected a JSON object, got {type(envelope).__name__}",
            status_code=status,
            path="$",
        )
    if code is None:
        raise ResponseDecodeError(
            "malformed answer: missing or non-integer code @ $.code"
            f" (got {truncate_text(repr(envelope.get('code')))})",
            status_code=status,
            path="$.code",
        )
    if code != 200:
        raise _status_error(status, code, msg, headers, now)
    return code, msg, envelope.get("data")


def decipher_img2img(
    status: int,
    headers: Mapping[str, str],
    body: bytes | bytearray,
    *,
    now: Callable[[], float] = time.time,
) -> ImageResult:
    """An img2img answer -> :class:`ImageResult`, or the matching exception.

    >>> r = decipher_img2img(200, {}, b'{"code":200,"msg":"ok","data":{"images":[{"url":"https://x/1.png"}]}}')
    >>> r.urls
    ['https://x/1.png']
    """
    code, msg, data = _envelope(status, headers, body, now)
    return ImageResult(images=_images(data, status), code=code, msg=msg)


def _images(data: Any, status: int) -> list[GeneratedImage]:
    """An answer's ``data`` -> its images, strictly, in one walk: the first problem
    is a :class:`ResponseDecodeError` whose message and ``path`` say where.

    Unknown extra fields are tolerated; ``images`` must be a list of objects, each
    with a ``url`` (http(s) with a host) or a ``b64_json`` string, or both. Written
    out rather than a cattrs structure hook: the checks say the first problem and
    its JSON path (``$.data.images[0].url``) without parsing cattrs' messages.
    """
    if not isinstance(data, dict):
        raise _malformed(f"expected an object, got {type(data).__name__}", "$.data", status)
    images = data.get("images")
    if not isinstance(images, list):
        problem = (
            "missing" if "images" not in data else f"expected a list, got {type(images).__name__}"
        )
        raise _malformed(problem, "$.data.images", status)
    return [_image(image, index, status) for index, image in enumerate(images)]


def _image(image: Any, index: int, status: int) -> GeneratedImage:
    if not isinstance(image, dict):
        problem = f"expected an object, got {type(image).__name__}"
        raise _malformed(problem, f"$.data.images[{index}]", status)
    url = _optional_text(image, "url", index, status)
    b64_json = _optional_text(image, "b64_json", index, status)
    if url is None:
        if b64_json is None:
            raise _malformed("image without url or b64_json", f"$.data.images[{index}]", status)
    elif not is_image_url(url):
        problem = "an image URL must be http(s) with a host, got " + truncate_text(repr(url), 200)
        raise _malformed(problem, f"$.data.images[{index}].url", status)
    return GeneratedImage(url=url, b64_json=b64_json)


def _optional_text(image: dict[str, Any], name: str, index: int, status: int) -> str | None:
    value = image.get(name)
    if value is None or isinstance(value, str):
        return value
    path = f"$.data.images[{index}].{name}"
    raise _malformed(f"expected a string or null, got {type(value).__name__}", path, status)


def _malformed(problem: str, path: str, status: int) -> ResponseDecodeError:
    return ResponseDecodeError(
        f"malformed answer: {problem} @ {path}", status_code=status, path=path
    )


def decipher_login(
    status: int,
    headers: Mapping[str, str],
    body: bytes | bytearray,
    *,
    now: Callable[[], float] = time.time,
) -> str:
    """A getToken answer -> the ``Authorization`` header value to use.

    Refused credentials are an :class:`AuthenticationError` whatever body code the
    backend picks for them (RuoYi services often say 500 for a wrong password), so
    a wrong password is never retried. 429 and HTTP-level failures keep their class.
    """
    try:
        _, _, data = _envelope(status, headers, body, now)
    except APIStatusError as exc:
        if 200 <= status < 300 and not isinstance(exc, RateLimitError):
            raise AuthenticationError(
                f"login refused: {exc.msg or exc}",
                status_code=exc.status_code,
                code=exc.code,
                msg=exc.msg,
            ) from None
        raise
    if isinstance(data, str):
        try:
            return authorization_value(data)
        except ValidationError:
            pass
    raise ResponseDecodeError(
        "malformed login answer: expected the token string (no control characters) @ $.data",
        status_code=status,
        path="$.data",
    )
