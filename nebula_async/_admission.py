"""Admission: how many one-off calls (``img2img``, ``run_job``) are under way at once.

Users gather these by the thousand. At most ``limit`` (the client's
``max_concurrency``) are under way; the others wait, first come first served,
before they build anything (their cancel scope, the encoded body, the attempt's
frames). So a gathered call that has not started holds only its coroutine, and
an admitted call goes straight on to its concurrency slot instead of queueing
there with its state built, behind others that did the same.

A call that sleeps in a retry backoff lends its place to the next waiting call
and, once awake, takes the next place that comes free, before any new call: so a
backoff does not idle a concurrency slot, and a retry is not sent behind every
call gathered after it. At most ``limit`` places are lent at once (beyond that a
sleeper keeps its own), so at most ``2 x limit`` calls ever hold their state,
however many sleep.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["Admission", "Place"]


class Admission:
    """The queue of one-off calls: ``place = await admission.take()``, then
    ``place.leave()`` in a ``finally``. (A waiting call holds nothing but its
    coroutine: the :class:`Place` is made once it is let in.)"""

    __slots__ = ("_lent", "_limit", "_returning", "_semaphore")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        # A free place is taken without a turn of the event loop: the call's send is
        # one anyway (one call awaited at a time would pay a turn for each).
        self._semaphore = anyio.Semaphore(limit, fast_acquire=True)
        self._lent = 0  # places lent by sleepers not yet back under way
        self._returning: deque[anyio.Event] = deque()  # sleepers awake, first served

    @property
    def waiting(self) -> int:
        """Calls waiting for a place, sleepers back from a backoff included."""
        return self._semaphore.statistics().tasks_waiting + len(self._returning)

    async def take(self) -> Place:
        """Wait for a place, first come first served."""
        await self._semaphore.acquire()
        return Place(self)

    def _give(self) -> None:
        """A place came free: to the first sleeper back from a backoff, else to the queue."""
        if self._returning:
            self._returning.popleft().set()
        else:
            self._semaphore.release()

    async def _take_back(self) -> None:
        """The next place that comes free, for a sleeper back from its backoff."""
        if self._semaphore.value:  # free, so nobody waits for one
            self._semaphore.acquire_nowait()
            return
        handed = anyio.Event()
        self._returning.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self._give()  # handed over just as it was cancelled: pass it on
            else:
                self._returning.remove(handed)
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
        """Sleep ``delay`` seconds with this place lent to the next waiting call,
        then take the next one that comes free; keep it if ``limit`` are lent already.

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
