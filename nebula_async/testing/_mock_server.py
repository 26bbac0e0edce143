"""The implementation of :class:`nebula_async.testing.MockNebulaServer`.

A real aiohttp server on loopback that speaks the Nebula v4 wire protocol (DESIGN
section 1) with knobs for latency, fault injection, a server-side rate limit and
token expiry. The payload check here is written independently from the client's
codec on purpose: it is the independent check of it.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, Self

import attrs
import orjson
from aiohttp import web

from ._png import png_for_name

__all__ = [
    "FAULT_KINDS",
    "IMG2IMG_PATH",
    "MockNebulaServer",
    "ReceivedRequest",
    "TOKEN_PATH",
    "check_payload",
]

PayloadStyle = Literal["dotted", "nested", "flat", "any"]
RateLimitStyle = Literal["http", "body"]
AuthFailureStyle = Literal["body", "http"]

IMG2IMG_PATH: Final = "/prod-api/nebula/v4/api/img2imgSubmit"
TOKEN_PATH: Final = "/prod-api/v3/auth/getToken"

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
_FAULT_SET: Final = frozenset(FAULT_KINDS)

_PREFIX: Final = "batchImageGenerationDTO"
_OK_MSG: Final = "Operation successful"
# Request bodies may carry a data: URI image of several MB; aiohttp's default cap is 1 MiB.
_CLIENT_MAX_SIZE: Final = 256 * 1024 * 1024
_SHUTDOWN_TIMEOUT: Final = 0.5

_BAD_GATEWAY_HTML: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# --------------------------------------------------------------------------- payload check


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python, but JSON true is not a number on the wire.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_object(v: Any) -> bool:
    return isinstance(v, dict)


# camelCase wire key -> (required, check, what the check wants)
_FIELDS: Final[dict[str, tuple[bool, Callable[[Any], bool], str]]] = {
    "model": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "prompt": (True, _is_str, "a string"),
    "n": (True, lambda v: _is_int(v) and 1 <= v <= 15, "an integer from 1 to 15"),
    "size": (True, _is_str, "a string"),
    "temperature": (True, _is_int, "an integer"),
    "watermark": (True, lambda v: isinstance(v, bool), "a boolean"),
    "image": (False, _is_str, "a string"),
    "promptOptions": (False, _is_object, "an object"),
    "optimizePrompt": (False, _is_str, "a string"),
    "quality": (False, _is_str, "a string"),
    "responseFormat": (
        False,
        lambda v: isinstance(v, str) and v in ("url", "b64_json"),
        '"url" or "b64_json"',
    ),
    "score": (False, _is_number, "a number"),
    "sequentialImageGeneration": (False, _is_str, "a string"),
    "sequentialImageGenerationOptions": (False, _is_object, "an object"),
}
_SNAKE_TO_CAMEL: Final = {re.sub(r"([A-Z])", r"_\1", k).lower(): k for k in _FIELDS}


def _detect_style(payload: Mapping[str, Any]) -> Literal["dotted", "nested", "flat"]:
    if _PREFIX in payload:
        return "nested"
    if any(k.startswith(_PREFIX + ".") for k in payload):
        return "dotted"
    return "flat"


def _shown(v: Any) -> str:
    text = orjson.dumps(v).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def check_payload(payload: Any, style: PayloadStyle) -> tuple[dict[str, Any], list[str]]:
    """Check an img2img body against the wire schema of ``style``.

    Returns the fields by camelCase key and the list of problems (empty when the
    body is valid); each problem names the full wire key.
    """
    if not isinstance(payload, dict):
        return {}, ["request body must be a JSON object"]
    if style == "any":
        style = _detect_style(payload)
    problems: list[str] = []
    fields: dict[str, Any] = {}
    prefix = ""
    if style == "flat":
        fields = payload
    elif style == "dotted":
        prefix = _PREFIX + "."
        for key, value in payload.items():
            if key.startswith(prefix) and len(key) > len(prefix):
                fields[key[len(prefix) :]] = value
            else:
                problems.append(f"unknown field {key}")
    else:  # nested
        prefix = _PREFIX + "."
        problems.extend(f"unknown field {key}" for key in payload if key != _PREFIX)
        if _PREFIX not in payload:
            problems.append(f"missing required field {_PREFIX}")
            return {}, problems
        inner = payload[_PREFIX]
        if not isinstance(inner, dict):
            problems.append(f"{_PREFIX} must be an object, got {_shown(inner)}")
            return {}, problems
        fields = inner
    for key, value in fields.items():
        spec = _FIELDS.get(key)
        if spec is None:
            problems.append(f"unknown field {prefix}{key}")
        elif not spec[1](value):
            problems.append(f"{prefix}{key} must be {spec[2]}, got {_shown(value)}")
    problems.extend(
        f"missing required field {prefix}{key}"
        for key, (required, _, _) in _FIELDS.items()
        if required and key not in fields
    )
    return fields, problems


# --------------------------------------------------------------------------- records


def _redact(value: str | None) -> str:
    # Keep the scheme words (so a doubled "Bearer Bearer" stays visible) but never the secret.
    if value is None:
        return "None"
    head, _, _secret = value.rpartition(" ")
    return repr(f"{head} ***" if head else "***")


@attrs.frozen
class ReceivedRequest:
    """One img2img request the mock server received, and what it answered.

    ``payload`` is the decoded JSON body (None when the body was not a JSON
    object); ``fault`` the fault injected into the answer (one of
    :data:`FAULT_KINDS`, ``"rate_limited"`` or ``"auth"``), or None; ``status``
    the HTTP status sent (0 for a dropped connection: the ``drop`` fault, or the
    server closed before answering); ``code`` the body code sent, if any;
    ``urls`` the image URLs in the answer. The record is made when the request
    arrives, with the answer already decided; the answer itself is sent after the
    configured latency.
    """

    index: int
    payload: dict[str, Any] | None
    authorization: str | None = attrs.field(repr=_redact)
    fault: str | None
    status: int
    code: int | None
    urls: tuple[str, ...]
    received_at: float

    def field(self, name: str) -> Any:
        """Return a request field by its snake_case (or camelCase) name, whatever the
        payload style; None when the field was not sent.

        Raises KeyError for a name that is not an img2img field.
        """
        camel = _SNAKE_TO_CAMEL.get(name) or (name if name in _FIELDS else None)
        if camel is None:
            raise KeyError(f"unknown img2img field {name!r}; known: {sorted(_SNAKE_TO_CAMEL)}")
        payload = self.payload
        if payload is None:
            return None
        dotted = f"{_PREFIX}.{camel}"
        if dotted in payload:
            return payload[dotted]
        inner = payload.get(_PREFIX)
        if isinstance(inner, dict):
            return inner.get(camel)
        return payload.get(camel)


@attrs.frozen
class _Answer:
    status: int
    body: bytes
    fault: str | None = None
    code: int | None = None
    urls: tuple[str, ...] = ()
    content_type: str = "application/json"
    retry_after: str | None = None
    delay: float = 0.0
    drop: bool = False


def _envelope(code: int, msg: str, data: Any = None) -> bytes:
    return orjson.dumps({"code": code, "msg": msg, "data": data})


_BODY_FAULTS: Final[dict[str, tuple[int, str]]] = {
    "body_400": (400, "bad parameter"),
    "body_401": (401, "token invalid or expired"),
    "body_403": (403, "forbidden"),
    "body_429": (429, "too many requests"),
    "body_500": (500, "internal server error"),
}
_HTTP_FAULTS: Final[dict[str, tuple[int, str]]] = {
    "http_400": (400, "bad request"),
    "http_429": (429, "too many requests"),
    "http_500": (500, "internal server error"),
    "http_503": (503, "service unavailable"),
    "http_504": (504, "gateway timeout"),
}


# --------------------------------------------------------------------------- knob checks


def _choice(name: str, allowed: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        return value

    return check


def _non_negative(name: str, *, optional: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        return float(value)

    return check


def _check_latency(value: Any) -> float | tuple[float, float]:
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"latency range must be (lo, hi), got {value!r}")
        lo, hi = (_non_negative("latency")(v) for v in value)
        if lo > hi:
            raise ValueError(f"latency range needs lo <= hi, got {value!r}")
        return (lo, hi)
    result: float = _non_negative("latency")(value)
    return result


def _check_faults(value: Any) -> Mapping[str, float]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ValueError(f"faults must be a mapping of fault kind to probability, got {value!r}")
    checked: dict[str, float] = {}
    for kind in sorted(value):  # sorted: the draw does not depend on insertion order
        if kind not in _FAULT_SET:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        prob = value[kind]
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0 <= prob <= 1:
            raise ValueError(f"probability of fault {kind!r} must be in [0, 1], got {prob!r}")
        checked[kind] = float(prob)
    if sum(checked.values()) > 1 + 1e-9:
        raise ValueError(f"fault probabilities sum to {sum(checked.values()):g} > 1")
    # Read-only: an in-place edit would bypass this check.
    return MappingProxyType(checked)


def _check_fault_entry(entry: Any) -> str | None:
    if entry is not None and entry not in _FAULT_SET:
        raise ValueError(f"unknown fault kind {entry!r}; known: {', '.join(FAULT_KINDS)}")
    return entry  # type: ignore[no-any-return]


def _check_fault_script(value: Any) -> Iterator[str | None] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError("fault_script must be an iterable of fault kinds, not a string")
    if isinstance(value, Collection):
        # A finite script is checked in full now; an endless iterator entry by entry.
        return iter([_check_fault_entry(e) for e in value])
    return (_check_fault_entry(e) for e in value)


def _check_optional_int(
    name: str, minimum: int, *, optional: bool, maximum: int | None = None
) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
        return value

    return check


def _check_rate_limit(value: Any) -> float | None:
    if value is None:
        return None
    checked: float = _non_negative("rate_limit")(value)
    if checked <= 0:
        raise ValueError(f"rate_limit must be > 0 (or None), got {value!r}")
    return checked


def _check_token(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError("token must be a non-empty string or None")
    # Accept "Bearer x" as well as "x": the header the server wants is "Bearer x" either way.
    return value.removeprefix("Bearer ")


def _check_str(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value

    return check


def _check_bool(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
        return value

    return check


_KNOBS: Final[dict[str, Callable[[Any], Any]]] = {
    "host": _check_str("host"),
    "port": _check_optional_int("port", 0, optional=False, maximum=65535),
    "payload_style": _choice("payload_style", ("dotted", "nested", "flat", "any")),
    "latency": _check_latency,
    "faults": _check_faults,
    "fault_script": _check_fault_script,
    "rate_limit": _check_rate_limit,
    "rate_limit_burst": _check_optional_int("rate_limit_burst", 1, optional=False),
    "rate_limit_style": _choice("rate_limit_style", ("http", "body")),
    "retry_after": _non_negative("retry_after", optional=True),
    "username": _check_str("username"),
    "password": _check_str("password"),
    "token": _check_token,
    "token_ttl_uses": _check_optional_int("token_ttl_uses", 0, optional=True),
    "auth_failure_style": _choice("auth_failure_style", ("body", "http")),
    "slow_s": _non_negative("slow_s"),
    "seed": lambda v: v if v is None else _check_optional_int("seed", -(2**63), optional=False)(v),
    "lean": _check_bool("lean"),
}
# Public attributes a test may reset (``server.requests.clear()``, ``server.max_in_flight = 0``).
_COUNTERS: Final = frozenset(
    {"requests", "logins", "login_attempts", "max_in_flight", "request_count"}
)


def _format_retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


# --------------------------------------------------------------------------- the server


class MockNebulaServer:
    """A Nebula v4 API on loopback (a real aiohttp server) for tests, demos and benchmarks.

    It serves ``POST /prod-api/v3/auth/getToken``, ``POST
    /prod-api/nebula/v4/api/img2imgSubmit`` and ``GET /files/<name>.png`` (the
    images its answers point to). For each img2img request, in this order: the
    arrival is recorded, the ``Authorization`` header is checked, the server rate
    limit is applied, a fault is chosen (the next ``fault_script`` entry, else a
    seeded random draw from ``faults``), the payload is validated; then the
    answer is sent after ``latency``. A request refused for auth or the rate
    limit consumes no script entry and no random draw.

    Every knob is also a mutable attribute, checked on assignment (an unknown fault
    kind raises ValueError), so a test can change ``server.faults``,
    ``server.latency``, ``server.rate_limit``... mid-run. Assigning ``seed``
    reseeds the fault and latency draws (two separate streams, so latencies never
    shift the fault sequence). ``expire_tokens()`` invalidates the tokens issued so far.

    Example::

        async with MockNebulaServer(faults={"http_503": 0.2}, latency=0.01) as server:
            async with na.NebulaClient(token="mock-token", base_url=server.base_url) as c:
                report = await c.run_batch(jobs)
            assert server.request_count == report.attempts
            print(server.requests[0].field("prompt"))

    ``lean=True`` is a benchmark mode: no validation, faults, rate limit or
    records (only the counters), a precomputed answer with one URL, and a plain
    header check for auth; ``latency`` still applies.
    """

    # Knob types as read; assignment goes through the checks in ``_KNOBS``.
    host: str
    port: int
    payload_style: PayloadStyle
    latency: float | tuple[float, float]
    faults: Mapping[str, float] | None
    fault_script: Iterable[str | None] | None
    rate_limit: float | None
    rate_limit_burst: int
    rate_limit_style: RateLimitStyle
    retry_after: float | None
    username: str
    password: str
    token: str | None
    token_ttl_uses: int | None
    auth_failure_style: AuthFailureStyle
    slow_s: float
    seed: int | None
    lean: bool

    requests: list[ReceivedRequest]
    logins: int
    login_attempts: int
    max_in_flight: int
    request_count: int

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        payload_style: PayloadStyle = "dotted",
        latency: float | tuple[float, float] = 0.0,
        faults: Mapping[str, float] | None = None,
        fault_script: Iterable[str | None] | None = None,
        rate_limit: float | None = None,
        rate_limit_burst: int = 1,
        rate_limit_style: RateLimitStyle = "http",
        retry_after: float | None = 1.0,
        username: str = "demo",
        password: str = "demo-password",
        token: str | None = "mock-token",
        token_ttl_uses: int | None = None,
        auth_failure_style: AuthFailureStyle = "body",
        slow_s: float = 5.0,
        seed: int | None = 0,
        lean: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.payload_style = payload_style
        self.latency = latency
        self.faults = faults
        self.fault_script = fault_script
        self.rate_limit = rate_limit
        self.rate_limit_burst = rate_limit_burst
        self.rate_limit_style = rate_limit_style
        self.retry_after = retry_after
        self.username = username
        self.password = password
        self.token = token
        self.token_ttl_uses = token_ttl_uses
        self.auth_failure_style = auth_failure_style
        self.slow_s = slow_s
        self.seed = seed  # also seeds the random sources (see __setattr__)
        self.lean = lean

        self.requests = []
        self.logins = 0
        self.login_attempts = 0
        self.max_in_flight = 0
        self.request_count = 0

        self._in_flight = 0
        self._issued: dict[str, int] = {}  # "Bearer <token>" -> img2img uses
        self._tat = -math.inf  # GCRA theoretical arrival time
        self._files: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._closed = False
        self._lean_ok = b""

    def __setattr__(self, name: str, value: Any) -> None:
        check = _KNOBS.get(name)
        if check is not None:
            value = check(value)
        elif not name.startswith("_") and name not in _COUNTERS:
            # Catch a mistyped knob (``server.fualts = ...``) instead of silently ignoring it.
            raise AttributeError(f"MockNebulaServer has no knob {name!r}")
        object.__setattr__(self, name, value)
        if name == "seed":
            # Separate streams: drawing latencies must not shift the fault sequence.
            self._fault_rng = random.Random(value)
            self._latency_rng = random.Random(None if value is None else f"latency:{value}")

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"<MockNebulaServer {where} requests={self.request_count} logins={self.logins}>"

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, valid once the server is started."""
        if self._base_url is None:
            raise RuntimeError("MockNebulaServer is not started (use 'async with' or start())")
        return self._base_url

    @property
    def in_flight(self) -> int:
        """The number of img2img requests being handled right now."""
        return self._in_flight

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind and start serving. A server can be started once."""
        if self._runner is not None or self._closed:
            raise RuntimeError("a MockNebulaServer can be started only once")
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
        app.router.add_post(TOKEN_PATH, self._handle_token)
        app.router.add_post(IMG2IMG_PATH, self._handle_img2img)
        app.router.add_get("/files/{name}", self._handle_file)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            address = runner.addresses[0]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host = str(address[0])
        self._base_url = (
            f"http://[{host}]:{address[1]}" if ":" in host else f"http://{host}:{address[1]}"
        )
        self._files.add("lean-0")
        self._lean_ok = _envelope(
            200, _OK_MSG, {"images": [{"url": f"{self._base_url}/files/lean-0.png"}]}
        )

    async def aclose(self) -> None:
        """Stop serving and close every connection, in-flight requests included.

        A request still waiting for its answer (latency, ``slow``) has its connection
        dropped, as a real server going away would. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        # Wake every handler sleeping in latency or "slow" so shutdown does not wait for them.
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        # Handlers whose client had already gone are not tracked by aiohttp any more:
        # wait for them here so no task outlives the server.
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=_SHUTDOWN_TIMEOUT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # Let the transports' connection_lost callbacks run before the caller moves on.
        await asyncio.sleep(0)

    def expire_tokens(self) -> None:
        """Invalidate every token issued by getToken so far (the static token stays valid)."""
        self._issued.clear()

    # ------------------------------------------------------------------ helpers

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _draw_latency(self) -> float:
        latency = self.latency
        if isinstance(latency, tuple):
            return self._latency_rng.uniform(*latency)
        return latency

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False when the server started closing meanwhile."""
        if self._closing.is_set():
            return False
        if delay <= 0:
            return True
        try:
            async with asyncio.timeout(delay):
                await self._closing.wait()
        except TimeoutError:
            return True
        return False

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        # Close without a byte of answer. aiohttp then fails to write the response
        # below and treats it as a client disconnect: no error logged, no traceback.
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=500)

    def _authorized(self, header: str | None) -> bool:
        if header is None:
            return False
        if self.token is not None and header == "Bearer " + self.token:
            return True
        uses = self._issued.get(header)
        if uses is None:
            return False
        uses += 1
        self._issued[header] = uses
        return self.token_ttl_uses is None or uses <= self.token_ttl_uses

    def _rate_limited(self, now: float) -> bool:
        # GCRA: one request per 1/rate seconds, with rate_limit_burst of tolerance.
        rate = self.rate_limit
        if rate is None:
            return False
        interval = 1.0 / rate
        tolerance = (self.rate_limit_burst - 1) * interval
        tat = max(self._tat, now)
        if tat - now > tolerance + 1e-9:
            return True
        self._tat = tat + interval
        return False

    def _next_fault(self) -> str | None:
        script = self.fault_script
        if script is not None:
            try:
                return next(iter(script))
            except StopIteration:
                object.__setattr__(self, "fault_script", None)
        faults = self.faults
        if faults:
            draw = self._fault_rng.random()
            total = 0.0
            for kind, prob in faults.items():
                total += prob
                if draw < total:
                    return kind
        return None

    def _auth_refusal(self, delay: float) -> _Answer:
        status = 401 if self.auth_failure_style == "http" else 200
        return _Answer(
            status,
            _envelope(401, "token invalid or expired"),
            fault="auth",
            code=401,
            delay=delay,
        )

    def _retry_after_header(self) -> str | None:
        return None if self.retry_after is None else _format_retry_after(self.retry_after)

    def _fault_answer(self, fault: str, delay: float) -> _Answer:
        if fault == "drop":
            return _Answer(0, b"", fault=fault, drop=True)
        if fault in _BODY_FAULTS:
            code, msg = _BODY_FAULTS[fault]
            return _Answer(200, _envelope(code, msg), fault=fault, code=code, delay=delay)
        if fault in _HTTP_FAULTS:
            code, msg = _HTTP_FAULTS[fault]
            retry_after = self._retry_after_header() if code == 429 else None
            return _Answer(
                code,
                _envelope(code, msg),
                fault=fault,
                code=code,
                retry_after=retry_after,
                delay=delay,
            )
        if fault == "http_502":
            return _Answer(
                502, _BAD_GATEWAY_HTML, fault=fault, content_type="text/html", delay=delay
            )
        if fault == "malformed":
            whole = _envelope(200, _OK_MSG, {"images": [{"url": f"{self.base_url}/files/x.png"}]})
            return _Answer(200, whole[: len(whole) // 2], fault=fault, delay=delay)
        if fault == "empty":
            return _Answer(200, b"", fault=fault, delay=delay)
        if fault == "not_object":
            body = orjson.dumps([{"code": 200, "msg": _OK_MSG}])
            return _Answer(200, body, fault=fault, delay=delay)
        raise AssertionError(f"unhandled fault {fault!r}")  # pragma: no cover

    def _success(
        self, index: int, fields: Mapping[str, Any], fault: str | None, delay: float
    ) -> _Answer:
        names = [f"{index}-{k}" for k in range(fields["n"])]
        if fields.get("responseFormat") == "b64_json":
            images: list[dict[str, str]] = [
                {"b64_json": base64.b64encode(png_for_name(name)).decode("ascii")} for name in names
            ]
            urls: tuple[str, ...] = ()
        else:
            urls = tuple(f"{self.base_url}/files/{name}.png" for name in names)
            images = [{"url": url} for url in urls]
            self._files.update(names)
        return _Answer(
            200,
            _envelope(200, _OK_MSG, {"images": images}),
            fault=fault,
            code=200,
            urls=urls,
            delay=delay,
        )

    def _decide(self, index: int, payload: Any, authorization: str | None, now: float) -> _Answer:
        # All synchronous: the answer is fixed at arrival, in arrival order.
        if not self._authorized(authorization):
            return self._auth_refusal(self._draw_latency())
        if self._rate_limited(now):
            if self.rate_limit_style == "http":
                return _Answer(
                    429,
                    _envelope(429, "too many requests"),
                    fault="rate_limited",
                    code=429,
                    retry_after=self._retry_after_header(),
                    delay=self._draw_latency(),
                )
            return _Answer(
                200,
                _envelope(429, "too many requests"),
                fault="rate_limited",
                code=429,
                delay=self._draw_latency(),
            )
        fault = self._next_fault()
        if fault is not None and fault != "slow":
            delay = 0.0 if fault == "drop" else self._draw_latency()
            return self._fault_answer(fault, delay)
        delay = self._draw_latency() + (self.slow_s if fault == "slow" else 0.0)
        fields, problems = check_payload(payload, self.payload_style)
        if problems:
            msg = "bad parameter: " + "; ".join(problems)
            return _Answer(200, _envelope(400, msg), fault=fault, code=400, delay=delay)
        return self._success(index, fields, fault, delay)

    async def _send(
        self, request: web.Request, answer: _Answer, record: ReceivedRequest | None = None
    ) -> web.Response:
        if answer.drop:
            return self._drop(request)
        if not await self._sleep(answer.delay):
            # The server is closing: the answer will never go out, so say so in the record.
            if record is not None:
                self._replace_record(record, attrs.evolve(record, status=0))
            return self._drop(request)
        headers = {"Retry-After": answer.retry_after} if answer.retry_after is not None else None
        return web.Response(
            status=answer.status,
            body=answer.body,
            content_type=answer.content_type,
            headers=headers,
        )

    def _replace_record(self, old: ReceivedRequest, new: ReceivedRequest) -> None:
        # Search from the end: the record is recent, and a test may have cleared the list.
        records = self.requests
        for i in range(len(records) - 1, -1, -1):
            if records[i] is old:
                records[i] = new
                return

    # ------------------------------------------------------------------ handlers

    async def _handle_img2img(self, request: web.Request) -> web.Response:
        self._track()
        self._in_flight += 1
        if self._in_flight > self.max_in_flight:
            self.max_in_flight = self._in_flight
        try:
            if self.lean:
                return await self._lean_img2img(request)
            body = await request.read()
            now = time.monotonic()
            try:
                payload: Any = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
            authorization = request.headers.get("Authorization")
            index = self.request_count
            answer = self._decide(index, payload, authorization, now)
            record = ReceivedRequest(
                index=index,
                payload=payload if isinstance(payload, dict) else None,
                authorization=authorization,
                fault=answer.fault,
                status=answer.status,
                code=answer.code,
                urls=answer.urls,
                received_at=now,
            )
            self.request_count = index + 1
            self.requests.append(record)
            return await self._send(request, answer, record)
        finally:
            self._in_flight -= 1

    async def _lean_img2img(self, request: web.Request) -> web.Response:
        await request.read()
        self.request_count += 1
        header = request.headers.get("Authorization")
        if (self.token is not None and header == "Bearer " + self.token) or (
            header is not None and header in self._issued
        ):
            answer = _Answer(200, self._lean_ok, delay=self._draw_latency())
        else:
            answer = self._auth_refusal(self._draw_latency())
        return await self._send(request, answer)

    async def _handle_token(self, request: web.Request) -> web.Response:
        self._track()
        body = await request.read()
        self.login_attempts += 1
        try:
            creds: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            creds = None
        if (
            not isinstance(creds, dict)
            or not isinstance(creds.get("username"), str)
            or not isinstance(creds.get("password"), str)
        ):
            answer = _Answer(200, _envelope(400, "bad parameter: username and password required"))
        elif creds["username"] == self.username and creds["password"] == self.password:
            token = "Bearer " + secrets.token_urlsafe(24)
            self._issued[token] = 0
            self.logins += 1
            answer = _Answer(200, _envelope(200, _OK_MSG, token))
        else:
            answer = _Answer(200, _envelope(401, "username or password incorrect"))
        return await self._send(request, attrs.evolve(answer, delay=self._draw_latency()))

    async def _handle_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        stem = name.removesuffix(".png")
        if stem == name or stem not in self._files:
            raise web.HTTPNotFound(text=f"no such file: {name}")
        return web.Response(body=png_for_name(stem), content_type="image/png")
