"""Credentials: a static token, or a login through getToken that is renewed,
once for all waiting callers, when the service refuses the token.

Single flight: every caller remembers the *generation* of the token it used. When
refused, it asks for a refresh of that generation; the first one logs in under a
lock, the others find the generation already replaced and simply repeat with the
new token. 50 callers hitting an expired token cause one login, not 50. A refused
login is remembered for its generation, so waiters fail at once instead of
each trying the wrong password again.

A refused token is marked as such at once (:meth:`Authenticator.mark_refused`):
callers starting a request meanwhile wait for the new token instead of sending
one that is known to be refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ._exceptions import AuthenticationError
from ._protocol import HttpRequest, authorization_value, build_login_request, decipher_login
from ._transport import RawResponse

__all__ = ["Authenticator"]


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
    ) -> None:
        self._base_url = base_url
        self._username = username
        self._password = password
        self._send = send
        self._authorization = authorization_value(token) if token else None
        self._generation = 0
        self._lock = anyio.Lock()
        self._failed: tuple[int, AuthenticationError] | None = None
        # The generation the service refused and that is not replaced yet (-1: none).
        self._refused = -1
        self.logins = 0

    def __repr__(self) -> str:
        return f"<Authenticator can_login={self.can_login} generation={self._generation}>"

    @property
    def can_login(self) -> bool:
        """Whether a refused token can be replaced by logging in again."""
        return self._username is not None and self._password is not None

    def is_current(self, generation: int) -> bool:
        """Whether ``generation`` is still the token in use (not replaced since)."""
        return generation == self._generation

    def mark_refused(self, generation: int) -> None:
        """Record that the service refused ``generation``'s token.

        Until it is replaced, :meth:`authorization` waits for (or makes) the new
        login instead of handing the refused token to new requests.
        """
        if generation == self._generation and self.can_login:
            self._refused = generation

    async def authorization(self) -> tuple[str, int]:
        """The ``Authorization`` value to send and its generation; logs in lazily."""
        if self._authorization is None or self._refused == self._generation:
            await self.refresh(self._generation)
        assert self._authorization is not None
        return self._authorization, self._generation

    async def refresh(self, stale_generation: int) -> bool:
        """Replace the token of ``stale_generation``.

        Returns True when this call logged in, False when another caller had already
        replaced that token (then simply repeat with the current one).
        """
        if not self.can_login:
            raise AuthenticationError(
                "the token was refused and no username/password is set to log in again",
                status_code=401,
                code=401,
            )
        async with self._lock:
            if self._generation != stale_generation and self._authorization is not None:
                return False
            if self._failed is not None and self._failed[0] == stale_generation:
                raise self._failed[1]
            username, password = self._username or "", self._password or ""
            request = build_login_request(self._base_url, username, password)
            status, headers, body = await self._send(request)
            try:
                authorization = decipher_login(status, headers, body)
            except AuthenticationError as exc:
                self._failed = (stale_generation, exc)
                raise
            self._authorization = authorization
            self._generation = stale_generation + 1
            self._refused = -1
            self.logins += 1
            return True
