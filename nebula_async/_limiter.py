"""The limiter seam: what the client asks of a rate limiter, in durations.

The client speaks to its rate limiter through :class:`Limiter` only, so the
embedded in-process limiter (``InProcessLimiter``: a GCRA schedule, a pause gate
and the adaptive controller) and a shared one (``SharedRateLimit``'s Redis
limiter, one schedule for many processes on many machines) are interchangeable.
Nothing here is an absolute time: a limiter keeps its own clock (the in-process
one ``time.monotonic``, the Redis one Redis' ``TIME``), so nothing the client
holds can disagree with it.

One attempt::

    ticket = await limiter.acquire()       # waits out a pause, then for a send slot
    ... send ...
    await limiter.record(ticket, Outcome.ACCEPTED)          # or REFUSED / FAILED / UNUSED,
                                                            # with the answer's Retry-After

A ticket is opaque to the client; a limiter uses it to tell a refusal of a
request sent before its last rate cut (old news) from a new one.

``rate_limit=`` takes a float, a :class:`~nebula_async.RateLimit`, a
:class:`~nebula_async.SharedRateLimit`, any :class:`LimiterFactory` (an object
whose ``create_limiter()`` the client calls in the running loop and whose limiter
it closes), or a :class:`Limiter` itself (shared between clients, closed by its
owner).
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import attrs

__all__ = ["Limiter", "LimiterFactory", "LimiterStatistics", "Outcome"]


class Outcome(enum.Enum):
    """What became of a send slot, as :meth:`Limiter.record` is told."""

    #: The service took the request (any answer that is not a rate refusal).
    ACCEPTED = "accepted"
    #: Refused for the rate: HTTP 429 or body code 429.
    REFUSED = "refused"
    #: Nothing usable came back (a connection error, a timeout, a 5xx, the caller
    #: cancelled while it was being sent): says nothing about the rate, though a
    #: ``retry_after`` still pauses everyone. For a cancelled send ``record()`` is
    #: given no time: one that must wait (I/O) is cut off at its first wait.
    FAILED = "failed"
    #: The slot was not used: a re-login began meanwhile, the batch stopped, or
    #: the request was refused before anything went out.
    UNUSED = "unused"


@attrs.frozen(kw_only=True)
class LimiterStatistics:
    """A snapshot of a limiter.

    ``current_rate``: the requests per second it allows now (None: unlimited);
    ``estimated_limit``: its estimate of the limit the service enforces (None until
    a refusal told it anything); ``paused_for_s``: what is left of a ``Retry-After``
    pause (0 when none); ``acquired``, ``refused``: slots handed out, and refusals
    recorded; ``decreases``: times the adaptive rate was cut.
    """

    current_rate: float | None
    estimated_limit: float | None = None
    paused_for_s: float = 0.0
    acquired: int = 0
    refused: int = 0
    decreases: int = 0


@runtime_checkable
class Limiter(Protocol):
    """A rate limiter the client can use: the embedded one, a shared one, or yours.

    ``acquire()`` waits until a request may be sent (after any pause in force) and
    returns a ticket; ``record(ticket, outcome, retry_after=)`` says what became of
    it, with the ``Retry-After`` of the answer in seconds if it had one (a pause
    for every user of the limiter); ``statistics()`` reads the current rate;
    ``aclose()`` releases what it holds (a connection).

    >>> class Unlimited:
    ...     async def acquire(self) -> object:
    ...         return None
    ...     async def record(self, ticket, outcome, *, retry_after=None) -> None:
    ...         pass
    ...     def statistics(self) -> LimiterStatistics:
    ...         return LimiterStatistics(current_rate=None)
    ...     async def aclose(self) -> None:
    ...         pass
    >>> isinstance(Unlimited(), Limiter)
    True
    """

    async def acquire(self) -> object:
        """Wait for a send slot; return a ticket for :meth:`record`."""
        ...

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """Report what became of the slot of ``ticket``; ``retry_after`` pauses all."""
        ...

    def statistics(self) -> LimiterStatistics:
        """A frozen snapshot: the current rate, the estimated limit, the pause."""
        ...

    async def aclose(self) -> None:
        """Release what the limiter holds; it is not used afterwards."""
        ...


@runtime_checkable
class LimiterFactory(Protocol):
    """Configuration that makes a :class:`Limiter` inside the running event loop.

    :class:`~nebula_async.SharedRateLimit` is one; being plain configuration, it
    pickles (to a Ray actor, a worker process) and connects only where it is used.
    (A :class:`~nebula_async.RateLimit` is configuration too, which the client
    turns into its in-process limiter.)
    """

    def create_limiter(self) -> Limiter:
        """A new limiter, owned (and closed) by the client that asked for it."""
        ...
