"""What the mock server answers: the envelope, each fault kind, the refusals
(a refused token, the rate limit) and a success, decided before anything is sent."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
import orjson

from ._png import png_for_name

__all__ = [
    "Answer",
    "AuthFailureStyle",
    "FAULT_KINDS",
    "OK_MSG",
    "RateLimitStyle",
    "auth_refusal",
    "envelope",
    "fault_answer",
    "format_retry_after",
    "rate_limit_refusal",
    "success",
]

RateLimitStyle = Literal["http", "body"]
AuthFailureStyle = Literal["body", "http"]

#: Every fault kind the server can inject, sorted.
FAULT_KINDS: Final[tuple[str, ...]] = (
    "body_400",
    "body_401",
    "body_403",
    "body_429",
    "body_500",
    "drop",
    "empty",
    "http_400",
    "http_429",
    "http_500",
    "http_502",
    "http_503",
    "http_504",
    "malformed",
    "not_object",
    "slow",
)

OK_MSG: Final = "Operation successful"

_BAD_GATEWAY_HTML: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
# The RuoYi style: HTTP 200 and the failure in the body code.
_BODY_FAULTS: Final[dict[str, tuple[int, str]]] = {
    "body_400": (400, "bad parameter"),
    "body_401": (401, "token invalid or expired"),
    "body_403": (403, "forbidden"),
    "body_429": (429, "too many requests"),
    "body_500": (500, "internal server error"),
}
# The gateway style: the HTTP status says it, and the body repeats it.
_HTTP_FAULTS: Final[dict[str, tuple[int, str]]] = {
    "http_400": (400, "bad request"),
    "http_429": (429, "too many requests"),
    "http_500": (500, "internal server error"),
    "http_503": (503, "service unavailable"),
    "http_504": (504, "gateway timeout"),
}


@attrs.frozen
class Answer:
    """An answer decided at arrival: sent after ``delay`` seconds, or the
    connection closed without a byte when ``drop``."""

    status: int
    body: bytes
    fault: str | None = None
    code: int | None = None
    urls: tuple[str, ...] = ()
    content_type: str = "application/json"
    retry_after: str | None = None
    delay: float = 0.0
    drop: bool = False


def envelope(code: int, msg: str, data: Any = None) -> bytes:
    """The ``{"code", "msg", "data"}`` body every answer has."""
    return orjson.dumps({"code": code, "msg": msg, "data": data})


def format_retry_after(seconds: float | None) -> str | None:
    """A ``Retry-After`` value: whole seconds as an integer, else a decimal; None: no header."""
    if seconds is None:
        return None
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def auth_refusal(style: AuthFailureStyle, delay: float) -> Answer:
    """A refused token: body code 401 under HTTP 200 (``body``) or HTTP 401."""
    status = 401 if style == "http" else 200
    body = envelope(401, "token invalid or expired")
    return Answer(status, body, fault="auth", code=401, delay=delay)


def rate_limit_refusal(style: RateLimitStyle, retry_after: float | None, delay: float) -> Answer:
    """A refusal by the server's rate limit: HTTP 429 (with ``Retry-After`` unless
    ``retry_after`` is None), or HTTP 200 with body code 429 and no header."""
    body = envelope(429, "too many requests")
    if style == "http":
        header = format_retry_after(retry_after)
        return Answer(429, body, fault="rate_limited", code=429, retry_after=header, delay=delay)
    return Answer(200, body, fault="rate_limited", code=429, delay=delay)


def fault_answer(fault: str, *, base_url: str, retry_after: float | None, delay: float) -> Answer:
    """The answer of an injected fault (any of :data:`FAULT_KINDS` but ``slow``,
    which delays a normal answer)."""
    if fault == "drop":
        return Answer(0, b"", fault=fault, drop=True)
    if fault in _BODY_FAULTS:
        code, msg = _BODY_FAULTS[fault]
        return Answer(200, envelope(code, msg), fault=fault, code=code, delay=delay)
    if fault in _HTTP_FAULTS:
        code, msg = _HTTP_FAULTS[fault]
        header = format_retry_after(retry_after) if code == 429 else None
        body = envelope(code, msg)
        return Answer(code, body, fault=fault, code=code, retry_after=header, delay=delay)
    if fault == "http_502":
        return Answer(502, _BAD_GATEWAY_HTML, fault=fault, content_type="text/html", delay=delay)
    if fault == "malformed":
        whole = envelope(200, OK_MSG, {"images": [{"url": f"{base_url}/files/x.png"}]})
        return Answer(200, whole[: len(whole) // 2], fault=fault, delay=delay)
    if fault == "empty":
        return Answer(200, b"", fault=fault, delay=delay)
    if fault == "not_object":
        return Answer(200, orjson.dumps([{"code": 200, "msg": OK_MSG}]), fault=fault, delay=delay)
    raise AssertionError(f"unhandled fault {fault!r}")  # pragma: no cover


def success(
    index: int, fields: Mapping[str, Any], *, base_url: str, fault: str | None, delay: float
) -> tuple[Answer, list[str]]:
    """The answer to a valid request, and the names of the files its URLs point to
    (none for ``b64_json``, whose images travel in the answer)."""
    names = [f"{index}-{k}" for k in range(fields["n"])]
    if fields.get("responseFormat") == "b64_json":
        images: list[dict[str, str]] = [
            {"b64_json": base64.b64encode(png_for_name(name)).decode("ascii")} for name in names
        ]
        urls: tuple[str, ...] = ()
        names = []
    else:
        urls = tuple(f"{base_url}/files/{name}.png" for name in names)
        images = [{"url": url} for url in urls]
    body = envelope(200, OK_MSG, {"images": images})
    return Answer(200, body, fault=fault, code=200, urls=urls, delay=delay), names
