"""Each :class:`MockNebulaServer` knob is spelled once, as its attrs field: the
``mock-server`` flags are built from the fields, and the fields' validators judge
the flags' values."""

from __future__ import annotations

import argparse
from typing import Any

import attrs
import pytest

from nebula_async.testing import MockNebulaServer, add_mock_server_arguments
from nebula_async.testing._command import _server_from_args
from nebula_async.testing._knobs import flag_of

FIELDS = [f for f in attrs.fields(MockNebulaServer) if f.init]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mock-server")
    add_mock_server_arguments(parser)
    return parser.parse_args(argv)


def test_every_knob_but_the_script_has_a_flag() -> None:
    # fault_script is an iterable (endless ones included): no text spells it.
    assert [f.name for f in FIELDS if flag_of(f) is None] == ["fault_script"]


def test_the_flags_default_to_the_knobs_defaults() -> None:
    server = _server_from_args(parse([]))
    for field in FIELDS:
        if field.name in ("fault_script", "port"):
            continue
        assert getattr(server, field.name) == getattr(MockNebulaServer(), field.name), field.name
    assert server.port == 8000  # the command's own default: a fixed port


def test_flag_values_reach_the_knobs() -> None:
    argv = ["--token", "Bearer t", "--latency", "0.1:0.2", "--seed", "none", "--slow", "1"]
    server = _server_from_args(parse(argv))
    assert (server.token, server.latency, server.seed, server.slow_s) == ("t", (0.1, 0.2), None, 1)
    assert _server_from_args(parse(["--token", ""])).token is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "argument --port: port must be an integer in 0..65535"),
        (["--slow", "inf"], "argument --slow: slow_s must be finite and >= 0"),
        (["--payload-style", "camel"], "argument --payload-style: payload_style must be one of"),
        (["--fault", "drop=0.6", "--fault", "slow=0.6"], "argument --fault: faults: fault prob"),
        (["--rate-limit-schedule", "1:2,0:3"], "rate_limit_schedule times must not decrease"),
    ],
)
def test_a_bad_flag_value_is_the_knobs_own_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse(argv)
    assert exc_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "knobs",
    [{"host": 1}, {"username": None}, {"port": True}, {"slow_s": True}, {"lean": "yes"}],
)
def test_a_value_of_the_wrong_type_is_a_value_error(knobs: dict[str, Any]) -> None:
    # attrs' instance_of raises TypeError and takes True for an int: the knobs do neither.
    ((name, _),) = knobs.items()
    with pytest.raises(ValueError, match=f"^{name} must be"):
        MockNebulaServer(**knobs)
