"""The checks of :class:`MockNebulaServer`'s knobs, run by attrs in ``__init__`` and
on every assignment, and the syntax of their ``nebula-async mock-server`` flags.

The checks themselves are ``attrs.validators``; :class:`Check` only words their
failure the knob's way. A knob whose stored form differs from what a caller passes
(a read-only fault table, a script as an iterator, a token without ``Bearer``) has
a converter; converters leave a value of the wrong shape alone, for the validator
to refuse. Validators raise ValueError naming the knob (attrs passes them its field).

A knob with a flag carries a :class:`Flag` in its field's metadata (see :func:`cli`):
its help and the parsing of its text, which checks syntax only: the value parsed
is assigned to a server, whose validator judges it.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs
from attrs.validators import ge, gt, in_, instance_of, le, lt, min_len, not_, optional

from ._answers import FAULT_KINDS

__all__ = [
    "Check",
    "Flag",
    "cli",
    "empty_is_none",
    "fault_script_iterator",
    "flag_of",
    "freeze_faults",
    "integer",
    "is_bool",
    "is_str",
    "latency_tuple",
    "nullable",
    "number",
    "one_of",
    "or_none",
    "parse_fault",
    "parse_int",
    "parse_latency",
    "parse_loopback",
    "parse_number",
    "parse_schedule",
    "schedule_tuple",
    "strip_bearer",
    "valid_faults",
    "valid_latency",
    "valid_schedule",
    "valid_token",
]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], Any]
_FAULT_SET = frozenset(FAULT_KINDS)
# instance_of(int) and instance_of(float) let True through; no knob takes a bool for 1.
_NOT_BOOL: Final = not_(instance_of(bool))


# --------------------------------------------------------------------------- plain values


@attrs.frozen
class Check:
    """attrs validators under the knob's own words: each rule is a wording and the
    validators that must all pass; the first failing rule raises ValueError
    ``"<knob> <wording>, got <value>"`` (attrs' instance_of raises TypeError, and
    the class documents ValueError)."""

    rules: tuple[tuple[str, tuple[Validator, ...]], ...]
    #: The allowed values of a choice, for the command line to list.
    options: tuple[Any, ...] | None = None

    def problem(self, server: Any, field: attrs.Attribute[Any], value: Any) -> str | None:
        """What is wrong with ``value`` (without the knob's name), or None."""
        for wording, validators in self.rules:
            try:
                for validator in validators:
                    validator(server, field, value)
            except (TypeError, ValueError):
                return f"{wording}, got {value!r}"
        return None

    def __call__(self, server: Any, field: attrs.Attribute[Any], value: Any) -> None:
        problem = self.problem(server, field, value)
        if problem:
            raise ValueError(f"{field.name} {problem}")


def _check(wording: str, *validators: Validator) -> Check:
    return Check(((wording, validators),))


is_str: Final = _check("must be a string", instance_of(str))
is_bool: Final = _check("must be a bool", instance_of(bool))


def one_of(options: tuple[str, ...]) -> Check:
    """One of ``options``."""
    return Check(((f"must be one of {options}", (in_(options),)),), options=options)


def number(*, positive: bool = False) -> Check:
    """A finite int or float (not a bool), >= 0 (> 0 when ``positive``)."""
    wording, bound = ("> 0", gt(0)) if positive else (">= 0", ge(0))
    return Check(
        (
            ("must be a number", (_NOT_BOOL, instance_of((int, float)))),
            (f"must be finite and {wording}", (bound, lt(math.inf))),
        )
    )


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    """An int (not a bool) in ``minimum..maximum``, either bound optional."""
    bounds: list[Validator] = [] if minimum is None else [ge(minimum)]
    wording = "must be an integer" if minimum is None else f"must be an integer >= {minimum}"
    if maximum is not None:
        bounds.append(le(maximum))
        wording = f"must be an integer in {minimum}..{maximum}"
    return _check(wording, _NOT_BOOL, instance_of(int), *bounds)


def nullable(check: Validator) -> Validator:
    """``check``, or None: attrs' optional, typed loosely (the stub cannot type it for a
    field of ``T | None`` whose default is a ``T``)."""
    return optional(check)


_NUMBER: Final = number()
_POSITIVE: Final = number(positive=True)
_PROBABILITY: Final = _check(
    "must be in [0, 1]", _NOT_BOOL, instance_of((int, float)), ge(0), le(1)
)
#: A non-empty string, or None (no static token).
valid_token: Final = nullable(_check("must be a non-empty string", instance_of(str), min_len(1)))


# --------------------------------------------------------------------------- latency


def latency_tuple(
    value: float | tuple[float, float] | list[float],
) -> float | tuple[float, ...]:
    """A ``[lo, hi]`` list as a tuple (the form the draw looks for)."""
    return tuple(value) if isinstance(value, list) else value


def valid_latency(server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """Seconds, fixed or a ``(lo, hi)`` range with ``lo <= hi``."""
    if not isinstance(value, tuple):
        _NUMBER(server, field, value)
        return
    if len(value) != 2:
        raise ValueError(f"{field.name} range must be (lo, hi), got {value!r}")
    for bound in value:
        problem = _NUMBER.problem(server, field, bound)
        if problem:
            raise ValueError(f"{field.name} range {problem}")
    if value[0] > value[1]:
        raise ValueError(f"{field.name} range needs lo <= hi, got {value!r}")


# --------------------------------------------------------------------------- faults


def freeze_faults(value: Mapping[str, float] | None) -> Mapping[str, float]:
    """A read-only copy in sorted order (so the draw does not depend on the order the
    caller wrote them in, and an in-place edit cannot bypass the check)."""
    given: Any = value  # anything may come in; valid_faults refuses what is no table
    if given is None:
        return MappingProxyType({})
    if not isinstance(given, Mapping):
        return given  # type: ignore[no-any-return]
    try:
        return MappingProxyType({kind: given[kind] for kind in sorted(given)})
    except TypeError:  # keys that do not sort are not fault kinds: valid_faults says so
        return MappingProxyType(dict(given))


def _unknown_fault(kind: Any) -> ValueError:
    return ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")


def valid_faults(server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """Fault kind -> probability in [0, 1], summing to at most 1."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{field.name} must be a mapping of fault kind to probability, "
                         f"got {value!r}")  # fmt: skip
    for kind, prob in value.items():
        if kind not in _FAULT_SET:
            raise _unknown_fault(kind)
        problem = _PROBABILITY.problem(server, field, prob)
        if problem:
            raise ValueError(f"probability of fault {kind!r} {problem}")
    total = sum(value.values())
    if total > 1 + 1e-9:
        raise ValueError(f"{field.name}: fault probabilities sum to {total:g} > 1")


def _fault_entry(entry: Any) -> str | None:
    if entry is not None and entry not in _FAULT_SET:
        raise _unknown_fault(entry)
    return entry  # type: ignore[no-any-return]


def fault_script_iterator(value: Iterable[str | None] | None) -> Iterator[str | None] | None:
    """The ``fault_script`` knob as an iterator: a finite script is checked in full now,
    an endless one entry by entry as the server consumes it."""
    # A converter, not a validator: an iterator cannot be looked into without consuming it.
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError("fault_script must be an iterable of fault kinds, not a string")
    if isinstance(value, Collection):
        return iter([_fault_entry(e) for e in value])
    try:
        entries = iter(value)
    except TypeError:
        raise ValueError(
            f"fault_script must be an iterable of fault kinds, got {value!r}"
        ) from None
    return (_fault_entry(e) for e in entries)


# --------------------------------------------------------------------------- auth


def strip_bearer(value: str | None) -> str | None:
    """The token without a ``Bearer`` prefix: the header wanted is ``Bearer x`` whether
    ``x`` or ``Bearer x`` was given."""
    return value.removeprefix("Bearer ") if isinstance(value, str) else value


# --------------------------------------------------------------------------- rate limit


def schedule_tuple(
    value: Iterable[tuple[float, float | None]] | None,
) -> tuple[tuple[float, float | None], ...]:
    """The schedule as a tuple of pairs; None: no schedule."""
    given: Any = value  # anything may come in; valid_schedule refuses what is no schedule
    if given is None:
        return ()
    if isinstance(given, str | bytes) or not isinstance(given, Iterable):
        return given  # type: ignore[return-value]
    return tuple(tuple(e) if isinstance(e, list) else e for e in given)


def valid_schedule(server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """``(at_s, rate_limit)`` pairs: ``at_s`` >= 0 and non-decreasing, ``rate_limit`` > 0
    or None."""
    if not isinstance(value, tuple):
        raise ValueError(f"{field.name} must be a sequence of (at_s, rate_limit) pairs, "
                         f"got {value!r}")  # fmt: skip
    previous = 0.0
    for i, entry in enumerate(value):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ValueError(f"{field.name}[{i}] must be an (at_s, rate_limit) pair, "
                             f"got {entry!r}")  # fmt: skip
        at_s, rate = entry
        problem = _NUMBER.problem(server, field, at_s)
        if problem is None and rate is not None:
            problem = _POSITIVE.problem(server, field, rate)
        if problem:
            raise ValueError(f"{field.name}[{i}] {problem}")
        if at_s < previous:
            raise ValueError(f"{field.name} times must not decrease, got {at_s!r} after "
                             f"{previous!r}")  # fmt: skip
        previous = at_s


# --------------------------------------------------------------------------- flags


@attrs.frozen
class Flag:
    """A knob's ``nebula-async mock-server`` flag (in its field's ``metadata["flag"]``)."""

    help: str
    #: Text -> the value assigned to the knob; it checks syntax only, raising ValueError.
    parse: Callable[[str], Any] = str
    #: The flag, when not ``--`` and the knob's name with dashes.
    name: str | None = None
    metavar: str | None = None
    #: The flag's default, when not the knob's.
    default: Any = None
    #: What a None default means, in the help.
    none: str = "none"
    #: Repeatable: each occurrence parses to a (key, value) pair of one mapping.
    gather: bool = False


def cli(help: str, **how: Any) -> dict[str, Flag]:
    """The ``metadata`` of a knob with a flag: ``help`` and the other :class:`Flag` fields."""
    return {"flag": Flag(help, **how)}


def flag_of(field: attrs.Attribute[Any]) -> Flag | None:
    """The knob's :class:`Flag`, or None when it has no flag."""
    flag = field.metadata.get("flag")
    return flag if isinstance(flag, Flag) else None


def parse_number(text: str) -> float:
    """A float (``inf`` and ``nan`` too: the knob refuses them)."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def parse_int(text: str) -> int:
    """An int."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, with ``none`` (any case) for None."""

    def parse_or_none(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    return parse_or_none


def empty_is_none(text: str) -> str | None:
    """The text, '' for None."""
    return text or None


def parse_latency(text: str) -> float | tuple[float, float]:
    """``SECONDS`` or ``LO:HI``."""
    if ":" in text:
        lo, _, hi = text.partition(":")
        return (parse_number(lo), parse_number(hi))
    return parse_number(text)


def parse_schedule(text: str) -> tuple[tuple[float, float | None], ...]:
    """``AT:RATE[,AT:RATE...]``, ``none`` for no limit."""
    entries: list[tuple[float, float | None]] = []
    for part in text.split(","):
        at_text, sep, rate_text = part.strip().partition(":")
        if not sep:
            raise ValueError(f"expected AT:RATE[,AT:RATE...], got {text!r}")
        entries.append((parse_number(at_text), or_none(parse_number)(rate_text)))
    return tuple(entries)


def parse_fault(text: str) -> tuple[str, float]:
    """``KIND=PROB``."""
    kind, sep, prob = text.partition("=")
    if not sep:
        raise ValueError(f"expected KIND=PROB, got {text!r}")
    return kind, parse_number(prob)


def parse_loopback(text: str) -> str:
    """A loopback address, ``localhost`` for 127.0.0.1."""
    # The mock has no auth worth the name: never let the command listen beyond this machine.
    if text == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"expected a loopback address (127.0.0.1, ::1, localhost), got {text!r}"
        ) from None
    if not address.is_loopback:
        raise ValueError(f"only loopback addresses are allowed, got {text!r}")
    return str(address)
