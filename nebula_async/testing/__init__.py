"""Test helpers: :class:`MockNebulaServer`, a Nebula v4 API on loopback.

Use it in your own tests to run the client against a real HTTP server with
injected latency, faults, a server-side rate limit and token expiry::

    from nebula_async.testing import MockNebulaServer

    async with MockNebulaServer(faults={"http_503": 0.1}) as server:
        async with na.NebulaClient(token="mock-token", base_url=server.base_url) as client:
            result = await client.img2img(na.Img2ImgRequest(model="m", prompt="p"))
        assert server.requests[-1].field("prompt") == "p"

The ``nebula-async mock-server`` command is built on :func:`add_mock_server_arguments`
and :func:`serve_mock_server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ._mock_server import (
    FAULT_KINDS,
    IMG2IMG_PATH,
    TOKEN_PATH,
    MockNebulaServer,
    ReceivedRequest,
    check_payload,
)
from ._png import PNG_SIGNATURE, png_bytes

__all__ = [
    "FAULT_KINDS",
    "IMG2IMG_PATH",
    "MockNebulaServer",
    "PNG_SIGNATURE",
    "ReceivedRequest",
    "TOKEN_PATH",
    "add_mock_server_arguments",
    "check_payload",
    "png_bytes",
    "serve_mock_server",
]

_LISTENING = "nebula mock server listening on {url}"


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


# --------------------------------------------------------------------------- public hooks


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
    add("--rate-limit", type=_positive, default=None, metavar="R",
        help="server-side cap in img2img requests per second; excess answered 429")  # fmt: skip
    add("--rate-limit-burst", type=_int_at_least(1), default=1, metavar="B",
        help="burst tolerance of the rate limit (default: 1)")  # fmt: skip
    add("--rate-limit-style", choices=("http", "body"), default="http",
        help="answer excess as HTTP 429 (default) or HTTP 200 with body code 429")  # fmt: skip
    add("--retry-after", type=_optional(_number), default=1.0, metavar="S",
        help="Retry-After seconds on HTTP 429s; 'none' for no header (default: 1)")  # fmt: skip
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
        help="benchmark mode: no validation, faults or records; precomputed answers")  # fmt: skip
    add("--duration", type=_number, default=None, metavar="S",
        help="stop after S seconds (default: run until SIGINT/SIGTERM)")  # fmt: skip


def _server_from_args(args: argparse.Namespace) -> MockNebulaServer:
    return MockNebulaServer(
        host=args.host,
        port=args.port,
        payload_style=args.payload_style,
        latency=args.latency,
        faults=args.faults,
        rate_limit=args.rate_limit,
        rate_limit_burst=args.rate_limit_burst,
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


async def serve_mock_server(args: argparse.Namespace) -> None:
    """Run a :class:`MockNebulaServer` configured by :func:`add_mock_server_arguments` flags.

    Prints exactly one line to stdout, ``nebula mock server listening on
    http://HOST:PORT`` (flushed), then serves until ``--duration`` elapses or
    SIGINT/SIGTERM arrives; a short summary goes to stderr at the end.
    """
    server = _server_from_args(args)
    stop = asyncio.Event()
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
        async with server:
            print(_LISTENING.format(url=server.base_url), flush=True)
            if args.duration is None:
                await stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.duration):
                        await stop.wait()
    finally:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            if previous is not None:
                # remove_signal_handler resets to the default; put back what was there.
                signal.signal(sig, previous)
    print(
        f"nebula mock server stopped: {server.request_count} img2img requests, "
        f"{server.logins} logins, max {server.max_in_flight} in flight",
        file=sys.stderr,
        flush=True,
    )
