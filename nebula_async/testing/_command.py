"""The ``nebula-async mock-server`` command: its flags, built from the
:class:`MockNebulaServer` knobs' fields (a :class:`~._knobs.Flag` in their metadata),
and the serving loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import attrs
import orjson

from ._knobs import flag_of, parse_number
from ._mock_server import MockNebulaServer
from ._records import busiest_window

__all__ = ["EXIT_USAGE", "add_mock_server_arguments", "serve_mock_server"]

_LISTENING: Final = "nebula mock server listening on {url}"
#: What :func:`serve_mock_server` returns when it cannot start: a port in use, an
#: unwritable ``--record`` file (the CLI's "bad usage" code).
EXIT_USAGE: Final = 2


# --------------------------------------------------------------------------- the flags


def _knob_fields() -> list[attrs.Attribute[Any]]:
    """The :class:`MockNebulaServer` knobs with a flag, in field order."""
    return [field for field in attrs.fields(MockNebulaServer) if flag_of(field)]


def _shown(default: Any, none: str) -> str:
    if default is None:
        return none
    return f"{default:g}" if isinstance(default, float) else str(default)


def _judged(field: attrs.Attribute[Any], parse: Any, judge: MockNebulaServer | None) -> Any:
    """The flag's argparse type: ``parse``, then (when ``judge``) the value assigned to
    ``judge``, so the knob's own converter and validator refuse what it would."""

    def typed(text: str) -> Any:
        try:
            value = parse(text)
            if judge is not None:
                setattr(judge, field.name, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return typed


class _Gather(argparse.Action):
    """A repeated flag's ``(key, value)`` pairs gathered into one dict, which the knob
    judges whole after each (``--fault``: the probabilities' sum)."""

    def __init__(self, *args: Any, judge: MockNebulaServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._judge = judge

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, tuple)
        key, value = values
        gathered = {**(getattr(namespace, self.dest, None) or {}), key: value}
        try:
            setattr(self._judge, self.dest, gathered)
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, gathered)


def _add_knob(
    parser: argparse.ArgumentParser, field: attrs.Attribute[Any], judge: MockNebulaServer
) -> None:
    flag = flag_of(field)
    assert flag is not None
    name = flag.name or "--" + field.name.replace("_", "-")
    default = field.default if flag.default is None else flag.default
    if isinstance(default, bool):
        parser.add_argument(name, dest=field.name, action="store_true", help=flag.help)
        return
    how: dict[str, Any] = {
        "dest": field.name,
        "default": default,
        "metavar": flag.metavar,
        "choices": getattr(field.validator, "options", None),
        "help": f"{flag.help} (default: {_shown(default, flag.none)})",
        "type": _judged(field, flag.parse, None if flag.gather else judge),
    }
    if flag.gather:
        how.update(action=_Gather, judge=judge)
    parser.add_argument(name, **how)


def _seconds(text: str) -> float:
    try:
        value = parse_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_mock_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nebula-async mock-server`` flags: one per :class:`MockNebulaServer` knob
    with a flag in its field's metadata (its dest is the knob's name), then
    ``--record`` and ``--duration``. A bad value is a usage error naming the flag."""
    judge = MockNebulaServer()  # never started: flag values are tried on it
    for field in _knob_fields():
        _add_knob(parser, field, judge)
    add = parser.add_argument
    add("--record", type=Path, default=None, metavar="FILE",
        help="on stopping, write one JSON line per img2img request to FILE: index, "
             "received_s (seconds after the start), fault ('rate_limited' for a "
             "refusal by the limit), status, code")  # fmt: skip
    add("--duration", type=_seconds, default=None, metavar="S",
        help="stop after S seconds (default: run until SIGINT/SIGTERM)")  # fmt: skip


# --------------------------------------------------------------------------- serving


def _server_from_args(args: argparse.Namespace) -> MockNebulaServer:
    return MockNebulaServer(**{field.name: getattr(args, field.name) for field in _knob_fields()})


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
