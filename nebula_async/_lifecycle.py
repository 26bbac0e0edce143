"""The client's lifecycle: one small state machine that owns shutdown.

``new -> open -> (draining ->) closed``. Every call the client runs (an
``img2img``, a job, a stream's pipeline) runs inside a cancel scope registered
here, so :meth:`Lifecycle.close` stops them all at once, structured: it cancels
their scopes, and each call turns that cancellation into a
:class:`~nebula_async.ClientStateError` for its caller. Nothing is checked
mid-retry by string comparison: a closed client cancels, and a draining one is
asked through :meth:`Lifecycle.require_open` before new work starts.

Why a scope per call, although it costs a gathered ``img2img`` 58-65k instructions
(whole client, against raw aiohttp's ~550k; a gathered call's task is new to anyio,
and its first scope enters it in anyio's weak-keyed table of task states;
docs/design.md, "The instruction guard"): cancelling the caller's task itself
(``Task.cancel()``/``uncancel()``, as ``asyncio.timeout`` does) is cheaper, and a
review found it wrong where a scope is right. A native cancel is delivered once,
where a scope's is repeated until it lands; it does not respect an anyio shield; it
may reach a call's task group after the caller's own anyio deadline and escape the
caller's ``move_on_after``; and ``aclose()`` from inside a call's own task (a custom
limiter acting as a kill switch) could not stop that call.
"""

from __future__ import annotations

import contextvars
import enum
import weakref
from types import TracebackType
from typing import Final, Protocol

import anyio

from ._exceptions import ClientStateError

__all__ = ["CLOSE_GRACE_S", "Drainable", "Lifecycle", "State"]


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


#: The innermost running call of the current task (its context), which a task
#: started inside that call inherits: what :meth:`Lifecycle.wait_for_calls` must
#: not wait for when it runs inside one (a limiter that closes the client).
_ENCLOSING: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "nebula_async_enclosing_call", default=None
)
#: How long ``aclose()`` waits for cancelled calls to end (a shielded section, a
#: limiter's last write) before it closes the session and the limiter anyway.
CLOSE_GRACE_S: Final = 10.0


class _Call:
    """One running call: ``with lifecycle.call():``, its body in a cancel scope
    that :meth:`Lifecycle.close` cancels.

    A plain class rather than ``contextlib.contextmanager``: the generator and its
    helper cost 9k instructions a call (721.7k -> 712.6k per img2img, measured).
    """

    __slots__ = ("_lifecycle", "_scope", "_token", "parent")

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._scope = anyio.CancelScope()
        self.parent: _Call | None = None

    def __enter__(self) -> None:
        self._scope.__enter__()
        self._lifecycle._calls.add(self)
        self.parent = _ENCLOSING.get()
        self._token = _ENCLOSING.set(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _ENCLOSING.reset(self._token)
        lifecycle = self._lifecycle
        lifecycle._calls.discard(self)
        if lifecycle._call_ended is not None:
            lifecycle._call_ended.set()
        scope = self._scope
        # The scope swallows only its own cancellation (then cancelled_caught is
        # set), which becomes the caller's ClientStateError; anything else goes on.
        scope.__exit__(exc_type, exc, traceback)
        if scope.cancelled_caught:
            raise ClientStateError(
                "the NebulaClient was closed while this call was running"
            ) from None

    def cancel(self) -> None:
        self._scope.cancel()


class Lifecycle:
    """The state, the scopes of running calls, and the streams to drain."""

    def __init__(self) -> None:
        self.state = State.NEW
        self._calls: set[_Call] = set()
        self._call_ended: anyio.Event | None = None  # set as each call ends, while closing
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
        return _Call(self)

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

    async def wait_for_calls(self) -> None:
        """After :meth:`close`: wait until every call has ended but those the caller
        runs inside, which cannot end before it returns. The caller bounds the wait
        (``aclose()``: :data:`CLOSE_GRACE_S`); :meth:`still_running` tells what is left.
        """
        while self.still_running():
            self._call_ended = anyio.Event()
            await self._call_ended.wait()

    def still_running(self) -> int:
        """How many calls run, not counting those the caller runs inside."""
        mine: set[_Call] = set()
        call = _ENCLOSING.get()
        while call is not None:
            mine.add(call)
            call = call.parent
        return len(self._calls - mine)
