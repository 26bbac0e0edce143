"""The adaptive rate controller: finds a rate limit the client is not told, sans-I/O.

What a refusal says
-------------------
Most API limits count requests per window: a sliding window (at most ``N`` in
any ``W`` seconds), a fixed window (``N`` per calendar window) or a token bucket
(refilled at ``N / W``). Each refuses a request only when it is *full*, so a
refusal does not say "halve the rate" (the old AIMD, which halved on every 429
and never settled): it says that what the server counted in the last ``W``
seconds is its limit. The controller keeps counts of its sends, accepts and
refusals by the time of sending, and at a refusal of a request sent at ``s``
reads the limit as the sends of ``(s - W, s]`` that were not refused, over ``W``
(answers still in flight count as taken; each that comes back refused takes
one off). That is BBR's idea (the delivery rate measured while the path is full
is the bottleneck's rate; Cardwell et al., "BBR congestion control",
draft-ietf-ccwg-bbr), put in terms of windows. It is exact for a sliding window
whatever the rate we sent at, and even across a pause (a full window holds
``N`` however it filled). A token bucket's burst makes it read high: when
refusals go on within a window of the cut, the rate the server took between
two refusals (full at both ends, so that is its refill rate) replaces it.
Readings at probes that find the limit where it was are averaged (each is off
by a send at the window's edges) until the limit moves.

The rate is then ``(1 - margin) * estimate``, less the GCRA burst (any window of
``W`` holds at most ``burst + W * rate`` sends); once refusals come with
``Retry-After`` (each pauses every send) the margin is taken off the count
itself, not off the allowance for the window's edges too. A refusal is one congestion
event per round trip, as in TCP (RFC 5681's "once per window of data"): refusals
of requests sent before the last cut are echoes of it. While the sends of the
last ``W`` that were not refused already exceed what the estimate allows (a
burst sent before the first refusal), the rate is held until the window slides
past: a client-side image of the server's window, so that no request is sent
into a window that is known to be full. The server counts arrivals, and a
burst's requests arrive spread over some milliseconds (new connections first):
the image frees a few bins late, and a refusal about a window after the last
event that reads far under the estimate is taken for that burst, still in the
server's window, not for a limit.

Start
-----
With no configured rate the controller is unlimited until the first refusal,
which seeds it from what was accepted meanwhile. A configured rate is a guess:
the controller starts at ``start_fraction`` of it and grows ``ramp``-fold per
``W`` (TCP slow start, RFC 5681 s. 3.1; like BBR's STARTUP it stops at the first
sign of a full pipe), never faster than ``ramp`` times what it sent in the last
window, so a guess 3x too high overfills one window only a little, while a
guess too low is left behind within a few windows.

What learning costs is physics, not tuning: the sends of the round trip after
the server's window first fills are refused, whatever the controller does,
``RTT * rate`` of them (0.2 s at 30-45/s: 6-10 for a guess 3x too high; with no
rate, every worker's first request goes at once: ``concurrency - N``). A start
under the limit would cost fewer, and would cost a guess that is right (at 0.35
of the guess and 1.6-fold a window: 3-4 fewer refusals, and 0.96x -> 0.89x for a
right guess over 400 jobs, simulated).

Probing
-------
A limit that was raised is found only by sending faster. After a cut the rate
holds at ``(1 - margin) * estimate`` for ``hold`` seconds (CUBIC's plateau near
``W_max``, RFC 9438 s. 4.2, where a loss is most likely), then grows from there
by ``probe_gain * (2 ** (t / W) - 1)`` (CUBIC's convex region: slow near the old
limit, fast far from it), at most ``probe_ramp``-fold a window (BBR probes at a
pacing gain of 1.25). A probe refused near the old estimate cost about one
refusal and doubles the hold (up to ``hold_max``), so a limit that stays put is
probed ever more rarely; one that found a higher limit resets it.

A limit that fell (a cut to under ``0.75`` of where it stood, in one event or a
few) may move back: the next probe comes ``moved_hold`` after the cut, each that
fails spaces the next ``1.25``-fold (not 2-fold) until back at ``hold``, and
these probes step up 3x faster (the convex curve then passes the old limit within
a second and doubles it within 3). Finding a rise costs refusals either way: a
probe at the old limit is refused, so a rise found within a second of happening
costs a refusal a second while it has not. With
``Retry-After`` every refused probe pauses all sending, so the hold is at least
``pause_hold`` times the pause. Netflix's concurrency-limits (``AIMDLimit``,
``Gradient2Limit``) and Envoy's adaptive concurrency filter steer a concurrency
from latency; an API's rate limit is a count, not a queue, so what is taken from
them is only the shape: a multiplicative backoff bounded per event
(``max_decrease``, their ``backoffRatio``) and a floor (``min_rate``).
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["RateController"]

#: Bins per measuring window: fine enough that a window's edges cost at most 5%.
_BINS_PER_WINDOW: Final = 50
#: Keep counts for sends this many windows back (answers arriving later are ignored).
_HISTORY_WINDOWS: Final = 200
_NEVER: Final = -math.inf
#: Added to a window's count: the oldest bin counts pro rata, as if its sends were
#: spread evenly, and the server counts by arrival, not by sending; against a
#: sliding window of 20, windows read 19.4-20.1 without it.
_EDGE: Final = 0.25
#: A window's oldest bin holding this share of the rest holds a burst.
_BURST_SHARE: Final = 0.25
#: Bins of slack for the server's clock: it counts arrivals, and the requests of a
#: burst arrive spread over some milliseconds (new connections first), while a
#: later send on a warm connection arrives at once.
_GUARD_BINS: Final = 3
#: Per answer: the longest latency seen fades by 2%, so an old outlier is forgotten.
_LATENCY_DECAY: Final = 0.98
#: A refusal whose window held fewer other sends than this reads no limit: one
#: request refused on its own says "not now" (its Retry-After pause covers that),
#: and reading it as "one per window" would crawl for good.
_MIN_READING: Final = 3.0
#: After the limit fell, probing starts ``moved_hold`` after each event and each
#: probe that fails lengthens that by this factor (not 2) until it is back at
#: ``hold``: a limit that moved may move back soon, and probes spaced
#: geometrically cost refusals in the log of the time since. Meanwhile probes
#: step up this many times faster.
_MOVED_GROWTH: Final = 1.25
_MOVED_GAIN: Final = 3.0
#: A reading at the plateau under this share of the estimate: the limit fell.
_FELL: Final = 0.75
# Phases: no rate yet; a fixed rate; slow start from a guess; steering on an estimate.
_UNLIMITED: Final = 0
_FIXED: Final = 1
_STARTING: Final = 2
_STEADY: Final = 3


def _positive(name: str, value: float) -> float:
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def _fraction(name: str, value: float, *, low: float, high: float) -> float:
    number = float(value)
    if not (low <= number <= high):
        raise ValueError(f"{name} must be within [{low}, {high}], got {value!r}")
    return number


class RateController:
    """Steers a send rate onto a rate limit the client is not told.

    Sans-I/O: every method takes ``now``, seconds on the caller's monotonic clock
    (never going backwards), and nothing awaits. Tell it of every send
    (:meth:`on_sent`) and answer (:meth:`on_accepted`, :meth:`on_refused`); ask
    :meth:`rate_at` for the rate to pace at (None: unlimited) and
    :meth:`hold_until` whether the next send should wait for the window to pass.

    ``initial_rate`` None: unlimited until the first refusal. A number: a guess,
    started at ``start_fraction`` of it and ramped up (it may be too high or too
    low). ``ceiling``: never faster. ``adaptive=False``: ``initial_rate`` always.
    ``burst``: the GCRA burst the rate is used with.

    Tuning (keyword-only): ``window`` (seconds the server counts over, 1);
    ``margin`` (how far under the estimate to run, 0.03); ``start_fraction``
    (0.5); ``ramp`` (growth per window while starting, 2); ``hold`` and
    ``hold_max`` (seconds at the plateau before probing, 8 and 120);
    ``probe_gain`` (the first probe's step, 0.05); ``min_rate`` (the floor, 0.1/s
    or the ceiling if lower); ``max_decrease`` (no event cuts below this fraction
    of the rate, 0.25); ``pause_hold`` (with ``Retry-After``, the hold is at least
    this many pauses, 60); ``probe_ramp`` (a probe's growth per window at most,
    1.25); ``moved_hold`` (the hold after the limit fell, 1).

    >>> c = RateController(initial_rate=None)
    >>> c.rate_at(0.0) is None
    True
    >>> for i in range(25):
    ...     c.on_sent(i * 0.01)
    >>> for i in range(20):
    ...     c.on_accepted(i * 0.01, now=0.3)
    >>> for i in range(20, 25):  # the rest come back refused
    ...     c.on_refused(i * 0.01, now=0.4, retry_after=None)
    >>> c.estimated_limit, round(c.rate_at(1.3), 2)  # 20 and a quarter for the edges
    (20.25, 19.64)
    """

    __slots__ = (
        "_adaptive",
        "_bin_width",
        "_bins",
        "_burst",
        "_ceiling",
        "_cut_at",
        "_decreases",
        "_estimate",
        "_event_bins",
        "_first_answer",
        "_hold",
        "_hold_base",
        "_hold_max",
        "_horizon",
        "_last_refused",
        "_latency",
        "_latest_sent",
        "_lower",
        "_margin",
        "_max_decrease",
        "_min_rate",
        "_moved_hold",
        "_pause_hold",
        "_pausing",
        "_phase",
        "_plateau",
        "_pre_cut",
        "_probe_gain",
        "_probe_ramp",
        "_ramp",
        "_reading",
        "_readings",
        "_refused",
        "_settle_until",
        "_settled",
        "_start",
        "_started_at",
        "_unproven",
        "_unproven_hold",
        "_window",
    )

    # Over 60 lines: the tuning knobs, each checked, and the state they start from.
    def __init__(
        self,
        *,
        initial_rate: float | None,
        ceiling: float | None = None,
        adaptive: bool = True,
        burst: int = 1,
        window: float = 1.0,
        margin: float = 0.03,
        start_fraction: float = 0.5,
        ramp: float = 2.0,
        hold: float = 8.0,
        hold_max: float = 120.0,
        probe_gain: float = 0.05,
        min_rate: float = 0.1,
        max_decrease: float = 0.25,
        pause_hold: float = 60.0,
        probe_ramp: float = 1.25,
        moved_hold: float = 1.0,
    ) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        fixed = None if initial_rate is None else _positive("initial_rate", initial_rate)
        self._ceiling = math.inf if ceiling is None else _positive("ceiling", ceiling)
        self._adaptive = bool(adaptive)
        self._burst = burst
        self._window = _positive("window", window)
        self._margin = _fraction("margin", margin, low=0.0, high=0.5)
        self._ramp = _fraction("ramp", ramp, low=1.0, high=16.0)
        self._hold_base = self._hold = _fraction("hold", hold, low=0.0, high=3600.0)
        self._hold_max = _fraction("hold_max", hold_max, low=self._hold_base, high=86400.0)
        self._probe_gain = _fraction("probe_gain", probe_gain, low=0.0, high=1.0)
        self._min_rate = min(_positive("min_rate", min_rate), self._ceiling)
        self._max_decrease = _fraction("max_decrease", max_decrease, low=0.01, high=1.0)
        self._pause_hold = _fraction("pause_hold", pause_hold, low=0.0, high=3600.0)
        self._probe_ramp = _fraction("probe_ramp", probe_ramp, low=1.0, high=16.0)
        self._moved_hold = _fraction("moved_hold", moved_hold, low=0.0, high=self._hold_max)
        self._readings = 1  # probe readings averaged into the estimate
        self._reading = math.inf  # the last event's own reading, less its echoes
        self._pausing = False  # a refusal came with a Retry-After
        self._last_refused = _NEVER  # the send time of the last event's refusal
        self._unproven: float | None = None  # the estimate before a probe raised it
        self._unproven_hold = self._hold  # and the hold, had that probe failed
        fraction = _fraction("start_fraction", start_fraction, low=0.01, high=1.0)
        if fixed is None:
            self._phase = _UNLIMITED
            self._start = math.nan
        elif not self._adaptive:
            self._phase = _FIXED
            self._start = fixed
        else:
            self._phase = _STARTING
            self._start = self._clamp(fixed * fraction)
        self._estimate: float | None = None  # at most what the event's window held
        self._lower = 0.0  # at least what it held
        self._settle_until = _NEVER  # its answers should all be in by then
        self._settled = 0.0  # the estimate that stood before the last cuts
        self._latency = 0.0  # the longest answer lately, decaying
        self._first_answer: tuple[float, float] | None = None  # (sent, answered)
        self._plateau = math.nan  # the rate after the last event
        self._pre_cut: float | None = None  # the rate just before it
        self._started_at = math.nan  # the first send
        self._cut_at = _NEVER  # the last event
        self._event_bins = (0, -1)  # the bins the estimate was read from
        self._horizon = _NEVER  # refusals of sends up to here are echoes
        self._latest_sent = _NEVER
        self._decreases = 0
        self._refused = 0
        self._bin_width = self._window / _BINS_PER_WINDOW
        # bin index -> [sent, accepted, refused], by the time of sending.
        self._bins: dict[int, list[int]] = {}

    # -- reading ---------------------------------------------------------------------------

    @property
    def estimated_limit(self) -> float | None:
        """Requests per second the server is believed to allow (None: no refusal yet)."""
        return None if self._estimate is None else self._working()

    @property
    def decreases(self) -> int:
        """How many congestion events lowered the rate."""
        return self._decreases

    @property
    def refused(self) -> int:
        """Refusals reported, echoes included."""
        return self._refused

    def rate_at(self, now: float) -> float | None:
        """The rate to send at ``now``, requests per second (None: unlimited)."""
        return self._pace(now)

    def hold_until(self, now: float) -> float:
        """The earliest time a new send should go; ``now`` when it may go at once.

        Later than ``now`` while the sends of the last window that were not
        refused already fill what the estimate allows: a burst sent before the
        first refusal (while unlimited, or at a guess too high) keeps the server's
        window full until it slides past, and sending meanwhile would only be
        refused. A limiter treats it like a short pause, for new reservations only.
        It is the client-side image of a sliding window; for a token bucket or a
        fixed window it is merely cautious, and in steady pacing it never holds.
        """
        if self._phase == _UNLIMITED:
            return self._first_round_hold(now)
        rate = self._pace(now)
        estimate = self._estimate
        if rate is None or estimate is None or self._phase != _STEADY:
            return now
        start = now
        if now < self._settle_until and self._lower < 0.9 * estimate:
            # The event's window is still being answered, and what it held is
            # unsure by over 10%: wait for its answers (a round trip at most),
            # and then for the window too, if it is still full.
            start = self._settle_until
        return self._window_frees(start, rate)

    def _window_frees(self, now: float, rate: float) -> float:
        """``now``, or when the sends of the last window not refused fall to what
        the estimate allows."""
        allowed = max(self._target(self._working()), rate) * self._window
        # Whole bins only: the oldest, partly outside the window, is left out, so
        # that steady pacing at ``rate`` (about ``allowed`` sends a window) never
        # counts as full; a burst is many more.
        first = self._index(now - self._window) + 1
        last = self._index(now)
        bins = self._bins
        held = 0
        for index in range(first, last + 1):
            counts = bins.get(index)
            if counts is not None:
                held += counts[0] - counts[2]
        if held <= allowed:
            return now
        for index in range(first, last + 1):
            counts = bins.get(index)
            if counts is not None:
                held -= counts[0] - counts[2]
            if held <= allowed:
                # (To the end of the bin: a burst is sent at one instant within it.)
                free_at = (index + 1 + _GUARD_BINS) * self._bin_width + self._window
                return free_at if free_at > now else now
        return now

    # -- events ----------------------------------------------------------------------------

    def on_sent(self, now: float) -> None:
        """A request was sent at ``now``."""
        if math.isnan(self._started_at):
            self._started_at = now
        if now > self._latest_sent:
            self._latest_sent = now
        self._bin(now)[0] += 1
        self._forget(now)

    def on_accepted(self, sent_at: float, now: float) -> None:
        """The request sent at ``sent_at`` got an answer that is not a rate refusal."""
        self._latency = max(self._latency * _LATENCY_DECAY, now - sent_at)
        if self._first_answer is None:
            self._first_answer = (sent_at, now)
        index = self._index(sent_at)
        counts = self._bins.get(index)
        if counts is not None:
            counts[1] += 1
        first, last = self._event_bins
        estimate = self._estimate
        if estimate is not None and first <= index <= last:
            # An answer from the window the estimate was read from: it was taken.
            self._lower = min(self._lower + 1.0 / (self._readings * self._window), estimate)
            self._plateau = self._after_cut(self._pre_cut, self._working())

    def on_refused(self, sent_at: float, now: float, *, retry_after: float | None) -> None:
        """The request sent at ``sent_at`` was refused for the rate (HTTP or body 429).

        ``retry_after`` is the answer's ``Retry-After`` in seconds, if any; the
        limiter holds sends for it. To the controller it is one event like any
        refusal: the pause is not a reason to slow down afterwards.
        """
        self._refused += 1
        self._latency = max(self._latency * _LATENCY_DECAY, now - sent_at)
        index = self._index(sent_at)
        counts = self._bins.get(index)
        if counts is not None:
            counts[2] += 1
        if self._phase == _FIXED:
            return
        if sent_at <= self._horizon:
            # Sent before the last cut could take effect: an echo. If it was in the
            # window the estimate was read from, that window held one fewer.
            first, last = self._event_bins
            estimate = self._estimate
            if estimate is not None and first <= index <= last:
                self._estimate = max(self._echo(estimate), self._min_rate)
                self._lower = min(self._lower, self._estimate)
                self._plateau = self._after_cut(self._pre_cut, self._working())
            return
        most, _ = self._window_count(sent_at)
        if self._phase == _UNLIMITED and most - _EDGE < _MIN_READING:
            return  # nothing to read a limit from yet: stay unlimited
        if self._at_the_edge(sent_at, most):
            return
        self._congestion(sent_at, now, retry_after)

    # -- internals -------------------------------------------------------------------------

    def _at_the_edge(self, sent_at: float, most: float) -> bool:
        """Whether a refusal is the last event's burst still in the server's window:
        sent about a window after it (within the guard, where the server's clock
        and ours disagree) and reading far under the estimate, its window missing
        that burst. It says nothing new, like an echo."""
        estimate = self._estimate
        if estimate is None or most / self._window >= _FELL * estimate:
            return False
        guard = _GUARD_BINS * self._bin_width
        return abs(sent_at - self._window - self._last_refused) <= guard

    def _echo(self, estimate: float) -> float:
        """The estimate once an echo says the event's window held one fewer: the
        reading loses one; a mean of readings loses that reading's share; an
        estimate below the reading (a cut to the one before) stays until the
        reading falls under it."""
        self._reading -= 1.0 / self._window
        if self._readings > 1:
            return estimate - 1.0 / (self._readings * self._window)
        return min(estimate, self._reading)

    def _pace(self, now: float) -> float | None:
        """The rate of the current phase."""
        phase = self._phase
        if phase == _UNLIMITED:
            return None
        if phase == _FIXED:
            return self._start
        if phase == _STARTING:
            if math.isnan(self._started_at):
                return self._start
            return self._grown(self._start, now - self._started_at, now)
        since = now - self._cut_at - self._hold
        plateau = self._plateau
        if since <= 0.0:
            rate = plateau
        else:
            gain = self._probe_gain
            if self._hold < self._hold_base:
                gain *= _MOVED_GAIN  # a limit that moved lately is probed harder
            step = gain * (2.0 ** (since / self._window) - 1.0)
            cap = self._sent_cap(now, self._probe_ramp)
            rate = self._clamp(min(plateau * (1.0 + step), cap))
        return rate

    def _congestion(self, sent_at: float, now: float, retry_after: float | None) -> None:
        """A new congestion event: re-read the limit, cut to just under it."""
        most, least = self._window_count(sent_at)
        measured = self._refill_reading(sent_at, most / self._window)
        self._last_refused = sent_at
        self._reading = measured
        current = self._pace(now)
        previous = self.estimated_limit
        probing = self._phase == _STEADY and now > self._cut_at + self._hold
        measured, lower = self._reread(measured, least / self._window, previous, probing, now)
        if retry_after is not None:
            self._pausing = True
            # Each refused probe will cost a pause of this much: probe rarely enough
            # that pauses cost at most 1 / pause_hold of the time.
            self._hold = max(self._hold, self._pause_hold * retry_after)
        self._estimate = max(measured, self._min_rate)
        if probing and self._unproven is None:
            self._settled = self._estimate  # confirmed where it was
        self._lower = max(min(lower, self._estimate), self._min_rate)
        self._event_bins = (self._index(sent_at - self._window), self._index(sent_at))
        self._settle_until = sent_at + 1.25 * max(self._latency, now - sent_at)
        new = self._after_cut(current, self._working())
        if current is not None and new < current * 0.999:
            self._decreases += 1
        self._pre_cut = current
        self._plateau = new
        self._phase = _STEADY
        self._cut_at = now
        self._horizon = max(now, self._latest_sent)

    def _refill_reading(self, sent_at: float, measured: float) -> float:
        """The window's reading, or the server's refill rate when refused again
        within a window of the last event despite the cut.

        When the server took some in between, it was full at both ends and
        refilling meanwhile (a token bucket, whose burst made the window's count too
        high): what it took in between is its rate. Over a short span that is a few
        requests, so it is taken at one standard deviation above (counts vary about
        as their square root). When it took none, it is a window that a burst filled
        and that has yet to slide past: the count stands. Counted from the end of
        the last refusal's bin, so that a burst sent with it is left out; and only
        if the server was fed meanwhile at about the rate the window read (not held
        back by hold_until): an idle span says nothing of it.
        """
        last = self._last_refused
        unproven = self._unproven
        self._unproven = None
        if sent_at - last > self._window:
            return measured
        start = (self._index(last) + 1) * self._bin_width
        span = sent_at - start
        between = self._accepted_between(start, sent_at)
        fed = self._count_between(start, sent_at, 0) >= 0.9 * measured * span
        if not (span > 0.0 and between >= 2.0 and fed):
            return measured
        upper = (between + math.sqrt(between)) / span
        if unproven is not None and upper <= 1.5 * unproven:
            # Soon after a probe read a higher limit, and the server takes about
            # what it took before: the probe saw a token bucket's burst, refilled
            # while we sat under the limit. Back to before, and to the hold of a
            # probe that failed.
            upper = unproven
            self._hold = self._unproven_hold
        return min(measured, upper)

    def _reread(
        self, measured: float, lower: float, previous: float | None, probing: bool, now: float
    ) -> tuple[float, float]:
        """The estimate and its lower bound after an event that read ``measured``
        (and ``lower`` surely taken), and the hold before the next probe."""
        if probing and previous is not None and measured > 1.15 * previous:
            # A probe found a higher limit (unless refused again soon: see
            # _refill_reading); it may rise again, so probe as often as at first.
            self._unproven = previous
            self._unproven_hold = min(max(self._hold * 2.0, self._hold_base), self._hold_max)
            self._hold = self._hold_base
        elif probing:
            # A probe found the limit where it was: probe less often (but often
            # while it moved lately: it may move again).
            if self._hold < self._hold_base:
                self._hold = min(self._hold * _MOVED_GROWTH, self._hold_base)
            else:
                self._hold = min(max(self._hold * 2.0, self._hold_base), self._hold_max)
            last = self._estimate
            if last is not None and previous is not None and measured >= 0.85 * previous:
                # The mean of the readings since the limit last moved (each is off by
                # a send at the window's edges), from the last reading itself, not
                # the working estimate, lower while its window's answers were out.
                readings = self._readings = self._readings + 1
                return last + (measured - last) / readings, last + (lower - last) / readings
        elif previous is not None:
            # Refused at the plateau (or in the pause after an event): the last
            # reading was too high, or the limit fell.
            if now - self._cut_at > 2.0 * self._window:
                self._settled = previous  # it stood a while: a cut starts from it
            if measured < _FELL * self._settled:
                # Well under where it stood (after one cut or several): the limit
                # fell, and a limit that moved may move back: probe soon.
                self._hold = self._moved_hold
                self._settled = measured
            measured = min(measured, previous)
        self._readings = 1
        return measured, lower

    def _window_count(self, sent_at: float) -> tuple[float, float]:
        """What the server holds in the window of a refusal of a send at ``sent_at``,
        as (at most, at least): the sends of ``(sent_at - W, sent_at]`` (the oldest
        bin pro rata) and of the rest of the refused send's bin (sends at the same
        instant, a burst, may have been taken ahead of it) not refused, and those of
        them accepted. Answers still to come move the two together (see
        :meth:`on_accepted`, :meth:`on_refused`)."""
        bins = self._bins
        width = self._bin_width
        lo = sent_at - self._window
        first = self._index(lo)
        most = least = 0.0
        for index in range(first + 1, self._index(sent_at) + 1):
            counts = bins.get(index)
            if counts is not None:
                most += counts[0] - counts[2]
                least += counts[1]
        oldest = bins.get(first)
        if oldest is not None:
            taken = oldest[0] - oldest[2]
            share = 1.0
            if taken < _BURST_SHARE * most:
                # Pacing: its sends spread over the bin. A burst (many sends at one
                # instant) may lie anywhere in it: then all of it.
                share = min(max(((first + 1) * width - lo) / width, 0.0), 1.0)
            most += taken * share
            least += oldest[1] * share
        return most + _EDGE, least + _EDGE

    def _first_round_hold(self, now: float) -> float:
        """Unlimited, the first round of sends (all that went before the first
        answer) is answered in full before more go, for at most half again the
        first answer's latency: a server that counts arrivals answers those it
        took before those it refused, and workers freed by the first would
        otherwise send a second round into the full window before the first
        refusal comes back (19 more refused of a round of 32 against 20, measured)."""
        first = self._first_answer
        if first is None:
            return now
        sent_at, answered_at = first
        deadline = answered_at + 0.5 * (answered_at - sent_at)
        if now >= deadline:
            return now
        bins = self._bins
        for index in range(self._index(self._started_at), self._index(sent_at) + 1):
            counts = bins.get(index)
            if counts is not None and counts[0] > counts[1] + counts[2]:
                return deadline
        return now

    def _working(self) -> float:
        """The estimate steered by: between what the event's window surely held
        (its accepted sends) and what it may have held (those not refused), at
        least half the latter: while answers are out, a limiter that reserves its
        slots ahead should not bake in a rate from either end."""
        estimate = self._estimate
        assert estimate is not None
        return max(self._lower, 0.5 * estimate)

    def _after_cut(self, current: float | None, estimate: float) -> float:
        """The plateau after an event: the target, never above the rate before it
        (a refusal never speeds us up) nor below ``max_decrease`` of that rate."""
        target = self._target(estimate)
        if current is None:
            return target
        return self._clamp(max(min(current, target), current * self._max_decrease))

    def _target(self, estimate: float) -> float:
        """The rate that keeps any window under ``(1 - margin) * estimate * W`` sends."""
        if self._pausing:
            # Each refusal pauses every send: keep the margin off the count itself,
            # not off the allowance for the window's edges too.
            estimate -= _EDGE / self._window
        allowed = estimate * (1.0 - self._margin) - (self._burst - 1) / self._window
        return self._clamp(allowed)

    def _grown(self, base: float, elapsed: float, now: float) -> float:
        """Slow start: ``base`` grown ``ramp``-fold per window over ``elapsed``."""
        growth = self._ramp ** (max(elapsed, 0.0) / self._window)
        return self._clamp(min(base * growth, self._sent_cap(now, self._ramp)))

    def _sent_cap(self, now: float, gain: float) -> float:
        """Growth stops at ``gain`` times what was sent in the last window, so that a
        send rate lagging the controller's (too few jobs, too few workers) does not
        let the rate run away unseen, and so that a token bucket's burst, which
        hides the limit while it lasts, is spent before the rate is far past it
        (BBR probes at a pacing gain of 1.25 for the same reason)."""
        floor = self._start if self._phase == _STARTING else self._plateau
        # Over the time since the first send while that is less than a window.
        span = min(self._window, max(now - self._started_at, self._bin_width))
        return max(floor, gain * self._count_between(now - span, now, 0) / span)

    def _clamp(self, rate: float) -> float:
        return min(max(rate, self._min_rate), self._ceiling)

    def _index(self, t: float) -> int:
        return math.floor(t / self._bin_width)

    def _bin(self, t: float) -> list[int]:
        index = self._index(t)
        counts = self._bins.get(index)
        if counts is None:
            counts = self._bins[index] = [0, 0, 0]
        return counts

    def _accepted_between(self, lo: float, hi: float) -> float:
        """Accepted sends in ``(lo, hi]``; the edge bins count pro rata."""
        return self._count_between(lo, hi, 1)

    def _count_between(self, lo: float, hi: float, column: int) -> float:
        """Sends (0), accepts (1) or refusals (2) in ``(lo, hi]``, edge bins pro rata."""
        width = self._bin_width
        total = 0.0
        bins = self._bins
        for index in range(self._index(lo), self._index(hi) + 1):
            counts = bins.get(index)
            if counts is None or not counts[column]:
                continue
            start = index * width
            share = (min(hi, start + width) - max(lo, start)) / width
            total += counts[column] * min(max(share, 0.0), 1.0)
        return total

    def _forget(self, now: float) -> None:
        bins = self._bins
        if len(bins) <= 2 * _HISTORY_WINDOWS * _BINS_PER_WINDOW:
            return
        oldest = self._index(now - _HISTORY_WINDOWS * self._window)
        for index in [i for i in bins if i < oldest]:
            del bins[index]
