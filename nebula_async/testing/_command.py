"""The ``nebula-async mock-server`` command: its flags (one per
:class:`MockNebulaServer` knob) and the serving loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import orjson

from ._answers import FAULT_KINDS
from ._mock_server import MockNebulaServer
from ._ratelimit import ALGORITHMS
from ._records import busiest_window

__all__ = ["EXIT_USAGE", "add_mock_server_arguments", "serve_mock_server"]

_LISTENING: Final = "nebula mock server listening on {url}"
#: What :func:`serve_mock_server` returns when it cannot start: a port in use, an
#: unwritable ``--record`` file (the CLI's "bad usage" code).
EXIT_USAGE: Final = 2


# --------------------------------------------------------------------------- flag types


def _number(text: str, *, what: str = "a number >= 0") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text, what="a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int_at_least(minimum: int, maximum: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value

    return parse


def _optional(parse: Any) -> Any:
    def parse_or_none(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    return parse_or_none


def _seed(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _latency(text: str) -> float | tuple[float, float]:
    if ":" in text:
        lo_text, _, hi_text = text.partition(":")
        lo, hi = _number(lo_text), _number(hi_text)
        if lo > hi:
            raise argparse.ArgumentTypeError(f"expected LO:HI with LO <= HI, got {text!r}")
        return (lo, hi)
    return _number(text)


def _schedule(text: str) -> tuple[tuple[float, float | None], ...]:
    entries: list[tuple[float, float | None]] = []
    for part in text.split(","):
        at_text, sep, rate_text = part.strip().partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected AT:RATE[,AT:RATE...], got {text!r}")
        at_s, rate = _number(at_text), _optional(_positive)(rate_text)
        if entries and at_s < entries[-1][0]:
            raise argparse.ArgumentTypeError(f"times must not decrease, got {text!r}")
        entries.append((at_s, rate))
    return tuple(entries)


def _loopback_host(text: str) -> str:
    # The mock has no auth worth the name: never let it listen beyond this machine.
    if text == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a loopback address (127.0.0.1, ::1, localhost), got {text!r}"
        ) from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(f"only loopback addresses are allowed, got {text!r}")
    return str(address)


def _fault(text: str) -> tuple[str, float]:
    kind, sep, prob_text = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=PROB, got {text!r}")
    if kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}"
        )
    prob = _number(prob_text, what="a probability in [0, 1]")
    if prob > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {prob_text!r}")
    return kind, prob


class _FaultAction(argparse.Action):
    """Gather repeated ``--fault KIND=PROB`` into one dict, refusing a total above 1."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, tuple)
        kind, prob = values
        faults = dict(getattr(namespace, self.dest, None) or {})
        faults[kind] = prob
        if sum(faults.values()) > 1 + 1e-9:
            raise argparse.ArgumentError(
                self, f"fault probabilities sum to {sum(faults.values()):g}, more than 1"
            )
        setattr(namespace, self.dest, faults)


# --------------------------------------------------------------------------- the flags


def _add_rate_limit_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--rate-limit", type=_positive, default=None, metavar="R",
        help="server-side limit in img2img requests per second; the excess is refused "
             "(default: none)")  # fmt: skip
    add("--rate-limit-algorithm", choices=ALGORITHMS, default="gcra",
        help="gcra: R/s with a burst of B; sliding_window: at most floor(R*W) (at least 1) "
             "in any W seconds; fixed_window: as many per W-second window, the count "
             "reset at each (default: gcra)")  # fmt: skip
    add("--rate-limit-window", dest="rate_limit_window_s", type=_positive, default=1.0,
        metavar="W", help="window of the window algorithms, in seconds (default: 1)")  # fmt: skip
    add("--rate-limit-burst", type=_int_at_least(1), default=1, metavar="B",
        help="burst tolerance of the gcra limit (default: 1)")  # fmt: skip
    add("--rate-limit-schedule", type=_schedule, default=None, metavar="AT:R[,AT:R...]",
        help="change the limit to R ('none': no limit) AT seconds after the start, "
             "e.g. 10:10,20:30")  # fmt: skip
    add("--rate-limit-style", choices=("http", "body"), default="http",
        help="http: refuse as HTTP 429 with a Retry-After of --retry-after seconds "
             "(none: no header); body: as HTTP 200 with body code 429 and no Retry-After "
             "(default: http)")  # fmt: skip
    add("--retry-after", type=_optional(_number), default=1.0, metavar="S",
        help="Retry-After seconds on HTTP 429s (rate limit and http_429 fault); "
             "'none' for no header (default: 1)")  # fmt: skip


