"""``SharedRateLimit``: one account-wide rate limit for many processes, through Redis.

This module is plain configuration and imports nothing of Redis: the limiter it
makes (:mod:`nebula_async._redis`, on ``redis.asyncio``) is imported only when
:meth:`SharedRateLimit.create_limiter` is called, so ``import nebula_async``
never needs the ``redis`` extra. Being frozen attrs data, a ``SharedRateLimit``
pickles to a worker process or a Ray actor and connects there, lazily, in the
running event loop.
"""

from __future__ import annotations

import math
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._exceptions import ValidationError
from ._models import _checked_call

if TYPE_CHECKING:
    from ._limiter import Limiter

__all__ = ["SharedRateLimit", "redact_url"]

_SCHEMES: Final = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for reprs and error messages).

    >>> redact_url("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    >>> redact_url("redis://user:s3cret@cache/0?password=s3cret")
    'redis://user:***@cache/0?password=***'
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}{sep}***@{hostport}" if sep else f"{user}@{hostport}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{name}={'***' if name.lower() == 'password' else value}" for name, value in pairs
        )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _url_repr(url: str) -> str:
    return repr(redact_url(url))


def _fail(field: str, message: str) -> ValidationError:
    return ValidationError(f"SharedRateLimit.{field}: {message}", field=field)


def _check_url(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise _fail(attribute.name, f"must be a redis:// URL, got {type(value).__name__}")
    scheme = value.partition("://")[0].lower()
    if "://" not in value or scheme not in _SCHEMES:
        raise _fail(
            attribute.name,
            f"must start with redis://, rediss:// or unix://, got {redact_url(value)!r}",
        )


def _check_key(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _fail(attribute.name, f"must be a non-empty string, got {value!r}")
    if len(value) > 200 or any(c in value for c in "{}\r\n"):
        raise _fail(attribute.name, "must be at most 200 characters, without braces or newlines")


def _positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(attribute.name, f"must be a positive number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise _fail(attribute.name, f"must be a positive finite number, got {value!r}")


def _optional_positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _positive(_, attribute, value)


def _burst(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise _fail(attribute.name, f"must be an integer from 1 to 1000000, got {value!r}")


def _bool(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute.name, f"must be True or False, got {value!r}")


def _max_connections(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise _fail(attribute.name, f"must be an integer from 1 to 1024, got {value!r}")


@_checked_call
@attrs.frozen
class SharedRateLimit:
    """One rate limit shared by every client given the same Redis and ``key``.

    Pass it as ``NebulaClient(rate_limit=...)`` in any number of processes on any
    number of machines: they share one GCRA schedule (``per_second`` with up to
    ``burst`` at once, in aggregate), one ``Retry-After`` pause (a 429 seen by one
    client pauses all of them) and, with ``adaptive=True``, one adapted rate (a
    refusal seen by one slows all of them: AIMD, a cut by ``decrease_factor`` once
    per congestion event, then a linear recovery at ``recovery_per_s`` requests/s
    per second, default ``per_second / 10``, back to ``per_second``, never below
    ``min_per_second``, default ``per_second / 20``; the in-process
    :class:`~nebula_async.RateLimit` steers by a rate controller instead). Each
    acquire is one round trip to Redis (an atomic Lua script, timed by Redis' clock, so the
    hosts' clocks never matter). Every client of one ``key`` should use the same
    settings.

    Redis unreachable: ``acquire()`` raises :class:`~nebula_async.APIConnectionError`
    (``request_sent=False``: nothing went to the API), never an unlimited send; the
    client treats it as that attempt's failure. ``connect_timeout_s`` bounds each
    connection attempt, ``socket_timeout_s`` each command. Keys (under
    ``nebula-async:{key}:``) expire ``idle_ttl_s`` after their last use.

    Needs the ``redis`` extra (``pip install 'nebula-async[redis]'``) where the
    limiter is created, not where this configuration is made or unpickled.

    >>> import pickle
    >>> limit = SharedRateLimit("redis://:s3cret@cache:6379/0", key="acct-42", per_second=50)
    >>> limit
    SharedRateLimit(redis_url='redis://:***@cache:6379/0', key='acct-42', per_second=50, burst=1, adaptive=True, decrease_factor=0.5, recovery_per_s=None, min_per_second=None, idle_ttl_s=60.0, connect_timeout_s=5.0, socket_timeout_s=5.0, max_connections=16)
    >>> pickle.loads(pickle.dumps(limit)) == limit
    True
    """  # noqa: E501

    redis_url: str = attrs.field(validator=_check_url, repr=_url_repr)
    key: str = attrs.field(kw_only=True, validator=_check_key)
    per_second: float = attrs.field(kw_only=True, validator=_positive)
    burst: int = attrs.field(default=1, kw_only=True, validator=_burst)
    adaptive: bool = attrs.field(default=True, kw_only=True, validator=_bool)
    decrease_factor: float = attrs.field(default=0.5, kw_only=True, validator=_positive)
    recovery_per_s: float | None = attrs.field(
        default=None, kw_only=True, validator=_optional_positive
    )
    min_per_second: float | None = attrs.field(
        default=None, kw_only=True, validator=_optional_positive
    )
    idle_ttl_s: float = attrs.field(default=60.0, kw_only=True, validator=_positive)
    connect_timeout_s: float = attrs.field(default=5.0, kw_only=True, validator=_positive)
    socket_timeout_s: float = attrs.field(default=5.0, kw_only=True, validator=_positive)
    max_connections: int = attrs.field(default=16, kw_only=True, validator=_max_connections)

    def __attrs_post_init__(self) -> None:
        if not self.decrease_factor < 1:
            raise _fail("decrease_factor", f"must be below 1, got {self.decrease_factor!r}")

    @property
    def key_prefix(self) -> str:
        """The prefix of every Redis key of this limit (one hash slot in a cluster)."""
        return f"nebula-async:{{{self.key}}}"

    def create_limiter(self) -> Limiter:
        """A new Redis-backed limiter; it connects on first use, in the running loop.

        Raises ``ImportError`` naming the extra when ``redis`` is not installed.
        """
        try:
            from ._redis import RedisLimiter
        except ImportError as exc:  # pragma: no cover - the test env has redis
            raise ImportError(
                "SharedRateLimit needs the redis package: pip install 'nebula-async[redis]'"
            ) from exc
        return RedisLimiter(self)
