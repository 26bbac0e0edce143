"""The Authenticator's single flight, for successes and failures, without a network.

``send`` is a stand-in for the transport that answers getToken with recorded
bodies after an optional delay; the clock is injected, so the cooldown of a
refused login is tested without sleeping through it.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import orjson
import pytest

import nebula_async as na
from nebula_async._auth import Authenticator
from nebula_async._protocol import HttpRequest

pytestmark = pytest.mark.anyio

GOOD = (200, {}, orjson.dumps({"code": 200, "msg": "ok", "data": "Bearer fresh"}))
REFUSED = (200, {}, orjson.dumps({"code": 500, "msg": "wrong user name or password"}))
GATEWAY = (502, {}, b"<html>Bad Gateway</html>")


class FakeLogin:
    """Answers getToken from a script; counts the calls."""

    def __init__(self, *answers: tuple[int, Mapping[str, str], bytes], delay: float = 0.0):
        self.answers = list(answers)
        self.delay = delay
        self.calls = 0

    async def __call__(self, request: HttpRequest) -> tuple[int, Mapping[str, str], bytes]:
        self.calls += 1
        if self.delay:
            await anyio.sleep(self.delay)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def authenticator(send: FakeLogin, clock: Clock | None = None) -> Authenticator:
    return Authenticator(
        base_url="http://127.0.0.1:9",
        token=None,
        username="u",
        password="p",
        send=send,
        cooldown_s=10.0,
        clock=clock or Clock(),
    )


async def gather_errors(auth: Authenticator, callers: int) -> list[BaseException]:
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await auth.authorization()
        except na.NebulaError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(callers):
            group.start_soon(one)
    return errors


async def test_callers_waiting_for_a_failed_login_share_its_failure() -> None:
    send = FakeLogin(GATEWAY, GOOD, delay=0.05)
    auth = authenticator(send)
    errors = await gather_errors(auth, 8)
    # One login for the eight, not eight in a row.
    assert send.calls == 1
    assert len(errors) == 8
    assert all(isinstance(e, na.ServerError) for e in errors)
    # A fresh copy each: one shared object would grow its traceback in every caller.
    assert len({id(e) for e in errors}) == 8
    # A transient failure is not remembered: the next caller tries again.
    assert await auth.authorization() == ("Bearer fresh", 1)
    assert send.calls == 2


async def test_a_refused_login_is_remembered_for_the_cooldown_only() -> None:
    clock = Clock()
    send = FakeLogin(REFUSED, REFUSED, GOOD)
    auth = authenticator(send, clock)
    with pytest.raises(na.AuthenticationError):
        await auth.authorization()
    clock.now = 9.0
    errors = await gather_errors(auth, 5)
    assert len(errors) == 5
    assert send.calls == 1  # answered from memory: no wrong password per job
    clock.now = 10.5
    with pytest.raises(na.AuthenticationError):
        await auth.authorization()
    assert send.calls == 2
    clock.now = 21.0
    assert await auth.authorization() == ("Bearer fresh", 1)
    assert auth.logins == 1


async def test_a_refused_token_makes_new_callers_wait_for_the_new_one() -> None:
    send = FakeLogin(GOOD, delay=0.05)
    auth = authenticator(send)
    _, generation = await auth.authorization()
    assert not auth.needs_login
    auth.mark_refused(generation)
    assert auth.needs_login
    assert await auth.authorization() == ("Bearer fresh", generation + 1)
    assert send.calls == 2
    # A stale refusal (for a generation already replaced) changes nothing.
    auth.mark_refused(generation)
    assert not auth.needs_login


async def test_refresh_tells_whether_this_call_logged_in() -> None:
    send = FakeLogin(GOOD, delay=0.02)
    auth = authenticator(send)
    outcomes: list[bool] = []

    async def refresh() -> None:
        outcomes.append(await auth.refresh(0))

    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(refresh)
    assert sorted(outcomes) == [False, False, False, False, True]
    assert send.calls == 1


async def test_a_cancelled_login_lets_the_waiters_try_for_themselves() -> None:
    send = FakeLogin(GOOD, delay=0.05)
    auth = authenticator(send)
    with anyio.move_on_after(0.01):
        await auth.authorization()
    assert auth.needs_login
    assert await auth.authorization() == ("Bearer fresh", 1)
