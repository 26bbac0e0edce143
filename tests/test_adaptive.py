"""The adaptive rate controller, in virtual time.

Unit tests of the controller's rules, then whole runs against simulated servers
(``tests/simulated_servers.py``: a sliding window, a token bucket and a fixed
window, each refusing with HTTP 429 + ``Retry-After: 1``, HTTP 429 and body code
429, and a limit that changes mid-run), each beside an oracle paced at 0.97 of the
limit, which it knows. Every run is seeded and takes a few milliseconds.

Where a bound here is looser than issue 10's goal (goodput >= 0.97x the oracle's,
<= 1% refused) it says why: mostly a ``Retry-After`` pause, which the client
honours, costing a second of sending per congestion event; and the refusals
needed to learn a limit at all, a fixed cost that only longer runs dilute.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simulated_servers import (
    REFUSAL_STYLES,
    Controller,
    FixedWindow,
    Noisy,
    OracleController,
    Result,
    Server,
    SlidingWindow,
    TokenBucket,
    phases,
    simulate,
)

import nebula_async as na
from nebula_async._adaptive import _EDGE, _GUARD_BINS, RateController
from nebula_async._limiter import Outcome
from nebula_async._limits import InProcessLimiter
from nebula_async.testing import MockNebulaServer, busiest_window

LIMIT = 20.0
SERVERS: dict[str, Callable[[], Server]] = {
    "sliding": lambda: SlidingWindow(LIMIT),
    "bucket": lambda: TokenBucket(LIMIT),
    "fixed": lambda: FixedWindow(LIMIT),
}
#: A start with no rate, a guess 3x too high, and one at half the limit.
STARTS: dict[str, float | None] = {"none": None, "3x": 3 * LIMIT, "half": LIMIT / 2}


def run_pair(
    make_server: Callable[[], Server],
    controller: RateController,
    *,
    retry_after: float | None,
    jobs: int,
    seed: int = 0,
    concurrency: int = 16,
) -> tuple[Result, Result]:
    options = {
        "jobs": jobs,
        "retry_after": retry_after,
        "jitter": 0.1,
        "seed": seed,
        "concurrency": concurrency,
    }
    ours = simulate(controller, make_server(), **options)  # type: ignore[arg-type]
    server = make_server()
    oracle = simulate(OracleController(server, fraction=0.97), server, **options)  # type: ignore[arg-type]
    return ours, oracle


def feed_window(
    controller: RateController, *, sent: int, accepted: int, start: float = 0.0
) -> None:
    """``sent`` sends spread over 0.25 s from ``start``, the first ``accepted`` accepted."""
    for i in range(sent):
        controller.on_sent(start + i * 0.25 / sent)
    for i in range(accepted):
        controller.on_accepted(start + i * 0.25 / sent, now=start + 0.3)


# -- rules ----------------------------------------------------------------------------------


def test_unlimited_until_the_first_refusal_then_seeded_from_what_was_accepted() -> None:
    c = RateController(initial_rate=None)
    feed_window(c, sent=30, accepted=20)
    assert c.rate_at(0.3) is None
    assert c.estimated_limit is None
    for i in range(20, 30):  # the first refusal turns it on, the rest refine it
        c.on_refused(i * 0.25 / 30, now=0.45, retry_after=None)
    assert c.estimated_limit == pytest.approx(20.0 + _EDGE)
    # The window those 30 were sent in is full; once it has passed: 3% under.
    assert c.rate_at(1.3) == pytest.approx(0.97 * (20.0 + _EDGE))


def test_a_fixed_rate_ignores_refusals() -> None:
    c = RateController(initial_rate=7.0, adaptive=False)
    feed_window(c, sent=10, accepted=2)
    c.on_refused(0.2, now=0.4, retry_after=1.0)
    assert c.rate_at(0.4) == 7.0
    assert c.rate_at(100.0) == 7.0
    assert c.decreases == 0
    assert RateController(initial_rate=None, adaptive=False).rate_at(5.0) is None


def test_a_guess_starts_at_a_fraction_and_grows_per_window() -> None:
    c = RateController(initial_rate=40.0, start_fraction=0.5, ramp=2.0)
    assert c.rate_at(0.0) == 20.0
    t = 0.0
    while t < 1.0:  # send at whatever the controller says, all accepted
        c.on_sent(t)
        c.on_accepted(t, now=t)
        rate = c.rate_at(t)
        assert rate is not None
        t += 1.0 / rate
    assert c.rate_at(1.0) == pytest.approx(40.0, rel=0.05)


def test_refusals_of_requests_sent_before_the_cut_are_echoes() -> None:
    c = RateController(initial_rate=None)
    feed_window(c, sent=40, accepted=20)
    c.on_refused(0.15, now=0.4, retry_after=None)
    after_first = c.rate_at(2.0)
    for k in range(15):  # the rest of the same burst comes back refused
        c.on_refused(0.16 + k * 0.005, now=0.41 + k * 0.001, retry_after=None)
    assert c.rate_at(2.0) == after_first
    assert c.refused == 16


def test_retry_after_is_one_event_and_does_not_collapse_the_rate() -> None:
    quiet = RateController(initial_rate=None)
    paused = RateController(initial_rate=None)
    for c, retry_after in ((quiet, None), (paused, 1.0)):
        feed_window(c, sent=30, accepted=20)
        for i in range(20, 30):
            c.on_refused(i * 0.25 / 30, now=0.45, retry_after=retry_after)
    # After the pause, the adapted rate: neither from zero nor the old one. Where
    # each refusal pauses every send, the margin is taken off the count itself, not
    # off the allowance for the window's edges too (a refusal costs a pause there).
    assert quiet.rate_at(1.5) == pytest.approx(0.97 * (20.0 + _EDGE))
    assert paused.rate_at(1.5) == pytest.approx(0.97 * 20.0)
    assert paused.estimated_limit == quiet.estimated_limit


def test_a_refusal_never_raises_the_rate_and_cuts_at_most_to_max_decrease() -> None:
    c = RateController(initial_rate=8.0, start_fraction=1.0, max_decrease=0.5)
    feed_window(c, sent=3, accepted=2)
    before = c.rate_at(0.4)
    assert before is not None
    c.on_refused(0.25 * 2 / 3, now=0.4, retry_after=None)  # an estimate of ~2/s
    assert c.estimated_limit == pytest.approx(2.0 + _EDGE)
    rate = c.rate_at(0.4)
    assert rate == pytest.approx(before / 2)  # half, not down to 2
    feed_window(c, sent=200, accepted=200, start=1.0)
    just_before = c._pace(1.5)  # the rate, without the hold for that burst's window
    assert just_before is not None
    c.on_refused(1.24, now=1.5, retry_after=None)  # plenty accepted: 200/s
    later = c.rate_at(2.3)  # that burst's window has passed; not yet probing again
    assert later is not None
    assert just_before / 2 <= later <= just_before  # not raised by a refusal


def test_the_ceiling_is_never_exceeded() -> None:
    c = RateController(initial_rate=10.0, ceiling=12.0, start_fraction=1.0)
    t = 0.0
    while t < 20.0:
        c.on_sent(t)
        c.on_accepted(t, now=t)
        rate = c.rate_at(t)
        assert rate is not None
        assert rate <= 12.0
        t += 1.0 / rate
    assert c.rate_at(t) == 12.0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"initial_rate": 0.0}, "initial_rate"),
        ({"initial_rate": math.inf}, "initial_rate"),
        ({"initial_rate": None, "ceiling": -1.0}, "ceiling"),
        ({"initial_rate": None, "burst": 0}, "burst"),
        ({"initial_rate": None, "margin": 0.9}, "margin"),
        ({"initial_rate": None, "window": math.nan}, "window"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RateController(**options)  # type: ignore[arg-type]


# -- against simulated servers -------------------------------------------------------------

#: Refusals a 1,000-job run may have, as a share of attempts. Learning the limit
#: costs a fixed number: with no rate, every worker sends at once until the first
#: refusal comes back (16 at 0 s and 16 again at 0.2 s against a window of 20: 12
#: refused); a guess 3x too high starts at 1.5x the limit and overfills the first
#: window for a round trip (about 10). Then each probe for a raised limit costs
#: about one refusal, three against a token bucket, whose burst, refilled while
#: the rate sat just under the limit, hides the limit for a while.
REFUSED_BOUND = {"sliding": 0.025, "fixed": 0.025, "bucket": 0.035}


@pytest.mark.parametrize("style", sorted(REFUSAL_STYLES))
@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize("server", sorted(SERVERS))
def test_converges_on_an_unknown_limit(server: str, start: str, style: str) -> None:
    retry_after = REFUSAL_STYLES[style]
    ours, oracle = run_pair(
        SERVERS[server],
        RateController(initial_rate=STARTS[start]),
        retry_after=retry_after,
        jobs=1000,
    )
    ratio = ours.goodput / oracle.goodput
    assert oracle.refused == 0
    # A Retry-After pauses every send for a second per congestion event (each is
    # ~2% of this 50 s run), and a guess at half the limit takes a second or two of
    # slow start to leave behind.
    assert ratio >= (0.85 if retry_after else 0.95), ratio
    assert ours.refused_share <= REFUSED_BOUND[server], ours.refused


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_long_run_settles_at_the_limit(server: str) -> None:
    """Over 4,000 jobs the cost of learning is diluted: issue 10's goal holds
    for the windows (measured: sliding 0.98x with 0.40% refused, fixed 1.01x with
    0.55%) and almost for the bucket (1.03x with 1.23%; 0.82% before the
    simulator decided requests in arrival order). A token bucket refills while
    the rate sits under its limit, and a probe spends that burst before it is
    refused, reading high (3-5 refusals), so its probes cost the most. The probes'
    readings are averaged without drifting down: the rate at the end is within 6%
    of the limit."""
    ours, oracle = run_pair(
        SERVERS[server], RateController(initial_rate=3 * LIMIT), retry_after=None, jobs=4000
    )
    assert ours.goodput / oracle.goodput >= 0.97
    assert ours.refused_share <= (0.015 if server == "bucket" else 0.01)
    final = ours.rates[-1][1]
    assert final is not None
    assert final >= 0.94 * LIMIT


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_slots_reserved_ahead_cost_more_refusals(server: str) -> None:
    """A limiter whose every waiter reserves its slot at once (rather than the next
    in line only) applies a new rate only after the slots already handed out: a
    round of 12 sleepers at 20/s is 0.6 s late. It still converges."""
    ours = simulate(
        RateController(initial_rate=3 * LIMIT),
        SERVERS[server](),
        jobs=1000,
        jitter=0.1,
        reserve_ahead=True,
    )
    server_ = SERVERS[server]()
    oracle = simulate(OracleController(server_, fraction=0.97), server_, jobs=1000, jitter=0.1)
    assert ours.goodput / oracle.goodput >= 0.95
    assert ours.refused_share <= 0.05


def test_hold_until_waits_out_a_full_window() -> None:
    c = RateController(initial_rate=None)
    for _ in range(16):  # unlimited: 16 at once, all taken, then 16 more
        c.on_sent(0.0)
    for _ in range(16):
        c.on_accepted(0.0, now=0.2)
        c.on_sent(0.2)
    for k in range(16):
        if k < 4:
            c.on_accepted(0.2, now=0.4)
        else:
            c.on_refused(0.2, now=0.4, retry_after=None)
    assert c.estimated_limit == pytest.approx(20.0 + _EDGE)
    # The window holds 20 until the first 16 leave it, a window after they went
    # (to the end of their bin, and a guard of a few bins for the server's clock).
    free_at = 1.0 + 0.02 * (1 + _GUARD_BINS)
    assert c.hold_until(0.4) == pytest.approx(free_at)
    assert c.hold_until(free_at + 0.01) == free_at + 0.01


def test_no_rate_and_many_workers_costs_one_burst() -> None:
    """The issue's case of no rate and 32 workers: 25% refused before; now the first
    burst (32 sent at once against a window of 20) and little else."""
    ours, oracle = run_pair(
        SERVERS["sliding"],
        RateController(initial_rate=None),
        retry_after=None,
        jobs=1000,
        concurrency=32,
    )
    assert ours.goodput / oracle.goodput >= 0.95
    assert ours.refused <= 2 * 32


@pytest.mark.parametrize("server", ["sliding", "bucket", "fixed"])
def test_a_limit_that_changes_is_followed(server: str) -> None:
    """20/s, then 10/s from 20 s, then 30/s from 40 s (1,200 jobs)."""
    limit = phases((0.0, 20.0), (20.0, 10.0), (40.0, 30.0))
    make: Callable[[], Server] = {
        "sliding": lambda: SlidingWindow(limit),
        "bucket": lambda: TokenBucket(limit),
        "fixed": lambda: FixedWindow(limit),
    }[server]
    ours, oracle = run_pair(
        make, RateController(initial_rate=None), retry_after=None, jobs=1200, concurrency=32
    )
    down = ours.settled_after(20.0, target=10.0, low=0.85, high=1.0)
    up = ours.settled_after(40.0, target=30.0, low=0.85, high=1.0)
    # A drop is found within seconds. A limit that fell is probed soon, harder,
    # and then ever more rarely, so the rise is found within seconds too (measured
    # 2.5-6.8 s; before, only by the next probe at a doubled hold: up to 37 s, 0.73x).
    assert down <= 5.0
    assert up <= 8.0
    # Short of 0.97: the seconds at 10/s after the rise (measured 0.94-1.02x).
    assert ours.goodput / oracle.goodput >= 0.93
    assert ours.refused_share <= 0.045


def _events(controller: RateController) -> tuple[list[float], Controller]:
    """The send times of the refusals that were congestion events (not echoes)."""
    found: list[float] = []

    class Watch:
        def __getattr__(self, name: str) -> object:
            return getattr(controller, name)

        def on_refused(self, sent_at: float, now: float, *, retry_after: float | None) -> None:
            before = controller.decreases, controller.estimated_limit
            controller.on_refused(sent_at, now, retry_after=retry_after)
            if (controller.decreases, controller.estimated_limit) != before:
                found.append(sent_at)

    return found, Watch()  # type: ignore[return-value]


@pytest.mark.parametrize("seed", [0, 1])
def test_after_a_fall_probes_come_soon_then_ever_more_rarely(seed: int) -> None:
    """20/s, then 10/s for good from 10 s: the probes after the fall start a second
    after it and space out 1.25-fold (then 2-fold once back at ``hold``), so a
    limit that moved back would be found soon, and one that stays costs refusals
    in the log of the time."""
    found, watched = _events(RateController(initial_rate=None))
    simulate(
        watched,
        SlidingWindow(phases((0.0, 20.0), (10.0, 10.0))),
        jobs=900,
        concurrency=32,
        jitter=0.1,
        seed=seed,
    )
    probes = [t for t in found if t > 11.0]
    assert probes[0] < 13.0  # the first probe, a second or so after the fall
    # Soon: 4 or more in the 10 s after the fall (measured 5; at the plain hold, 2).
    assert sum(t < 21.0 for t in probes) >= 4
    # Then rarely: at most 3 in the run's last 25 s (measured 2), 16 in all (14-15).
    assert sum(t > 60.0 for t in probes) <= 3
    assert len(probes) <= 16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fallen_limit_that_rises_is_found_within_seconds(seed: int) -> None:
    """20/s, 10/s from 5 s, 40/s from 12 s: the probes after a fall step up 3x
    faster on the convex curve, so one that starts after the rise passes 1.3x the
    old limit within seconds and reaches 0.85x the new within 3.5 s more (measured
    2.5-2.6 s; at the plain probe's step it is never within the run's first
    seconds, and a slow start from the probe, tried too, gained 0.1 s)."""
    limit = phases((0.0, 20.0), (5.0, 10.0), (12.0, 40.0))
    run = simulate(
        RateController(initial_rate=None),
        SlidingWindow(limit),
        jobs=900,
        concurrency=32,
        jitter=0.1,
        seed=seed,
    )
    cleared = next(t for t, rate in run.rates if t > 12.0 and rate and rate > 13.0)
    found = next(t for t, rate in run.rates if t > 12.0 and rate and rate > 34.0)
    assert cleared < 16.0
    assert found - cleared < 3.5


def test_the_first_probe_waits_a_whole_hold() -> None:
    """No early probe a window after the first event (it cost a refusal in every
    short run): the plateau holds for ``hold`` seconds."""
    c = RateController(initial_rate=None, hold=8.0)
    feed_window(c, sent=30, accepted=20)
    for i in range(20, 30):
        c.on_refused(i * 0.25 / 30, now=0.45, retry_after=None)
    plateau = c.rate_at(1.5)
    assert plateau is not None
    t, rates = 1.5, []
    while t < 10.0:  # sending at whatever it says, all taken
        c.on_sent(t)
        c.on_accepted(t, now=t)
        rate = c.rate_at(t)
        assert rate is not None
        rates.append((t, rate))
        t += 1.0 / rate
    assert all(rate == plateau for at, rate in rates if at < 0.45 + 8.0)
    assert rates[-1][1] > plateau  # probing from there


def test_a_burst_still_in_the_servers_window_reads_no_new_limit() -> None:
    """The first round (32 at once, 20 taken) is held for a window; a send just
    after it is refused, because the server counts arrivals and the burst's arrived
    over some milliseconds (new connections): its window, by our clock, misses the
    burst and reads ~1/s. Read as a limit, that crawled at 7/s for 12 s on
    loopback; it is the burst, still in the window, like an echo."""
    c = RateController(initial_rate=None)
    for i in range(32):
        c.on_sent(0.001 * (i // 16) + 0.019)  # across two bins, as on loopback
    for i in range(32):
        sent = 0.001 * (i // 16) + 0.019
        if i < 20:
            c.on_accepted(sent, now=0.22)
        else:
            c.on_refused(sent, now=0.23, retry_after=None)
    estimate = c.estimated_limit
    assert estimate == pytest.approx(20.0 + _EDGE, abs=1.0)
    held = c.hold_until(0.3)
    assert held > 1.0
    c.on_sent(held - 0.04)  # a send a guard's width early, as a late timer might
    c.on_refused(held - 0.04, now=held + 0.16, retry_after=None)
    assert c.estimated_limit == estimate
    assert c.decreases <= 1


@pytest.mark.anyio
async def test_a_slot_reserved_before_a_refusal_waits_for_the_window() -> None:
    """A caller asleep on its slot when a refusal says the server's window is full
    takes a new slot after the hold, as after a Retry-After (on loopback two such
    slots went out into the full window, each refused)."""
    from test_limits import FakeController, VirtualTime, with_virtual_time

    controller = FakeController(10.0)
    vt = VirtualTime()
    limiter = InProcessLimiter(controller, clock=vt.clock, sleep=vt.sleep)
    slots: list[float] = []

    async def body() -> None:
        first = await limiter.acquire()
        slots.append(first)

        async def second() -> None:
            slots.append(await limiter.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await vt.sleep(0.05)  # the second caller sleeps until its slot at 0.1
            controller.hold = 1.0  # the refusal's window is full until 1.0
            await limiter.record(first, Outcome.REFUSED)

    await with_virtual_time(vt, body)
    assert slots[0] == 0.0
    assert slots[1] >= 1.0


# -- on loopback, real clock ---------------------------------------------------------------


class _Factory:
    """``rate_limit=`` through the limiter seam: the in-process limiter as it is, with
    this controller."""

    def __init__(self, initial_rate: float | None) -> None:
        self.initial_rate = initial_rate

    def create_limiter(self) -> InProcessLimiter:
        return InProcessLimiter(RateController(initial_rate=self.initial_rate))


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_rate_3x_too_high_completes_every_job_on_loopback() -> None:
    """120 jobs against a sliding window of 40/s that the client is told is 120/s:
    every job done, the window never exceeded, a few refusals while learning."""
    request = na.Img2ImgRequest(model="m", prompt="a fox", image="https://example.com/a.png")
    async with MockNebulaServer(
        rate_limit=40.0, rate_limit_algorithm="sliding_window", retry_after=None, latency=0.05
    ) as server:
        async with na.NebulaClient(
            token="mock-token",
            base_url=server.base_url,
            max_concurrency=16,
            rate_limit=_Factory(120.0),
        ) as client:
            report = await client.run_batch([request] * 120)
    assert report.succeeded == 120
    assert report.failed == 0
    refused = sum(r.rate_limited for r in server.requests)
    # Learning costs: a start at half the guess, 1.5x the limit, for a round trip,
    # with 16 slots reserved ahead at that rate (measured: 24).
    assert 0 < refused <= 32
    admitted = [r.received_at for r in server.requests if not r.rate_limited]
    assert busiest_window(admitted, 1.0) <= 40
    assert report.elapsed_s < 6.0


# -- invariants ----------------------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.sampled_from(["sent", "accepted", "refused", "refused_pause"]),
        st.floats(min_value=0.0, max_value=0.5),  # time since the previous event
        st.floats(min_value=0.0, max_value=3.0),  # latency of an answer
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    events=events,
    initial=st.one_of(st.none(), st.floats(min_value=0.5, max_value=500.0)),
    ceiling=st.one_of(st.none(), st.floats(min_value=1.0, max_value=300.0)),
    burst=st.integers(min_value=1, max_value=5),
)
def test_the_rate_stays_within_its_bounds(
    events: list[tuple[str, float, float]],
    initial: float | None,
    ceiling: float | None,
    burst: int,
) -> None:
    c = RateController(initial_rate=initial, ceiling=ceiling, burst=burst)
    top = math.inf if ceiling is None else ceiling
    floor = min(0.1, top)
    now = 0.0
    refused = False
    decreases = 0
    for kind, step, latency in events:
        now += step
        sent_at = max(0.0, now - latency)
        if kind == "sent":
            c.on_sent(now)
        elif kind == "accepted":
            c.on_accepted(sent_at, now)
        else:
            c.on_refused(sent_at, now, retry_after=1.0 if kind == "refused_pause" else None)
            # Unlimited, a refusal reads a limit only from a window of a few sends.
            refused = refused or initial is not None or c.estimated_limit is not None
        rate = c.rate_at(now)
        if refused:
            assert rate is not None
            assert c.estimated_limit is not None
        if rate is not None:
            assert floor <= rate <= top
            assert math.isfinite(rate)
        assert c.decreases >= decreases
        decreases = c.decreases
    assert c.refused == sum(kind.startswith("refused") for kind, _, _ in events)


def test_a_lone_refusal_of_an_unlimited_client_reads_no_limit() -> None:
    # One request refused on its own (a Retry-After for a single call) says "not
    # now", not "one per window": the pause covers it, and the rate stays unlimited.
    c = RateController(initial_rate=None)
    c.on_sent(0.0)
    c.on_refused(0.0, now=0.01, retry_after=0.5)
    assert c.rate_at(1.0) is None
    assert c.estimated_limit is None
    feed_window(c, sent=30, accepted=20, start=2.0)  # a real burst, refused in part
    c.on_refused(2.0 + 20 * 0.25 / 30, now=2.3, retry_after=None)
    assert c.estimated_limit == pytest.approx(20.0 + _EDGE)


def _goodput(server: Callable[[], Server]) -> float:
    runs = [
        simulate(
            RateController(initial_rate=None),
            server(),
            jobs=3000,
            concurrency=64,
            latency=0.3,
            seed=seed,
            max_time=3000,
        )
        for seed in range(3)
    ]
    return sum(run.goodput for run in runs) / len(runs)


@pytest.mark.xfail(
    strict=True,
    reason="known weakness (docs/concepts/limits.md): each random 429 reads as a full "
    "window and cuts the rate; at 1% with no limit the run keeps 0.20x of its speed",
)
def test_refusals_at_random_are_not_read_as_a_limit_that_keeps_falling() -> None:
    """A server with no limit that refuses 1% of requests at random, at about 200
    answers a second: a demanding user expects to lose about that 1%, not 80% of
    the throughput. Strict: when a rule tells noise from a full window, this
    passes and must lose its mark. (A 2% "loss threshold" as in BBR fixed this
    case but cost real limits at 1,000/s up to 6.7x the refusals of an unlimited
    start, 4-6% of goodput against token buckets, and small falls went unread:
    measured and reverted, docs/benchmarks.md.)"""
    clean = _goodput(lambda: Noisy(0.0))
    assert _goodput(lambda: Noisy(0.01)) >= 0.75 * clean
