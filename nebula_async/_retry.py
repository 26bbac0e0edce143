"""Retry decisions: what is repeated, and after how long. Pure functions.

What is retried (DESIGN section 4): connection errors, timeouts, HTTP
408/429/500/502/503/504, body codes 429 and 5xx, and malformed answers. Never a
refusal of the request itself (400, 403, 422...), an ``AuthenticationError`` or
a ``ValidationError``.
With ``retry_ambiguous=False`` only failures where the request surely was not
processed are repeated (a failed connect, 429, 503): a generation that may have
run would be billed twice.

The delay is exponential backoff with "full jitter" (AWS Architecture Blog,
"Exponential Backoff And Jitter", 2015): ``uniform(0, min(cap, base * 2**k))``,
which spreads a herd of clients best. A server's ``Retry-After`` replaces it,
unless it exceeds ``retry_after_max``: then waiting is pointless and the error is
raised at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs

from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    NebulaError,
    ResponseDecodeError,
)
from ._models import RetryPolicy

__all__ = ["RetryDecision", "backoff_delay", "decide_retry", "is_retryable"]

RETRYABLE_HTTP_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
# A 429 or 503 means the service turned the request away before doing the work.
NOT_PROCESSED_CODES: Final = frozenset({429, 503})


@attrs.frozen
class RetryDecision:
    """Whether to try again, after how many seconds, and why (for logs)."""

    retry: bool
    delay: float
    reason: str


def _classify(error: NebulaError) -> tuple[bool, bool]:
    """(retryable at all, surely not processed by the server)."""
    if isinstance(error, AuthenticationError):
        # Refused credentials stay refused, whatever code the backend chose for them
        # (a refused login may say 500); a 401 re-login is the client's business.
        return False, False
    if isinstance(error, APIConnectionError):
        return True, not error.request_sent
    if isinstance(error, ResponseDecodeError):
        return True, False
    if isinstance(error, APIStatusError):
        status, code = error.status_code, error.code
        if 200 <= status < 300 and code is not None:
            return code == 429 or 500 <= code < 600, code in NOT_PROCESSED_CODES
        return status in RETRYABLE_HTTP_STATUS, status in NOT_PROCESSED_CODES
    return False, False


def is_retryable(error: NebulaError, policy: RetryPolicy) -> bool:
    """Whether ``error`` is of a kind ``policy`` repeats (ignoring attempts left)."""
    retryable, not_processed = _classify(error)
    return retryable and (policy.retry_ambiguous or not_processed)


def backoff_delay(retry_number: int, policy: RetryPolicy, random: Callable[[], float]) -> float:
    """Full-jitter delay before retry number ``retry_number`` (1 for the first retry).

    >>> backoff_delay(3, RetryPolicy(backoff_base=0.5), lambda: 1.0)
    2.0
    """
    ceiling = min(policy.backoff_max, policy.backoff_base * 2.0 ** (retry_number - 1))
    return random() * ceiling


def decide_retry(
    error: NebulaError,
    *,
    attempts_made: int,
    policy: RetryPolicy,
    random: Callable[[], float],
) -> RetryDecision:
    """Decide what to do after ``attempts_made`` attempts, the last failing with ``error``.

    >>> from nebula_async import ServerError
    >>> decide_retry(ServerError("x", status_code=502), attempts_made=1,
    ...              policy=RetryPolicy(), random=lambda: 0.5).delay
    0.25
    """
    if not is_retryable(error, policy):
        return RetryDecision(False, 0.0, f"not retryable: {type(error).__name__}")
    if attempts_made >= policy.max_attempts:
        return RetryDecision(False, 0.0, f"gave up after {attempts_made} attempts")
    retry_after = error.retry_after if isinstance(error, APIStatusError) else None
    if retry_after is not None:
        if retry_after > policy.retry_after_max:
            return RetryDecision(
                False,
                0.0,
                f"Retry-After {retry_after:g}s exceeds retry_after_max {policy.retry_after_max:g}s",
            )
        return RetryDecision(True, retry_after, f"Retry-After {retry_after:g}s")
    return RetryDecision(
        True, backoff_delay(attempts_made, policy, random), f"backoff after {type(error).__name__}"
    )
