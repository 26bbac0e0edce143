"""Retry decisions and delays: pure functions with an injected random source."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nebula_async as na
from nebula_async._retry import backoff_delay, decide_retry, is_retryable

POLICY = na.RetryPolicy()
STRICT = na.RetryPolicy(retry_ambiguous=False)


def http(
    status: int, *, code: int | None = None, retry_after: float | None = None
) -> na.APIStatusError:
    from nebula_async._protocol import status_error_class

    effective = status if not 200 <= status < 300 or code is None else code
    return status_error_class(effective)(
        "x", status_code=status, code=code, retry_after=retry_after
    )


# (error, retried by default, retried with retry_ambiguous=False)
TABLE = [
    (na.APIConnectionError("refused", request_sent=False), True, True),
    (na.APIConnectionError("reset"), True, False),
    (na.APITimeoutError("slow"), True, False),
    (na.APITimeoutError("connect", request_sent=False), True, True),
    (na.ResponseDecodeError("bad json"), True, False),
    (http(408), True, False),
    (http(429), True, True),
    (http(500), True, False),
    (http(502), True, False),
    (http(503), True, True),
    (http(504), True, False),
    (http(200, code=429), True, True),
    (http(200, code=500), True, False),
    (http(200, code=503), True, True),
    (http(200, code=400), False, False),
    (http(200, code=401), False, False),
    (http(200, code=403), False, False),
    (http(400), False, False),
    (http(401), False, False),
    (http(403), False, False),
    (http(404), False, False),
    (http(422), False, False),
    (http(501), False, False),
    (na.ValidationError("bad", field="n"), False, False),
]


@pytest.mark.parametrize(("error", "default", "strict"), TABLE, ids=lambda v: repr(v)[:40])
def test_what_is_retried(error: na.NebulaError, default: bool, strict: bool) -> None:
    assert is_retryable(error, POLICY) is default
    assert is_retryable(error, STRICT) is strict
    decision = decide_retry(error, attempts_made=1, policy=POLICY, random=lambda: 0.5)
    assert decision.retry is default


def test_attempts_run_out() -> None:
    policy = na.RetryPolicy(max_attempts=3)
    error = http(502)
    assert decide_retry(error, attempts_made=2, policy=policy, random=lambda: 0.5).retry
    final = decide_retry(error, attempts_made=3, policy=policy, random=lambda: 0.5)
    assert not final.retry
    assert "3 attempts" in final.reason


def test_max_attempts_one_never_retries() -> None:
    policy = na.RetryPolicy(max_attempts=1)
    assert not decide_retry(http(503), attempts_made=1, policy=policy, random=lambda: 0.5).retry


def test_retry_after_is_honoured_instead_of_backoff() -> None:
    decision = decide_retry(
        http(429, retry_after=7.0), attempts_made=1, policy=POLICY, random=lambda: 0.0
    )
    assert decision.retry
    assert decision.delay == 7.0


def test_retry_after_beyond_the_cap_raises_at_once() -> None:
    policy = na.RetryPolicy(retry_after_max=10.0)
    decision = decide_retry(
        http(429, retry_after=11.0), attempts_made=1, policy=policy, random=lambda: 0.5
    )
    assert not decision.retry
    assert "retry_after_max" in decision.reason


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = na.RetryPolicy(backoff_base=0.5, backoff_max=4.0)
    ceilings = [backoff_delay(k, policy, lambda: 1.0) for k in range(1, 8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


@given(
    retry_number=st.integers(1, 60),
    base=st.floats(0, 10),
    cap=st.floats(0, 100),
    draw=st.floats(0, 1, exclude_max=True),
)
def test_full_jitter_stays_within_zero_and_ceiling(
    retry_number: int, base: float, cap: float, draw: float
) -> None:
    policy = na.RetryPolicy(backoff_base=base, backoff_max=cap)
    delay = backoff_delay(retry_number, policy, lambda: draw)
    assert 0 <= delay <= min(cap, base * 2 ** (retry_number - 1)) + 1e-9


def test_jitter_spreads_delays() -> None:
    import random

    rng = random.Random(7)
    delays = {round(backoff_delay(3, POLICY, rng.random), 3) for _ in range(50)}
    assert len(delays) > 40
    assert max(delays) <= 2.0
