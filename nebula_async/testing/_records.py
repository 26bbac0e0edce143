"""What the mock server received: one :class:`ReceivedRequest` per img2img request,
and :func:`busiest_window` to read a rate limit back from those records."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import attrs

from ._payload import field_of

__all__ = ["ReceivedRequest", "busiest_window"]


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
    :data:`FAULT_KINDS`, ``"rate_limited"`` for a refusal by the server's rate
    limit, or ``"auth"``), or None; ``status`` the HTTP status sent (0 for a
    dropped connection: the ``drop`` fault, or the server closed before
    answering); ``code`` the body code sent, if any; ``urls`` the image URLs in
    the answer; ``received_at`` the ``time.monotonic()`` of its arrival, the very
    time the rate limit judged it by. The record is made when the request
    arrives, with the answer already decided; the answer itself is sent after
    the configured latency.
    """

    index: int
    payload: dict[str, Any] | None
    authorization: str | None = attrs.field(repr=_redact)
    fault: str | None
    status: int
    code: int | None
    urls: tuple[str, ...]
    received_at: float

    @property
    def rate_limited(self) -> bool:
        """True when the server's rate limit refused this request."""
        return self.fault == "rate_limited"

    def field(self, name: str) -> Any:
        """Return a request field by its snake_case (or camelCase) name, whatever the
        payload style; None when the field was not sent.

        Raises KeyError for a name that is not an img2img field.
        """
        return field_of(self.payload, name)


def busiest_window(times: Iterable[float], window_s: float) -> int:
    """The most of ``times`` that fall in any half-open window ``[t, t + window_s)``.

    With the times of the requests a ``sliding_window`` limit admitted, the answer
    is at most the window's capacity::

        admitted = [r.received_at for r in server.requests if not r.rate_limited]
        assert busiest_window(admitted, 1.0) <= 20

    >>> busiest_window([0.0, 0.5, 0.99, 1.0, 1.2], 1.0)
    4
    """
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    # A busiest window slides right until its last time sits at its right end, so
    # counting, for each time t, the times in (t - window_s, t] finds it.
    recent: collections.deque[float] = collections.deque()
    best = 0
    for t in sorted(times):
        recent.append(t)
        # The same test as the sliding_window limit's: u is in [a, a + W) iff u < a + W.
        while recent[0] + window_s <= t:
            recent.popleft()
        best = max(best, len(recent))
    return best
