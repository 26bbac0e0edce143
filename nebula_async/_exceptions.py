"""Every error nebula-async raises, in one place.

The hierarchy::

    NebulaError
    ├── ValidationError          (also ValueError) bad input; nothing was sent
    ├── APIConnectionError       nothing usable came back
    │   └── APITimeoutError      an attempt ran past its timeout
    ├── ResponseDecodeError      the answer is not the documented JSON
    ├── NotAttemptedError        never sent: the batch was drained, or its circuit opened
    ├── ClientStateError         (also RuntimeError) the client is not open
    └── APIStatusError           the service refused (HTTP status or body ``code``)
        ├── AuthenticationError  401 / 403
        ├── RateLimitError       429
        ├── BadRequestError      any other 4xx
        └── ServerError          5xx

A non-2xx HTTP status decides the class (the body ``code``, when there is one,
is kept); under HTTP 2xx the body ``code`` decides, because the RuoYi-style
backend reports most business failures as HTTP 200 with ``{"code": 401, ...}``.

No exception ever carries a token or a password.
"""

from __future__ import annotations

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientStateError",
    "NebulaError",
    "NotAttemptedError",
    "RateLimitError",
    "ResponseDecodeError",
    "ServerError",
    "ValidationError",
]


class NebulaError(Exception):
    """Base class of every error raised by nebula-async.

    Every one pickles with its attributes (for multiprocessing and task queues).
    """

    def __reduce__(self) -> tuple[object, ...]:
        # The default rebuilds with cls(*args), which our keyword-only fields break.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[NebulaError], args: tuple[object, ...], state: dict[str, object]) -> object:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ValidationError(NebulaError, ValueError):
    """Bad input, caught before anything was sent.

    ``field`` names the offending field (or JSONL line, for the CLI) when one is known.

    >>> import nebula_async as na
    >>> try:
    ...     na.Img2ImgRequest(model="m", prompt="p", n=99)
    ... except na.ValidationError as e:
    ...     print(e.field)
    n
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class APIConnectionError(NebulaError):
    """Nothing usable came back: the connection failed, broke or timed out.

    ``request_sent`` is False only when the request surely never reached the
    server (a refused or failed connect); such failures are always safe to retry,
    even with ``RetryPolicy(retry_ambiguous=False)``.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class APITimeoutError(APIConnectionError):
    """One HTTP attempt ran past its timeout."""


class ResponseDecodeError(NebulaError):
    """The answer is not the documented JSON envelope (``path`` says where it broke)."""

    def __init__(self, message: str, *, status_code: int | None = None, path: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.path = path


class APIStatusError(NebulaError):
    """The service refused the request.

    ``status_code`` is the HTTP status, ``code`` the body's ``code`` (None when the
    body had none), ``msg`` the body's message (or a snippet of a non-JSON body),
    ``retry_after`` the server's requested wait in seconds, if it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: int | None = None,
        msg: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.msg = msg
        self.retry_after = retry_after

    @property
    def effective_code(self) -> int:
        """The code that decided the class: HTTP status when non-2xx, else the body code."""
        if not 200 <= self.status_code < 300 or self.code is None:
            return self.status_code
        return self.code


class AuthenticationError(APIStatusError):
    """The token or credentials were refused (401), or access is forbidden (403)."""


class RateLimitError(APIStatusError):
    """Too many requests (429)."""


class BadRequestError(APIStatusError):
    """The service refused the request's content (a 4xx other than 401/403/429)."""


class ServerError(APIStatusError):
    """The service or its gateway failed (5xx)."""


class NotAttemptedError(NebulaError):
    """A submission that was never sent, so nothing was billed for it.

    ``reason`` is ``"drained"`` (the batch was told to stop taking work) or
    ``"circuit_open"`` (the batch stopped after repeated systemic failures, such
    as refused credentials; ``cause`` is then that failure). A job holding only
    these errors may simply be run again.
    """

    def __init__(self, message: str, *, reason: str, cause: NebulaError | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.cause = cause


class ClientStateError(NebulaError, RuntimeError):
    """The client was used while not open: before ``async with``, or after closing."""
