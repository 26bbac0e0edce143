"""The client's lifecycle: one small state machine that owns shutdown.

``new -> open -> (draining ->) closed``. Every call the client runs (an
``img2img``, a job, a stream's pipeline) runs inside a cancel scope registered
here, so :meth:`Lifecycle.close` stops them all at once, structured: it cancels
their scopes, and each call turns that cancellation into a
:class:`~nebula_async.ClientStateError` for its caller. Nothing is checked
mid-retry by string comparison: a closed client cancels, and a draining one is
asked through :meth:`Lifecycle.require_open` before new work starts.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from collections.abc import Iterator
from typing import Protocol

import anyio

from ._exceptions import ClientStateError

__all__ = ["Drainable", "Lifecycle", "State"]


class State(enum.Enum):
    """Where a client is in its life."""

    NEW = "new"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


class Drainable(Protocol):
    """Anything :meth:`Lifecycle.drain` passes the word on to (a running stream)."""

    def drain(self) -> None:
        """Stop taking new work; let the work in flight finish."""


class Lifecycle:
    """The state, the scopes of running calls, and the streams to drain."""

    def __init__(self) -> None:
        self.state = State.NEW
        self._scopes: set[anyio.CancelScope] = set()
        self._streams: weakref.WeakSet[Drainable] = weakref.WeakSet()

    def open(self) -> None:
        """``new -> open``; a client opens once."""
        if self.state is not State.NEW:
            raise ClientStateError(f"this NebulaClient is {self.state.value}; create a new one")
        self.state = State.OPEN

    def require_open(self) -> None:
        """Raise :class:`ClientStateError` unless new work may start."""
        if self.state is State.OPEN:
            return
        hint = {
            State.NEW: "use 'async with NebulaClient(...) as client:'",
            State.DRAINING: "it is draining: no new work starts",
            State.CLOSED: "it was closed; create a new client",
        }[self.state]
        raise ClientStateError(f"NebulaClient is not open: {hint}")

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Run the body in a scope that :meth:`close` cancels.

        A body cancelled that way raises :class:`ClientStateError` instead, and so
        does a call begun after close (a stream made earlier, started late).
        """
        if self.state is State.CLOSED:
            raise ClientStateError("the NebulaClient was closed; create a new client")
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise ClientStateError("the NebulaClient was closed while this call was running")

    def watch(self, stream: Drainable) -> None:
        """Drain ``stream`` too when the client drains (held weakly)."""
        self._streams.add(stream)
        if self.state is State.DRAINING:
            stream.drain()

    def drain(self) -> None:
        """``open -> draining``: running streams stop taking jobs; no new call starts."""
        if self.state is State.OPEN:
            self.state = State.DRAINING
        for stream in list(self._streams):
            stream.drain()

    def close(self) -> bool:
        """``-> closed``, cancelling every running call; False if it was closed already."""
        if self.state is State.CLOSED:
            return False
        self.state = State.CLOSED
        for scope in list(self._scopes):
            scope.cancel()
        return True
