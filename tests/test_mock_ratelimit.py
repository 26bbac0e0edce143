"""The mock server's own rate limits, sans-I/O with an injected clock, and
``busiest_window``, the reading of a limit back from the server's records."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nebula_async.testing import busiest_window
from nebula_async.testing._ratelimit import (
    FixedWindow,
    Gcra,
    SlidingWindow,
    make_limit,
    window_capacity,
)


def admitted(
    limit: SlidingWindow | FixedWindow | Gcra, times: list[float], rate: float
) -> list[float]:
    return [t for t in times if limit.admit(t, rate)]


def test_window_capacity() -> None:
    assert window_capacity(20, 1.0) == 20
    assert window_capacity(10, 0.25) == 2  # 2.5 rounds down
    assert window_capacity(0.3, 1.0) == 1  # never a window that holds nothing
    assert window_capacity(0.1 * 3, 10.0) == 3  # 2.9999999999999996: float noise is not a loss


# --------------------------------------------------------------------------- gcra


def test_gcra_burst_then_one_per_interval() -> None:
    gcra = Gcra(burst=3)
    # rate 10/s: interval 0.1 s; three at once, then the fourth waits one interval.
    assert [gcra.admit(0.0, 10) for _ in range(4)] == [True, True, True, False]
    assert not gcra.admit(0.09, 10)
    assert gcra.admit(0.1, 10)
    assert not gcra.admit(0.1, 10)


def test_gcra_refusals_do_not_push_the_schedule() -> None:
    gcra = Gcra()
    assert gcra.admit(0.0, 1)
    assert not any(gcra.admit(0.5 + i * 0.01, 1) for i in range(40))
    assert gcra.admit(1.0, 1)


def test_gcra_rate_change_applies_at_once() -> None:
    gcra = Gcra()
    assert gcra.admit(0.0, 1)  # next slot at 1.0 under 1/s
    assert not gcra.admit(0.5, 10)
    assert gcra.admit(1.0, 10)
    assert gcra.admit(1.1, 10)  # now 0.1 s apart


# --------------------------------------------------------------------------- sliding window


def test_sliding_window_counts_the_last_window() -> None:
    window = SlidingWindow(window_s=1.0)
    assert admitted(window, [0.0, 0.2, 0.4], 3) == [0.0, 0.2, 0.4]
    assert not window.admit(0.999, 3)
    assert window.admit(1.0, 3)  # 0.0 left the window (t - 1, t]
    assert not window.admit(1.1, 3)
    assert window.admit(1.2, 3)


def test_sliding_window_refusals_do_not_count() -> None:
    window = SlidingWindow(window_s=1.0)
    assert window.admit(0.0, 1)
    assert not any(window.admit(0.1 * i, 1) for i in range(1, 10))
    assert window.admit(1.0, 1)


def test_sliding_window_limit_change_mid_run() -> None:
    window = SlidingWindow(window_s=1.0)
    assert len(admitted(window, [0.0, 0.1, 0.2, 0.3], 20)) == 4
    # Down to 2 per window: the 4 still in the window keep it shut until two leave.
    assert not window.admit(0.5, 2)
    assert not window.admit(1.05, 2)  # 0.0 left: 3 remain
    assert not window.admit(1.15, 2)  # 0.1 left too: 2 remain, still full
    assert window.admit(1.25, 2)  # 0.2 left: 0.3 alone, one slot
    assert not window.admit(1.26, 2)
    # Up to 30: room at once.
    assert window.admit(1.27, 30)


def test_sliding_window_of_issue_10() -> None:
    # "Refuses anything over 20 requests in any 1 s window": 60/s offered for 3 s.
    window = SlidingWindow(window_s=1.0)
    times = [i / 60 for i in range(180)]
    passed = admitted(window, times, 20)
    assert busiest_window(passed, 1.0) == 20
    assert len(passed) == 60  # 20 in each second, at the front of it


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), max_size=80),
    st.integers(1, 8),
    st.sampled_from([0.1, 0.5, 1.0, 2.5]),
)
def test_sliding_window_never_exceeds_and_never_refuses_needlessly(
    times: list[float], capacity: int, window_s: float
) -> None:
    times.sort()
    window = SlidingWindow(window_s=window_s)
    rate = capacity / window_s
    assert window_capacity(rate, window_s) == capacity
    passed: list[float] = []
    for t in times:
        if window.admit(t, rate):
            passed.append(t)
        else:
            # Refused only when the window ending now is full.
            assert sum(1 for a in passed if a <= t < a + window_s) >= capacity
    assert busiest_window(passed, window_s) <= capacity


# --------------------------------------------------------------------------- fixed window


def test_fixed_window_resets_at_each_boundary() -> None:
    window = FixedWindow(window_s=1.0, origin=10.0)
    assert admitted(window, [10.0, 10.5], 2) == [10.0, 10.5]
    assert not window.admit(10.99, 2)
    # 2 at the end of one window and 2 at the start of the next: 4 within 0.1 s.
    assert admitted(window, [11.0, 11.05, 11.1], 2) == [11.0, 11.05]
    assert window.admit(12.0, 2)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), max_size=80),
    st.integers(1, 8),
    st.floats(0, 5, allow_nan=False),
)
def test_fixed_window_counts_per_window(times: list[float], capacity: int, origin: float) -> None:
    times.sort()
    window = FixedWindow(window_s=1.0, origin=origin)
    passed = admitted(window, times, capacity)
    per_window: dict[int, int] = {}
    for t in passed:
        key = math.floor(t - origin)
        per_window[key] = per_window.get(key, 0) + 1
    assert all(count <= capacity for count in per_window.values())
    # Every window that was offered at least `capacity` requests admitted exactly that many.
    for key in {math.floor(t - origin) for t in times}:
        offered = sum(1 for t in times if math.floor(t - origin) == key)
        assert per_window.get(key, 0) == min(offered, capacity)


def test_make_limit_builds_each_algorithm() -> None:
    assert isinstance(make_limit("gcra", burst=2, window_s=1.0, origin=0.0), Gcra)
    assert isinstance(
        make_limit("sliding_window", burst=1, window_s=1.0, origin=0.0), SlidingWindow
    )
    assert isinstance(make_limit("fixed_window", burst=1, window_s=1.0, origin=0.0), FixedWindow)


# --------------------------------------------------------------------------- busiest_window


def brute_force(times: list[float], window_s: float) -> int:
    return max((sum(1 for u in times if t <= u < t + window_s) for t in times), default=0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 5, allow_nan=False), max_size=40), st.sampled_from([0.1, 0.5, 1.0]))
def test_busiest_window_matches_brute_force(times: list[float], window_s: float) -> None:
    assert busiest_window(times, window_s) == brute_force(times, window_s)


def test_busiest_window_edges() -> None:
    assert busiest_window([], 1.0) == 0
    assert busiest_window([0.0, 1.0], 1.0) == 1  # half-open: 1.0 is in the next window
    assert busiest_window(iter([3.0, 1.0, 2.9]), 1.0) == 2  # any order, any iterable
    with pytest.raises(ValueError, match="window_s"):
        busiest_window([0.0], 0)
