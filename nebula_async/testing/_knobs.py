"""The checks of :class:`MockNebulaServer`'s knobs, run by attrs in ``__init__`` and
on every assignment.

A knob whose stored form differs from what a caller passes (a read-only fault
table, a script as an iterator, a token without ``Bearer``) has a converter;
converters leave a value of the wrong shape alone, for the validator to refuse.
Validators raise ValueError naming the knob (attrs passes them its field).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ._answers import FAULT_KINDS

__all__ = [
    "fault_script_iterator",
    "freeze_faults",
    "integer",
    "is_bool",
    "is_seed",
    "is_str",
    "latency_tuple",
    "number",
    "one_of",
    "schedule_tuple",
    "strip_bearer",
    "valid_faults",
    "valid_latency",
    "valid_schedule",
    "valid_token",
]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]
_FAULT_SET = frozenset(FAULT_KINDS)


# --------------------------------------------------------------------------- plain values


def is_str(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """Any string."""
    if not isinstance(value, str):
        raise ValueError(f"{field.name} must be a string, got {value!r}")


def is_bool(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """True or False (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field.name} must be a bool, got {value!r}")


def is_seed(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """Any integer, or None for an unseeded (random) draw."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{field.name} must be an integer or None, got {value!r}")


def one_of(*allowed: str) -> Validator:
    """One of ``allowed``."""

    def check(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{field.name} must be one of {allowed}, got {value!r}")

    return check


def _number_problem(value: Any, *, positive: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {value!r}"
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        return f"must be finite and {'> 0' if positive else '>= 0'}, got {value!r}"
    return None


def number(*, positive: bool = False, optional: bool = False) -> Validator:
    """A finite number >= 0 (> 0 when ``positive``); None too when ``optional``."""

    def check(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        problem = _number_problem(value, positive=positive)
        if problem:
            raise ValueError(f"{field.name} {problem}")

    return check


def integer(minimum: int, *, maximum: int | None = None, optional: bool = False) -> Validator:
    """An integer in ``minimum..maximum`` (not a bool); None too when ``optional``."""
    bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"

    def check(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise ValueError(f"{field.name} must be an integer {bound}, got {value!r}")

    return check


# --------------------------------------------------------------------------- latency


def latency_tuple(
    value: float | tuple[float, float] | list[float],
) -> float | tuple[float, ...]:
    """A ``[lo, hi]`` list as a tuple (the form the draw looks for)."""
    return tuple(value) if isinstance(value, list) else value


def valid_latency(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """Seconds, fixed or a ``(lo, hi)`` range with ``lo <= hi``."""
    if not isinstance(value, tuple):
        problem = _number_problem(value, positive=False)
        if problem:
            raise ValueError(f"{field.name} {problem}")
        return
    if len(value) != 2:
        raise ValueError(f"{field.name} range must be (lo, hi), got {value!r}")
    for bound in value:
        problem = _number_problem(bound, positive=False)
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


def valid_faults(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """Fault kind -> probability in [0, 1], summing to at most 1."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{field.name} must be a mapping of fault kind to probability, "
                         f"got {value!r}")  # fmt: skip
    for kind, prob in value.items():
        if kind not in _FAULT_SET:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0 <= prob <= 1:
            raise ValueError(f"probability of fault {kind!r} must be in [0, 1], got {prob!r}")
    total = sum(value.values())
    if total > 1 + 1e-9:
        raise ValueError(f"{field.name}: fault probabilities sum to {total:g} > 1")


def _fault_entry(entry: Any) -> str | None:
    if entry is not None and entry not in _FAULT_SET:
        raise ValueError(f"unknown fault kind {entry!r}; known: {', '.join(FAULT_KINDS)}")
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


def valid_token(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
    """A non-empty string, or None (no static token)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{field.name} must be a non-empty string or None")


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


def valid_schedule(_server: Any, field: attrs.Attribute[Any], value: Any) -> None:
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
        problem = _number_problem(at_s, positive=False)
        if problem is None and rate is not None:
            problem = _number_problem(rate, positive=True)
        if problem:
            raise ValueError(f"{field.name}[{i}] {problem}")
        if at_s < previous:
            raise ValueError(f"{field.name} times must not decrease, got {at_s!r} after "
                             f"{previous!r}")  # fmt: skip
        previous = at_s