def add_mock_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nebula-async mock-server`` flags (one per :class:`MockNebulaServer` knob)."""
    add = parser.add_argument
    add("--host", type=_loopback_host, default="127.0.0.1",
        help="loopback address to listen on (default: 127.0.0.1)")  # fmt: skip
    add("--port", type=_int_at_least(0, 65535), default=8000,
        help="port to listen on; 0 picks a free one (default: 8000)")  # fmt: skip
    add("--latency", type=_latency, default=0.0, metavar="SECONDS|LO:HI",
        help="delay before every answer: fixed, or uniform in LO:HI (default: 0)")  # fmt: skip
    add("--fault", dest="faults", type=_fault, action=_FaultAction, default=None,
        metavar="KIND=PROB",
        help=f"inject a fault with this probability per img2img request (repeatable); "
             f"kinds: {', '.join(FAULT_KINDS)}")  # fmt: skip
    _add_rate_limit_arguments(parser)
    add("--token-ttl-uses", type=_int_at_least(0), default=None, metavar="N",
        help="tokens from getToken expire after N img2img uses (default: never)")  # fmt: skip
    add("--auth-failure-style", choices=("body", "http"), default="body",
        help="refuse a token as HTTP 200 + body code 401 (default) or HTTP 401")  # fmt: skip
    add("--payload-style", choices=("dotted", "nested", "flat", "any"), default="dotted",
        help="img2img payload style accepted (default: dotted)")  # fmt: skip
    add("--username", default="demo", help="getToken username (default: demo)")
    add("--password", default="demo-password", help="getToken password (default: demo-password)")
    add("--token", default="mock-token",
        help="static token always accepted; '' for none (default: mock-token)")  # fmt: skip
    add("--slow", dest="slow_s", type=_number, default=5.0, metavar="S",
        help="seconds the 'slow' fault waits before answering (default: 5)")  # fmt: skip
    add("--seed", type=_seed, default=0,
        help="seed of the fault and latency draws; 'none': random (default: 0)")  # fmt: skip
    add("--lean", action="store_true",
        help="benchmark mode: no validation, faults, rate limit or records; precomputed "
             "answers")  # fmt: skip
    add("--record", type=Path, default=None, metavar="FILE",
        help="on stopping, write one JSON line per img2img request to FILE: index, "
             "received_s (seconds after the start), fault ('rate_limited' for a "
             "refusal by the limit), status, code")  # fmt: skip
    add("--duration", type=_number, default=None, metavar="S",
        help="stop after S seconds (default: run until SIGINT/SIGTERM)")  # fmt: skip


# --------------------------------------------------------------------------- serving


def _server_from_args(args: argparse.Namespace) -> MockNebulaServer:
    return MockNebulaServer(
        host=args.host,
        port=args.port,
        payload_style=args.payload_style,
        latency=args.latency,
        faults=args.faults,
        rate_limit=args.rate_limit,
        rate_limit_algorithm=args.rate_limit_algorithm,
        rate_limit_window_s=args.rate_limit_window_s,
        rate_limit_burst=args.rate_limit_burst,
        rate_limit_schedule=args.rate_limit_schedule,
        rate_limit_style=args.rate_limit_style,
        retry_after=args.retry_after,
        username=args.username,
        password=args.password,
        token=args.token or None,
        token_ttl_uses=args.token_ttl_uses,
        auth_failure_style=args.auth_failure_style,
        slow_s=args.slow_s,
        seed=args.seed,
        lean=args.lean,
    )


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` meanwhile; the previous handlers come back after."""
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous = signal.getsignal(sig)
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not main thread
            continue
        installed.append((sig, previous))
    try:
        yield
    finally:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            if previous is not None:
                # remove_signal_handler resets to the default; put back what was there.
                signal.signal(sig, previous)


async def _wait(stop: asyncio.Event, duration: float | None) -> None:
    if duration is None:
        await stop.wait()
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(duration):
            await stop.wait()


def _say(line: str) -> None:
    print(f"nebula mock server: {line}", file=sys.stderr, flush=True)


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _open_record(path: Path) -> IO[bytes]:
    # Opened before serving (a bad path fails fast) and written after: the loop has
    # nothing else to do at either moment, so blocking file I/O costs no request.
    return path.open("wb")


def _write_record(file: IO[bytes], server: MockNebulaServer) -> None:
    started = server.started_at or 0.0
    for r in server.requests:
        line = {
            "index": r.index,
            "received_s": round(r.received_at - started, 6),
            "fault": r.fault,
            "status": r.status,
            "code": r.code,
        }
        file.write(orjson.dumps(line) + b"\n")


def _summary(server: MockNebulaServer) -> str:
    refused = sum(1 for r in server.requests if r.rate_limited)
    text = (
        f"nebula mock server stopped: {server.request_count} img2img requests "
        f"({refused} refused by the rate limit), {server.logins} logins, "
        f"max {server.max_in_flight} in flight"
    )
    if server.rate_limit_algorithm != "gcra":
        window = server.rate_limit_window_s
        admitted = (r.received_at for r in server.requests if not r.rate_limited)
        text += f", busiest {window:g} s window {busiest_window(admitted, window)} admitted"
    return text


async def _serve(server: MockNebulaServer, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    with _signals_set(stop):
        try:
            await server.start()
        except OSError as exc:
            _say(f"cannot listen on {args.host} port {args.port}: {_reason(exc)}")
            return EXIT_USAGE
        try:
            print(_LISTENING.format(url=server.base_url), flush=True)
            await _wait(stop, args.duration)
        finally:
            await server.aclose()
    return 0


async def serve_mock_server(args: argparse.Namespace) -> int:
    """Run a :class:`MockNebulaServer` configured by :func:`add_mock_server_arguments` flags;
    returns the exit code.

    Prints exactly one line to stdout, ``nebula mock server listening on
    http://HOST:PORT`` (flushed), then serves until ``--duration`` elapses or
    SIGINT/SIGTERM arrives, writes ``--record`` if asked, and returns 0; a short
    summary goes to stderr at the end. When the address cannot be bound (a port
    in use) or the ``--record`` file cannot be opened, it prints one line to
    stderr and returns :data:`EXIT_USAGE` (2), having served nothing.
    """
    server = _server_from_args(args)
    with contextlib.ExitStack() as files:
        record: IO[bytes] | None = None
        if args.record is not None:
            try:
                record = files.enter_context(_open_record(args.record))
            except OSError as exc:
                _say(f"cannot write the record {str(args.record)!r}: {_reason(exc)}")
                return EXIT_USAGE
        code = await _serve(server, args)
        if code:
            return code
        if record is not None:
            _write_record(record, server)
    print(_summary(server), file=sys.stderr, flush=True)
    return 0
