"""Fail fast on systemic failure: a circuit breaker for a batch. Sans-I/O.

When the credentials are refused or the service cannot be reached at all, every
job would fail the same way, one full retry cycle each, and a wrong token would
cost one refused request per job. After ``threshold`` consecutive submissions
fail the same systemic way (Nygard, *Release It!*, "Circuit Breaker"), the
breaker opens: the batch starts no more submissions, and each one not started
ends as a :class:`~nebula_async.NotAttemptedError` whose ``cause`` names the
failure. It never closes again within the batch: the cause (a token, a URL) is
the user's to fix, and a rerun does the jobs not attempted.
"""

from __future__ import annotations

from typing import Final

from ._exceptions import APIConnectionError, AuthenticationError, NebulaError, NotAttemptedError

__all__ = [
    "CircuitBreaker",
    "DEFAULT_BREAKER_THRESHOLD",
    "systemic_kind",
]

#: Consecutive submissions failing the same systemic way that open the breaker.
DEFAULT_BREAKER_THRESHOLD: Final = 10


def systemic_kind(error: NebulaError) -> str | None:
    """The systemic way ``error`` failed, or None for a failure of the job itself.

    >>> systemic_kind(AuthenticationError("token invalid", status_code=200, code=401))
    'credentials refused'
    """
    if isinstance(error, AuthenticationError):
        return "credentials refused"
    if isinstance(error, APIConnectionError) and not error.request_sent:
        return "service unreachable"
    return None


class CircuitBreaker:
    """Counts consecutive systemic failures; opens at ``threshold`` (None: never).

    >>> breaker = CircuitBreaker(2)
    >>> error = AuthenticationError("token invalid", status_code=200, code=401)
    >>> breaker.record(error); breaker.record(error)
    >>> breaker.opened.reason, type(breaker.opened.cause).__name__
    ('circuit_open', 'AuthenticationError')
    """

    def __init__(self, threshold: int | None = DEFAULT_BREAKER_THRESHOLD) -> None:
        self._threshold = threshold
        self._kind: str | None = None
        self._count = 0
        self._opened: NotAttemptedError | None = None

    @property
    def opened(self) -> NotAttemptedError | None:
        """The error submissions not started get once open, or None while closed."""
        return self._opened

    def record(self, outcome: object) -> None:
        """Count one submission's outcome (a result, or its final error)."""
        if self._opened is not None or self._threshold is None:
            return
        kind = systemic_kind(outcome) if isinstance(outcome, NebulaError) else None
        if kind is None:
            self._kind, self._count = None, 0
            return
        self._count = self._count + 1 if kind == self._kind else 1
        self._kind = kind
        if self._count >= self._threshold:
            assert isinstance(outcome, NebulaError)
            self._opened = NotAttemptedError(
                f"not attempted: the batch stopped after {self._count} consecutive "
                f"submissions failed ({kind}: {type(outcome).__name__}: {outcome})",
                reason="circuit_open",
                cause=outcome,
            )
