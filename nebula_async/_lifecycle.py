"""The client's lifecycle: one small state machine that owns shutdown.

``new -> open -> (draining ->) closed``. Every call the client runs (an
``img2img``, a job, a stream's pipeline) is registered here while it runs, so
:meth:`Lifecycle.close` stops them all at once: it cancels each call's task,
and the call turns that cancellation into a
:class:`~nebula_async.ClientStateError` for its caller. Nothing is checked
mid-retry by string comparison: a closed client cancels, and a draining one is
asked through :meth:`Lifecycle.require_open` before new work starts.

Why ``Task.cancel()`` here and anyio everywhere else: a call runs in a task the
client does not own (the caller's), and anyio's one tool for cancelling such a
body is a ``CancelScope`` per call. On asyncio a scope is itself a
``Task.cancel()`` plus bookkeeping, and that bookkeeping (a ``TaskState`` per new
task in a weak dictionary, the scope tree, its checks at exit) cost 41k
instructions per ``img2img`` of the ~720k a whole request costs (1.31x raw
aiohttp against the 1.25x guard). :class:`_Call` keeps the part that is needed,
as ``asyncio.timeout`` does: the cancel, and ``uncancel()`` counting on exit so
that only the cancellation it made becomes an error.
"""

from __future__ import annotations

import asyncio
import enum
import weakref
from types import TracebackType
from typing import Protocol

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


class _Call:
    """One running call, registered with its lifecycle: ``with lifecycle.call():``."""

    __slots__ = ("_calls", "_cancelled", "_cancelling_at_enter", "_task")

    def __init__(self, calls: set[_Call]) -> None:
        self._calls = calls
        self._cancelled = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a NebulaClient call must run in an asyncio task")
        self._task = task
        self._cancelling_at_enter = task.cancelling()
        self._calls.add(self)

    def cancel(self) -> None:
        """Cancel the call's task, unless that task is the one closing (it is not
        waiting in its call, and a cancel would cut its close short)."""
        if self._task is not asyncio.current_task():
            self._cancelled = True
            self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._calls.discard(self)
        # Our cancel is taken back whatever happened; the error is ours to raise only
        # when no other cancellation (the caller's own timeout, say) is pending too.
        if (
            self._cancelled
            and self._task.uncancel() <= self._cancelling_at_enter
            and isinstance(exc, asyncio.CancelledError)
        ):
            raise ClientStateError(
                "the NebulaClient was closed while this call was running"
            ) from None


class Lifecycle:
    """The state, the running calls, and the streams to drain."""

    def __init__(self) -> None:
        self.state = State.NEW
        self._calls: set[_Call] = set()
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

    def call(self) -> _Call:
        """A context for one call's body, which :meth:`close` cancels.

        A body cancelled that way raises :class:`ClientStateError` instead, and so
        does a call begun after close (a stream made earlier, started late).
        """
        if self.state is State.CLOSED:
            raise ClientStateError("the NebulaClient was closed; create a new client")
        return _Call(self._calls)

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
        for call in list(self._calls):
            call.cancel()
        return True
