"""Credentials: a static token, or a login through getToken that is renewed,
once for all waiting callers, when the service refuses the token.

Single flight: every caller remembers the *generation* of the token it used. When
refused, it asks for a refresh of that generation; the first one logs in under a
lock, the others find the generation already replaced and simply repeat with the
new token. 50 callers hitting an expired token cause one login, not 50.

Failures are single flight too: callers that waited for a login that failed get
its error (a fresh copy each, so no shared traceback grows) instead of logging in
one after another. A refused login (wrong password) is also remembered for a
cooldown, so a batch does not try the wrong password once per job; a transient
failure (a 502, a timeout) is not, and the next caller simply tries again.

A refused token is marked as such at once (:meth:`Authenticator.mark_refused`):
callers starting a request meanwhile wait for the new token instead of sending
one that is known to be refused.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from ._exceptions import AuthenticationError, NebulaError
from ._protocol import (
    HttpRequest,
    RawResponse,
    authorization_value,
    build_login_request,
    decipher_login,
)

__all__ = [
    "Authenticator",
    "LOGIN_COOLDOWN_S",
]

#: How long a refused login is answered from memory before one caller tries again.
LOGIN_COOLDOWN_S: Final = 10.0


def _fresh(error: NebulaError) -> NebulaError:
    """A copy of ``error`` without traceback or context, to raise in one more caller."""
    clone = copy.copy(error)
    clone.__traceback__ = None
    clone.__context__ = clone.__cause__ = None
    return clone


class Authenticator:
    """Hands out the current ``Authorization`` value and renews it on demand."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str | None,
        username: str | None,
        password: str | None,
        send: Callable[[HttpRequest], Awaitable[RawResponse]],
        cooldown_s: float = LOGIN_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = base_url
        self._username = username
        self._password = password
        self._send = send
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._authorization = authorization_value(token) if token else None
        self._generation = 0
        self._lock = anyio.Lock()
        # Login attempts finished so far, and the last one's failure:
        # (attempt number, generation it was for, when, the error).
        self._logins_done = 0
        self._failure: tuple[int, int, float, NebulaError] | None = None
        # The generation the service refused and that is not replaced yet (-1: none).
        self._refused = -1
        self.logins = 0

    def __repr__(self) -> str:
        return f"<Authenticator can_login={self.can_login} generation={self._generation}>"

    @property
    def can_login(self) -> bool:
        """Whether a refused token can be replaced by logging in again."""
        return self._username is not None and self._password is not None

    @property
    def needs_login(self) -> bool:
        """Whether the next request must wait for a login (none yet, or token refused)."""
        return self._authorization is None or self._refused == self._generation

    def is_current(self, generation: int) -> bool:
        """Whether ``generation`` is still the token in use (not replaced since)."""
        return generation == self._generation

    def mark_refused(self, generation: int) -> None:
        """Record that the service refused ``generation``'s token.

        Until it is replaced, :attr:`needs_login` is True and :meth:`authorization`
        waits for (or makes) the new login instead of handing the refused token to
        new requests.
        """
        if generation == self._generation and self.can_login:
            self._refused = generation

    def current(self) -> tuple[str, int]:
        """The ``Authorization`` value and its generation, without waiting.

        Only when :attr:`needs_login` is False.
        """
        assert self._authorization is not None
        return self._authorization, self._generation

    async def authorization(self) -> tuple[str, int]:
        """The ``Authorization`` value to send and its generation; logs in if needed."""
        if self.needs_login:
            await self.refresh(self._generation)
        return self.current()

    async def refresh(self, stale_generation: int) -> bool:
        """Replace the token of ``stale_generation``.

        Returns True when this call logged in, False when another caller had already
        replaced that token (then simply repeat with the current one). Raises the
        login's error, shared with every caller that waited for the same attempt.
        """
        if not self.can_login:
            raise AuthenticationError(
                "the token was refused and no username/password is set to log in again",
                status_code=401,
                code=401,
            )
        finished_before = self._logins_done
        async with self._lock:
            if self._generation != stale_generation and self._authorization is not None:
                return False
            failure = self._failure
            if failure is not None and failure[1] == stale_generation:
                attempt, _, failed_at, error = failure
                waited_for_it = attempt > finished_before
                refused = isinstance(error, AuthenticationError)
                if waited_for_it or (refused and self._clock() - failed_at < self._cooldown_s):
                    raise _fresh(error)
            request = build_login_request(
                self._base_url, self._username or "", self._password or ""
            )
            try:
                status, headers, body = await self._send(request)
                authorization = decipher_login(status, headers, body)
            except NebulaError as exc:
                self._logins_done += 1
                self._failure = (self._logins_done, stale_generation, self._clock(), _fresh(exc))
                raise
            except BaseException:
                self._logins_done += 1  # cancelled: waiters try for themselves
                raise
            self._logins_done += 1
            self._failure = None
            self._authorization = authorization
            self._generation = stale_generation + 1
            self._refused = -1
            self.logins += 1
            return True
