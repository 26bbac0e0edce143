""":class:`MockNebulaServer`: its knobs, its lifecycle and its request handlers.

A real aiohttp server on loopback that speaks the Nebula v4 wire protocol (DESIGN
section 1). What it checks and answers lives beside it: the payload check in
``_payload``, the answers in ``_answers``, the rate limits in ``_ratelimit``, the
records in ``_records``, the knob checks and flag syntax in ``_knobs``; each
knob's field (validator, default, help in ``metadata``) is its one spelling, from
which ``_command`` builds the ``nebula-async mock-server`` flags.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Final, Self, get_args

import attrs
import orjson
from aiohttp import web

from . import _answers
from ._answers import OK_MSG, Answer, AuthFailureStyle, RateLimitStyle, envelope
from ._knobs import (
    cli,
    empty_is_none,
    fault_script_iterator,
    freeze_faults,
    integer,
    is_bool,
    is_str,
    latency_tuple,
    nullable,
    number,
    one_of,
    or_none,
    parse_fault,
    parse_int,
    parse_latency,
    parse_loopback,
    parse_number,
    parse_schedule,
    schedule_tuple,
    strip_bearer,
    valid_faults,
    valid_latency,
    valid_schedule,
    valid_token,
)
from ._payload import PayloadStyle, check_payload
from ._png import png_for_name
from ._ratelimit import ALGORITHMS, RateLimitAlgorithm, ServerLimit, make_limit
from ._records import ReceivedRequest

__all__ = [
    "IMG2IMG_PATH",
    "MockNebulaServer",
    "TOKEN_PATH",
]

IMG2IMG_PATH: Final = "/prod-api/nebula/v4/api/img2imgSubmit"
TOKEN_PATH: Final = "/prod-api/v3/auth/getToken"

# Request bodies may carry a data: URI image of several MB; aiohttp's default cap is 1 MiB.
_CLIENT_MAX_SIZE: Final = 256 * 1024 * 1024
_SHUTDOWN_TIMEOUT: Final = 0.5


class _Draws:
    """The seeded random draws: two streams, so drawing latencies never shifts the
    fault sequence."""

    def __init__(self, seed: int | None) -> None:
        self.faults = random.Random(seed)
        self.latency = random.Random(None if seed is None else f"latency:{seed}")


# Hooks run on assignment after the knob's check (attrs on_setattr), for knobs whose
# change must reach derived state.
def _reseed(server: MockNebulaServer, _field: attrs.Attribute[Any], seed: Any) -> Any:
    server._draws = _Draws(seed)
    return seed


def _restart_limit(server: MockNebulaServer, _field: attrs.Attribute[Any], value: Any) -> Any:
    # A new algorithm, window or burst starts from a clean state at the next arrival.
    server._limit = None
    return value


def _restart_schedule(server: MockNebulaServer, _field: attrs.Attribute[Any], value: Any) -> Any:
    server._schedule_next = 0
    return value


def _then(hook: Any) -> Any:
    return attrs.setters.pipe(attrs.setters.convert, attrs.setters.validate, hook)


@attrs.define(kw_only=True, eq=False, repr=False)
class MockNebulaServer:
    """A Nebula v4 API on loopback (a real aiohttp server) for tests, demos and benchmarks.

    It serves ``POST /prod-api/v3/auth/getToken``, ``POST
    /prod-api/nebula/v4/api/img2imgSubmit`` and ``GET /files/<name>.png`` (the
    images its answers point to). For each img2img request, in this order: the
    arrival is recorded, the ``Authorization`` header is checked, the server rate
    limit is applied, a fault is chosen (the next ``fault_script`` entry, else a
    seeded random draw from ``faults``), the payload is validated; then the
    answer is sent after ``latency``. A request refused for auth or by the rate
    limit consumes no script entry and no random draw; only the requests the
    rate limit admits count against it (a refused token is answered before the
    limit is consulted, a refusal by the limit does not use up the window).

    Knobs (keyword-only; each is also an attribute, checked again on assignment, so
    a test may change ``server.faults``, ``server.latency``, ``server.rate_limit``...
    mid-run; a bad value raises ValueError naming the knob, a mistyped name
    AttributeError):

    - ``host``, ``port``: where to listen (loopback; port 0 picks a free one).
    - ``payload_style``: the img2img body accepted, ``dotted``, ``nested``, ``flat``
      or ``any``.
    - ``latency``: seconds before each answer, fixed or a ``(lo, hi)`` range.
    - ``faults``: fault kind -> probability per request (:data:`FAULT_KINDS`);
      ``fault_script``: fault kinds (or None for a normal answer) to inject first,
      in order, one per request; any iterable, endless ones included.
    - ``rate_limit``: the server's limit in img2img requests per second, or None;
      ``rate_limit_algorithm``: ``gcra`` (default; ``rate_limit_burst`` requests at
      once), ``sliding_window`` (at most ``floor(rate_limit * rate_limit_window_s)``,
      at least 1, admitted in any ``rate_limit_window_s`` seconds) or
      ``fixed_window`` (as many per window, the count reset every
      ``rate_limit_window_s`` seconds from the start); ``rate_limit_schedule``:
      ``(at_s, rate_limit)`` pairs that assign ``rate_limit`` when ``at_s`` seconds
      have passed since the start (applied at the first arrival after that time).
      Changing ``rate_limit`` keeps the limit's state; changing the algorithm,
      window or burst starts it afresh.
    - ``rate_limit_style``: a refusal is HTTP 429 with a ``Retry-After`` of
      ``retry_after`` seconds (no header when it is None) (``http``), or HTTP 200
      with body code 429 and no header (``body``). ``retry_after`` also applies to
      the ``http_429`` fault.
    - ``username``, ``password``: getToken's credentials; ``token``: a static token
      always accepted (None: none); ``token_ttl_uses``: getToken tokens expire after
      this many img2img uses; ``auth_failure_style``: a refused token is HTTP 200 +
      body code 401 (``body``) or HTTP 401 (``http``).
    - ``slow_s``: what the ``slow`` fault adds to the latency; ``seed``: seeds the
      fault and latency draws (None: random; assigning it reseeds them).
    - ``lean``: a benchmark mode: no validation, faults, rate limit or records (only
      the counters), a precomputed answer with one URL, a plain header check for
      auth; ``latency`` still applies.

    ``requests`` holds a :class:`ReceivedRequest` per img2img request, refusals
    included; ``request_count``, ``logins``, ``login_attempts`` and
    ``max_in_flight`` count; a test may reset any of them. ``expire_tokens()``
    invalidates the tokens issued so far.

    Example::

        async with MockNebulaServer(faults={"http_503": 0.2}, latency=0.01) as server:
            async with na.NebulaClient(token="mock-token", base_url=server.base_url) as c:
                report = await c.run_batch(jobs)
            assert server.request_count == report.attempts
            print(server.requests[0].field("prompt"))
    """

    host: str = attrs.field(
        default="127.0.0.1",
        validator=is_str,
        metadata=cli("loopback address to listen on", parse=parse_loopback),
    )
    port: int = attrs.field(
        default=0,
        validator=integer(0, 65535),
        # The command's own default: a fixed port to point a client at.
        metadata=cli("port to listen on; 0 picks a free one", parse=parse_int, default=8000),
    )
    latency: float | tuple[float, ...] = attrs.field(
        default=0.0,
        converter=latency_tuple,
        validator=valid_latency,
        metadata=cli(
            "delay before every answer: fixed, or uniform in LO:HI",
            parse=parse_latency,
            metavar="SECONDS|LO:HI",
        ),
    )
    faults: Mapping[str, float] = attrs.field(
        default=None,
        converter=freeze_faults,
        validator=valid_faults,
        metadata=cli(
            "inject a fault with this probability per img2img request (repeatable); "
            f"kinds: {', '.join(_answers.FAULT_KINDS)}",
            name="--fault",
            parse=parse_fault,
            metavar="KIND=PROB",
            gather=True,
        ),
    )
    fault_script: Iterator[str | None] | None = attrs.field(
        default=None, converter=fault_script_iterator
    )
    rate_limit: float | None = attrs.field(
        default=None,
        validator=nullable(number(positive=True)),
        metadata=cli(
            "server-side limit in img2img requests per second; the excess is refused",
            parse=parse_number,
            metavar="R",
        ),
    )
    rate_limit_algorithm: RateLimitAlgorithm = attrs.field(
        default="gcra",
        validator=one_of(ALGORITHMS),
        on_setattr=_then(_restart_limit),
        metadata=cli(
            "gcra: R/s with a burst of B; sliding_window: at most floor(R*W) (at least "
            "1) in any W seconds; fixed_window: as many per W-second window, the count "
            "reset at each"
        ),
    )
    rate_limit_window_s: float = attrs.field(
        default=1.0,
        validator=number(positive=True),
        on_setattr=_then(_restart_limit),
        metadata=cli(
            "window of the window algorithms, in seconds",
            name="--rate-limit-window",
            parse=parse_number,
            metavar="W",
        ),
    )
    rate_limit_burst: int = attrs.field(
        default=1,
        validator=integer(1),
        on_setattr=_then(_restart_limit),
        metadata=cli("burst tolerance of the gcra limit", parse=parse_int, metavar="B"),
    )
    rate_limit_schedule: tuple[tuple[float, float | None], ...] = attrs.field(
        default=None,
        converter=schedule_tuple,
        validator=valid_schedule,
        on_setattr=_then(_restart_schedule),
        metadata=cli(
            "change the limit to R ('none': no limit) AT seconds after the start, e.g. 10:10,20:30",
            parse=parse_schedule,
            metavar="AT:R[,AT:R...]",
        ),
    )
    rate_limit_style: RateLimitStyle = attrs.field(
        default="http",
        validator=one_of(get_args(RateLimitStyle)),
        metadata=cli(
            "http: refuse as HTTP 429 with a Retry-After of --retry-after seconds "
            "(none: no header); body: as HTTP 200 with body code 429 and no "
            "Retry-After"
        ),
    )
    retry_after: float | None = attrs.field(
        default=1.0,
        validator=nullable(number()),
        metadata=cli(
            "Retry-After seconds on HTTP 429s (rate limit and http_429 fault); "
            "'none' for no header",
            parse=or_none(parse_number),
            metavar="S",
        ),
    )
    token_ttl_uses: int | None = attrs.field(
        default=None,
        validator=nullable(integer(0)),
        metadata=cli(
            "tokens from getToken expire after N img2img uses",
            parse=parse_int,
            metavar="N",
            none="never",
        ),
    )
    auth_failure_style: AuthFailureStyle = attrs.field(
        default="body",
        validator=one_of(get_args(AuthFailureStyle)),
        metadata=cli("body: refuse a token as HTTP 200 + body code 401; http: as HTTP 401"),
    )
    payload_style: PayloadStyle = attrs.field(
        default="dotted",
        validator=one_of(get_args(PayloadStyle)),
        metadata=cli("img2img payload style accepted"),
    )
    username: str = attrs.field(default="demo", validator=is_str, metadata=cli("getToken username"))
    password: str = attrs.field(
        default="demo-password", validator=is_str, metadata=cli("getToken password")
    )
    token: str | None = attrs.field(
        default="mock-token",
        converter=strip_bearer,
        validator=valid_token,
        metadata=cli("static token always accepted; '' for none", parse=empty_is_none),
    )
    slow_s: float = attrs.field(
        default=5.0,
        validator=number(),
        metadata=cli(
            "seconds the 'slow' fault waits before answering",
            name="--slow",
            parse=parse_number,
            metavar="S",
        ),
    )
    seed: int | None = attrs.field(
        default=0,
        validator=nullable(integer()),
        on_setattr=_then(_reseed),
        metadata=cli(
            "seed of the fault and latency draws; 'none': random", parse=or_none(parse_int)
        ),
    )
    lean: bool = attrs.field(
        default=False,
        validator=is_bool,
        metadata=cli(
            "benchmark mode: no validation, faults, rate limit or records; precomputed answers"
        ),
    )

    # Counters a test may read and reset.
    requests: list[ReceivedRequest] = attrs.field(init=False, factory=list)
    logins: int = attrs.field(init=False, default=0)
    login_attempts: int = attrs.field(init=False, default=0)
    max_in_flight: int = attrs.field(init=False, default=0)
    request_count: int = attrs.field(init=False, default=0)

    _draws: _Draws = attrs.field(
        init=False, default=attrs.Factory(lambda self: _Draws(self.seed), takes_self=True)
    )
    _limit: ServerLimit | None = attrs.field(init=False, default=None)
    _schedule_next: int = attrs.field(init=False, default=0)  # first schedule entry not applied
    _in_flight: int = attrs.field(init=False, default=0)
    _issued: dict[str, int] = attrs.field(init=False, factory=dict)  # "Bearer <t>" -> img2img uses
    _files: set[str] = attrs.field(init=False, factory=set)
    _tasks: set[asyncio.Task[Any]] = attrs.field(init=False, factory=set)
    _closing: asyncio.Event = attrs.field(init=False, factory=asyncio.Event)
    _runner: web.AppRunner | None = attrs.field(init=False, default=None)
    _base_url: str | None = attrs.field(init=False, default=None)
    _started_at: float | None = attrs.field(init=False, default=None)
    _closed: bool = attrs.field(init=False, default=False)
    _lean_ok: bytes = attrs.field(init=False, default=b"")

    def __repr__(self) -> str:
        # Not attrs' repr: that would show the password and the token.
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
    def started_at(self) -> float | None:
        """The ``time.monotonic()`` at which the server started listening (None before):
        ``rate_limit_schedule`` and ``fixed_window`` count from it, and
        ``received_at - started_at`` places a record on that timeline."""
        return self._started_at

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
        """Bind and start serving. A server can be started once.

        Raises OSError when the address cannot be bound (a port in use).
        """
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
            host, port = runner.addresses[0][:2]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._base_url = f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
        self._started_at = time.monotonic()
        self._apply_schedule(self._started_at)
        self._files.add("lean-0")
        self._lean_ok = envelope(
            200, OK_MSG, {"images": [{"url": f"{self._base_url}/files/lean-0.png"}]}
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

    # ------------------------------------------------------------------ deciding an answer

    def _draw_latency(self) -> float:
        latency = self.latency
        if isinstance(latency, tuple):
            return self._draws.latency.uniform(*latency)
        return latency

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

    def _apply_schedule(self, now: float) -> None:
        schedule, started = self.rate_limit_schedule, self._started_at
        if started is None:
            return
        while self._schedule_next < len(schedule) and schedule[self._schedule_next][0] <= (
            now - started
        ):
            self.rate_limit = schedule[self._schedule_next][1]
            self._schedule_next += 1

    def _rate_limited(self, now: float) -> bool:
        self._apply_schedule(now)
        rate = self.rate_limit
        if rate is None:
            return False
        if self._limit is None:
            self._limit = make_limit(
                self.rate_limit_algorithm,
                burst=self.rate_limit_burst,
                window_s=self.rate_limit_window_s,
                origin=now if self._started_at is None else self._started_at,
            )
        return not self._limit.admit(now, rate)

    def _next_fault(self) -> str | None:
        script = self.fault_script
        if script is not None:
            try:
                return next(script)
            except StopIteration:
                self.fault_script = None
        if self.faults:
            draw = self._draws.faults.random()
            total = 0.0
            for kind, prob in self.faults.items():
                total += prob
                if draw < total:
                    return kind
        return None

    def _decide(self, index: int, payload: Any, authorization: str | None, now: float) -> Answer:
        # All synchronous: the answer is fixed at arrival, in arrival order.
        if not self._authorized(authorization):
            return _answers.auth_refusal(self.auth_failure_style, self._draw_latency())
        if self._rate_limited(now):
            return _answers.rate_limit_refusal(
                self.rate_limit_style, self.retry_after, self._draw_latency()
            )
        fault = self._next_fault()
        if fault is not None and fault != "slow":
            delay = 0.0 if fault == "drop" else self._draw_latency()
            return _answers.fault_answer(
                fault, base_url=self.base_url, retry_after=self.retry_after, delay=delay
            )
        delay = self._draw_latency() + (self.slow_s if fault == "slow" else 0.0)
        fields, problems = check_payload(payload, self.payload_style)
        if problems:
            msg = "bad parameter: " + "; ".join(problems)
            return Answer(200, envelope(400, msg), fault=fault, code=400, delay=delay)
        answer, names = _answers.success(
            index, fields, base_url=self.base_url, fault=fault, delay=delay
        )
        self._files.update(names)
        return answer

    # ------------------------------------------------------------------ sending it

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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

    async def _send(
        self, request: web.Request, answer: Answer, record: ReceivedRequest | None = None
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
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
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
            answer = Answer(200, self._lean_ok, delay=self._draw_latency())
        else:
            answer = _answers.auth_refusal(self.auth_failure_style, self._draw_latency())
        return await self._send(request, answer)

    def _login(self, body: bytes) -> Answer:
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
            return Answer(200, envelope(400, "bad parameter: username and password required"))
        if creds["username"] != self.username or creds["password"] != self.password:
            return Answer(200, envelope(401, "username or password incorrect"))
        token = "Bearer " + secrets.token_urlsafe(24)
        self._issued[token] = 0
        self.logins += 1
        return Answer(200, envelope(200, OK_MSG, token))

    async def _handle_token(self, request: web.Request) -> web.Response:
        self._track()
        answer = self._login(await request.read())
        return await self._send(request, attrs.evolve(answer, delay=self._draw_latency()))

    async def _handle_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        stem = name.removesuffix(".png")
        if stem == name or stem not in self._files:
            raise web.HTTPNotFound(text=f"no such file: {name}")
        return web.Response(body=png_for_name(stem), content_type="image/png")
