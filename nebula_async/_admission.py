"""Admission: how many one-off calls (``img2img``, ``run_job``) are under way at once.

Users gather these by the thousand. At most ``limit`` (the client's
``max_concurrency``) are under way; the others wait, first come first served,
before they build anything (their cancel scope, the encoded body, the attempt's
frames). So a gathered call that has not started holds only its coroutine, and
an admitted call goes straight on to its concurrency slot instead of queueing
there with its state built, behind others that did the same.

A call that sleeps in a retry backoff lends its place to the next waiting call
(or the next to come) and, once awake, takes the next place that comes free,
before any new call: so a backoff does not idle a concurrency slot, and a retry
is not sent behind every call gathered after it. At most ``limit`` places are
lent at once (beyond that a sleeper keeps its own), so at most ``2 x limit``
calls ever hold their state, however many sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import anyio

__all__ = ["Admission", "Place"]


class Admission:
    """The queue of one-off calls: ``place = await admission.take()``, then
    ``place.leave()`` in a ``finally``. (A waiting call holds nothing but its
    coroutine: the :class:`Place` is made once it is let in.)

    Two queues and a count rather than an ``anyio.Semaphore``: a sleeper back from
    its backoff is served before new calls, so every place that comes free must
    pass through :meth:`_give`, and a semaphore gives back, by itself and past
    that, a place handed to a waiter natively cancelled before it resumed. The
    waiters are bare futures, as in anyio's own semaphore: an ``anyio.Event`` each
    cost 120 MiB more over 100,000 gathered calls (314 against 193 MiB, measured).
    """

    __slots__ = ("_arriving", "_free", "_lent", "_limit", "_returning")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free = limit  # places nobody holds; while one is free, nobody waits
        self._lent = 0  # places lent by sleepers not yet back under way
        self._returning: deque[asyncio.Future[None]] = deque()  # sleepers awake, first
        self._arriving: deque[asyncio.Future[None]] = deque()  # new calls, in turn

    @property
    def waiting(self) -> int:
        """Calls waiting for a place, sleepers back from a backoff included (one
        cancelled counts until its task next runs)."""
        return len(self._arriving) + len(self._returning)

    async def take(self) -> Place:
        """Wait for a place: first come first served, after any sleeper back from a
        backoff. A free place is taken without a turn of the event loop: the call's
        send is one anyway (one call awaited at a time would pay a turn for each)."""
        if self._free:
            self._free -= 1
        else:
            await self._wait_in(self._arriving)
        return Place(self)

    def _give(self) -> None:
        """A place came free: to the first sleeper back from a backoff, else to the
        first new call waiting, else it stays free."""
        for queue in (self._returning, self._arriving):
            while queue:
                waiter = queue.popleft()
                if not waiter.cancelled():  # cancelled, its task has yet to run: skip it
                    waiter.set_result(None)
                    return
        self._free += 1

    async def _take_back(self) -> None:
        """The next place that comes free, for a sleeper back from its backoff."""
        if self._free:
            self._free -= 1
        else:
            await self._wait_in(self._returning)

    async def _wait_in(self, queue: deque[asyncio.Future[None]]) -> None:
        """Wait in ``queue`` until :meth:`_give` hands this caller a place."""
        handed = asyncio.get_running_loop().create_future()
        queue.append(handed)
        try:
            await handed
        except BaseException:
            if handed.done() and not handed.cancelled():
                self._give()  # handed over just as it was cancelled: pass it on
            else:
                handed.cancel()
                with contextlib.suppress(ValueError):  # unless _give skipped it already
                    queue.remove(handed)
            raise


class Place:
    """One call's place under way; :meth:`sleep` lends it out during a backoff."""

    __slots__ = ("_admission", "_held")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = True

    def leave(self) -> None:
        """The call is over: its place, if it holds one, goes to the next."""
        if self._held:
            self._held = False
            self._admission._give()

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds with this place lent out (to the next waiting call,
        or the next to come), then take the next one that comes free, before any new
        call; keep it if ``limit`` are lent already.

        Cancelled while asleep or waiting, the call holds no place, and
        :meth:`leave` gives none back.
        """
        admission = self._admission
        if admission._lent >= admission._limit:
            await anyio.sleep(delay)
            return
        admission._lent += 1
        self.leave()
        try:
            await anyio.sleep(delay)
            await admission._take_back()
            self._held = True
        finally:
            admission._lent -= 1
