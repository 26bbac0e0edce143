"""The Redis limiter behind :class:`~nebula_async.SharedRateLimit`, on ``redis.asyncio``.

Imported only by ``SharedRateLimit.create_limiter()``: the core never needs Redis.

One acquire is one round trip: an atomic Lua script reads Redis' ``TIME``,
reserves the next GCRA slot (the virtual-scheduling algorithm of
:mod:`nebula_async._limits`, shaping rather than policing: it never refuses,
it returns how long to wait) and returns that wait, which the caller sleeps. No
polling, and no host clock: every time is Redis' own, in microseconds, so hosts
whose clocks disagree still share one schedule. The sleep is anchored: it ends
at the slot's local time (Redis time plus the least offset seen between the
clocks), so a reply that came late shortens its sleep instead of making the
send late (the anchoring of :mod:`nebula_async._limits`, across clocks).

Keys, all under ``nebula-async:{KEY}:`` (one hash slot, so a cluster keeps
them together), each given a ``PEXPIRE`` on every write so that an unused limit
vanishes:

- ``gcra`` (hash): ``tat``, the theoretical arrival time; ``interval``, the
  slot spacing it was computed with; ``last``, the latest slot handed out;
- ``pause`` (string, set with ``PX``): when a ``Retry-After`` pause ends. The
  acquire script puts the next slot after it (``tat >= resume + tau``: busy up
  to then, no burst right after a pause), so the wait it returns includes the
  pause, and a 429 seen by one process pauses all of them;
- ``rate`` (hash): the adapted rate, AIMD as in :class:`~nebula_async._limits.AdaptiveRate`:
  ``base`` (the rate right after the last cut), ``cut_at``, ``event_end``,
  ``decreases``, ``estimate`` (the rate a refusal was seen at). The rate at
  ``now`` is ``min(target, base + recovery * (now - cut_at))``. A refusal cuts it
  by ``decrease_factor`` once per congestion event: a refusal of a request whose
  slot is not later than ``event_end`` (the latest slot handed out when the last
  cut happened) is old news and ignored; the ticket carries its slot's Redis time
  for that. Every process reads the rate from here on its next acquire.

A rate change keeps the last slot handed out and spaces the next one at the new
interval (``tat += burst * (new - old)``, as ``GcraSchedule.set_rate``), so a
cut does not hand out a burst of credit.

Slots reserved before a pause began were placed before it: a sleeper that wakes
holding one re-reserves when this process has learnt of a pause ending after
its slot (from its own ``record``, or from the reply to any of its acquires).
A process that has not made a round trip since the pause began sends its slots
already reserved; they were reserved within the rate, so the aggregate rate is
never exceeded, but that many sends may land in the pause.

A sleeper that wakes over 50 ms after its slot (its process stalled: descheduled,
a long GC) lets the slot lapse and takes a fresh one, once: sent on waking, the
slots of every sleeper of that process would go out at once, past ``burst``.
A lapsed slot is one the stall had cost already; a reply that comes back after
its slot is sent at once (re-reserving could never catch up).

Redis restarted: the script cache is empty; redis-py's ``Script`` object
re-loads the script on ``NOSCRIPT``, and the state starts afresh (an empty
schedule: at most ``burst`` at once). Redis unreachable: an
:class:`~nebula_async.APIConnectionError` with ``request_sent=False`` naming the
URL without its password, after redis-py's short retry; never an unlimited send.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ._exceptions import APIConnectionError
from ._limiter import LimiterStatistics, Outcome
from ._shared import SharedRateLimit, redact_url

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

__all__ = ["ACQUIRE_SCRIPT", "RECORD_SCRIPT", "RedisLimiter", "Ticket"]

#: Redis-side helpers shared by both scripts (each script is sent whole).
_PRELUDE: Final = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local recovery = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local r = redis.call('HMGET', KEYS[3], 'base', 'cut_at', 'event_end', 'decreases', 'estimate')
local rate = target
local base, cut_at = tonumber(r[1]), tonumber(r[2])
if base and cut_at then
  rate = base + recovery * (now - cut_at) / 1e6
  if rate > target then rate = target end
end
local decreases = tonumber(r[4]) or 0
local estimate = r[5] or ''
local function pause_left()
  local resume = tonumber(redis.call('GET', KEYS[2]))
  if resume and resume > now then return resume - now end
  return 0
end
"""

#: KEYS: gcra, pause, rate. ARGV: target/s, burst, recovery/s/s, idle ttl ms.
#: Returns {wait us, slot (Redis us), rate, decreases, estimate, pause left us}.
ACQUIRE_SCRIPT: Final = (
    _PRELUDE
    + """
local interval = 1e6 / rate
local s = redis.call('HMGET', KEYS[1], 'tat', 'interval', 'last')
local tat, old, last = tonumber(s[1]), tonumber(s[2]), tonumber(s[3]) or 0
if tat == nil then
  tat = now
elseif old and old ~= interval then
  -- keep the last slot, space the next one at the new interval (GcraSchedule.set_rate)
  local shift = burst * (interval - old)
  local forget = now
  if shift > 0 then forget = now - shift end
  if tat < forget then tat = forget end
  tat = tat + shift
end
local tau = (burst - 1) * interval
local paused = pause_left()
if paused > 0 and tat < now + paused + tau then tat = now + paused + tau end
if tat < now then tat = now end
local slot = tat - tau
if slot < now then slot = now end
if slot < last then slot = last end
tat = tat + interval
redis.call('HSET', KEYS[1], 'tat', tat, 'interval', interval, 'last', slot)
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) / 1000) + ttl)
return {math.floor(slot - now), math.floor(slot), tostring(rate), decreases, estimate, paused}
"""
)

#: KEYS: gcra, pause, rate. ARGV: target/s, burst, recovery/s/s, idle ttl ms,
#: refused (0/1), slot of the refused request (Redis us, -1: unknown), floor/s,
#: decrease factor, pause ms (0: none), the channel for pause notices.
#: Returns {cut (0/1), rate, decreases, estimate, pause left us, now (Redis us)}.
RECORD_SCRIPT: Final = (
    _PRELUDE
    + """
local refused, sent_at = tonumber(ARGV[5]), tonumber(ARGV[6])
local floor, factor, pause_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local cut = 0
if refused == 1 then
  local event_end = tonumber(r[3]) or -1
  if sent_at < 0 then sent_at = now end
  if sent_at > event_end then
    local new = rate * factor
    if new < floor then new = floor end
    -- requests already scheduled at the old rate may still be refused: old news
    local last = tonumber(redis.call('HGET', KEYS[1], 'last')) or now
    if last < now then last = now end
    decreases = decreases + 1
    estimate = tostring(rate)
    redis.call('HSET', KEYS[3], 'base', new, 'cut_at', now, 'event_end', last,
               'decreases', decreases, 'estimate', estimate)
    redis.call('PEXPIRE', KEYS[3], math.ceil((target - new) / recovery * 1000) + ttl)
    rate = new
    cut = 1
  end
end
if pause_ms > 0 then
  local resume = now + pause_ms * 1000
  local current = tonumber(redis.call('GET', KEYS[2]))
  if current == nil or current < resume then
    redis.call('SET', KEYS[2], string.format('%d', resume), 'PX', pause_ms)
    redis.call('PUBLISH', ARGV[10], string.format('%d %d', resume, pause_ms))
  end
end
return {cut, tostring(rate), decreases, estimate, pause_left(), math.floor(now)}
"""
)

#: With no ``recovery_per_s``, the rate regains this fraction of the target per
#: second; with no ``min_per_second`` it never falls below this fraction of it
#: (the defaults of :class:`~nebula_async.RateLimit`).
_RECOVERY_FRACTION: Final = 1 / 10
_FLOOR_FRACTION: Final = 1 / 20
#: redis-py's own retry of a failed connection or command, before we raise: a
#: short one, so that a dead Redis shows as an error in about a second.
_RETRIES: Final = 2
_SLACK_US: Final = 1000
#: A sleeper that wakes this much after its slot lets it lapse (see acquire):
#: well above a loaded host's timer lateness (p99 10-40 ms measured), well
#: below the stalls that bunched sends (0.1-0.7 s).
_EXPIRED_S: Final = 0.05
#: How fast the Redis-to-local clock offset may drift up (100 ppm), and the jump
#: that, kept up that long, resets it (see RedisLimiter._next_offset).
_DRIFT: Final = 1e-4
_OFFSET_RESET_S: Final = 0.5
#: The pause-notice listener: how long one wait for a message lasts (a local
#: wait on the socket, no traffic), and the back-off after its connection failed.
_LISTEN_POLL_S: Final = 1.0
_LISTEN_RETRY_S: Final = 1.0


@attrs.frozen
class Ticket:
    """The slot handed out by one acquire: its time per Redis' clock, in microseconds,
    and the wait the limiter scheduled for it (pauses and re-reservations included)."""

    slot_us: int
    wait_us: int = 0


class RedisLimiter:
    """A :class:`~nebula_async._limiter.Limiter` whose state lives in Redis.

    Made by :meth:`SharedRateLimit.create_limiter`; connects on first use, in the
    running loop; ``aclose()`` closes its connection pool. ``statistics()`` makes
    no round trip: it reports what the last reply said.
    """

    def __init__(self, config: SharedRateLimit) -> None:
        self._config = config
        prefix = config.key_prefix
        self._keys = (f"{prefix}:gcra", f"{prefix}:pause", f"{prefix}:rate")
        self._channel = f"{prefix}:pause-notices"
        self._listener: asyncio.Task[None] | None = None
        recovery = config.recovery_per_s
        self._recovery = config.per_second * _RECOVERY_FRACTION if recovery is None else recovery
        floor = config.min_per_second
        floor = config.per_second * _FLOOR_FRACTION if floor is None else floor
        self._floor = min(config.per_second, floor)
        self._common = (
            repr(float(config.per_second)),
            str(config.burst),
            repr(float(self._recovery)),
            str(math.ceil(config.idle_ttl_s * 1000)),
        )
        self._client: Redis | None = None
        self._acquire_script: AsyncScript | None = None
        self._record_script: AsyncScript | None = None
        self._closed = False
        # What the last reply said, for statistics() and the pause check on waking.
        self._rate = float(config.per_second)
        self._decreases = 0
        self._estimate: float | None = None
        self._pause_ends = -math.inf  # time.monotonic() when the last known pause ends
        self._pause_ends_us = -math.inf  # the same, per Redis' clock
        self._acquired = 0
        self._expired = 0
        self._refused = 0
        self._round_trips = 0
        # Redis' clock -> time.monotonic() (see _delay); +inf: not seen yet.
        self._offset = math.inf
        self._offset_at = 0.0
        # Replies far above the offset since (local time), and the least of them.
        self._raised_since: float | None = None
        self._raised_least = math.inf

    def __repr__(self) -> str:
        return f"<RedisLimiter {redact_url(self._config.redis_url)} key={self._config.key!r}>"

    @property
    def config(self) -> SharedRateLimit:
        """The configuration this limiter was made from."""
        return self._config

    @property
    def expired(self) -> int:
        """Slots let lapse because their sleeper woke over 50 ms after them (a stall)."""
        return self._expired

    @property
    def round_trips(self) -> int:
        """Scripts run against Redis so far (one per acquire, one per notable record)."""
        return self._round_trips

    def _connect(self) -> tuple[AsyncScript, AsyncScript]:
        if self._closed:
            raise RuntimeError("this RedisLimiter is closed")
        if self._acquire_script is None or self._record_script is None:
            config = self._config
            retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), _RETRIES)
            # A blocking pool: under a burst of acquires, callers queue for one of
            # a few connections instead of opening one each (or failing).
            pool = BlockingConnectionPool.from_url(
                config.redis_url,
                max_connections=config.max_connections,
                timeout=config.connect_timeout_s + config.socket_timeout_s,
                socket_connect_timeout=config.connect_timeout_s,
                socket_timeout=config.socket_timeout_s,
                retry=retry,
                retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
            )
            self._client = client = Redis.from_pool(pool)
            self._acquire_script = client.register_script(ACQUIRE_SCRIPT)
            self._record_script = client.register_script(RECORD_SCRIPT)
            self._listener = asyncio.get_running_loop().create_task(self._listen(client))
        return self._acquire_script, self._record_script

    async def connect(self) -> None:
        """Connect and load the scripts now (optional: ``acquire`` does it lazily).

        Fails fast at start-up with the same :class:`~nebula_async.APIConnectionError`.
        """
        acquire_script, record_script = self._connect()
        assert self._client is not None
        try:
            await self._client.ping()
            for script in (acquire_script, record_script):
                script.sha = await self._client.script_load(script.script)
        except redis_errors.RedisError as exc:
            self._raise(exc)

    async def _listen(self, client: Redis) -> None:
        """Hear the pauses other processes set, at once (Redis pub/sub).

        Without it a process learns of a pause from its next round trip, and its
        sleepers whose slots come first would still send inside the pause. Its
        failures are never raised: the round trips still carry every pause.

        It checks for its own cancellation after every wait: redis-py's timed read
        can swallow a cancellation that lands as its timeout expires (asyncio's
        ``timeout()`` on Python 3.11), and the loop must end all the same.
        """
        task = asyncio.current_task()
        while not self._closed:
            try:
                pubsub: PubSub
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    while not (self._closed or (task is not None and task.cancelling())):
                        message = await pubsub.get_message(timeout=_LISTEN_POLL_S)
                        if message is not None and message.get("type") == "message":
                            self._hear(message["data"])
                    return
            except (redis_errors.RedisError, OSError, ValueError):
                await asyncio.sleep(_LISTEN_RETRY_S)

    def _hear(self, data: bytes | str) -> None:
        text = data.decode("ascii") if isinstance(data, bytes) else data
        resume_us, pause_ms = (int(part) for part in text.split())
        self._pause_ends_us = max(self._pause_ends_us, resume_us)
        self._pause_ends = max(self._pause_ends, time.monotonic() + pause_ms / 1e3)

    async def _run(self, script: AsyncScript, args: tuple[str, ...]) -> list[Any]:
        try:
            reply = await script(keys=self._keys, args=args)
        except redis_errors.RedisError as exc:
            self._raise(exc)
        self._round_trips += 1
        return list(reply)

    def _raise(self, exc: redis_errors.RedisError) -> NoReturn:
        url = redact_url(self._config.redis_url)
        detail = f"{type(exc).__name__}: {exc}"
        password = _password(self._config.redis_url)
        if password:
            detail = detail.replace(password, "***")
        if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
            message = f"shared rate limit: Redis at {url} unreachable: {detail}"
        else:
            message = f"shared rate limit: Redis at {url} failed: {detail}"
        raise APIConnectionError(message, request_sent=False) from None

    def _note(
        self, rate: bytes | str, decreases: int, estimate: bytes | str, pause_us: int, now_us: int
    ) -> None:
        self._rate = float(rate)
        self._decreases = int(decreases)
        self._estimate = float(estimate) if estimate else None
        if pause_us > 0:
            self._pause_ends = time.monotonic() + pause_us / 1e6
            # Sleepers of this process holding slots inside the pause re-reserve.
            self._pause_ends_us = max(self._pause_ends_us, now_us + pause_us)

    async def acquire(self) -> Ticket:
        """Wait for a shared send slot (after any pause in force); one round trip.

        Two when the slot lay inside a pause heard of meanwhile, or lapsed while
        this process stalled (see the module notes).
        """
        acquire_script, _ = self._connect()
        waited_us = 0
        expired = False
        while True:
            wait_us, slot_us, rate, decreases, estimate, pause_us = await self._run(
                acquire_script, self._common
            )
            received = time.monotonic()
            self._note(rate, decreases, estimate, pause_us, slot_us - wait_us)
            overslept = 0.0
            if wait_us > 0:
                waited_us += wait_us
                overslept = await self._sleep(self._delay(slot_us, wait_us, received))
            # Reserved before a pause that this process has heard of since: the
            # slot lies inside that pause, so take a new one (placed after it).
            # (A millisecond of slack absorbs the script's float rounding.)
            if slot_us + _SLACK_US < self._pause_ends_us:
                continue
            # Woke long after its slot (this process stalled): sent now, it would
            # go out with the slots after it, up to one per sleeper at once. Let
            # it lapse and take a fresh one, once (a process that stays starved
            # still sends; a reply that came after its slot is sent at once).
            if overslept > _EXPIRED_S and not expired:
                expired = True
                self._expired += 1
                continue
            break
        self._acquired += 1
        return Ticket(slot_us, waited_us)

    @staticmethod
    async def _sleep(delay: float) -> float:
        """Sleep ``delay`` seconds; return how much longer the sleep took."""
        # A cancelled sleeper's slot stays spent: giving it back would take a
        # round trip the cancelled task should not make (errs slow).
        wake = time.monotonic() + delay
        await asyncio.sleep(delay)
        return time.monotonic() - wake

    def _delay(self, slot_us: int, wait_us: int, received: float) -> float:
        """How long to sleep for ``slot_us``, anchored to Redis' clock.

        Sleeping the script's ``wait`` from the moment the reply arrived makes a
        late reply (a stalled process, a busy host) a late send, for good: the
        lateness is never paid back. Instead the sleep ends at the local time of
        the slot: ``slot + offset``, where ``offset`` is the least
        ``local receive time - Redis time`` seen (the clocks' offset plus the
        quickest reply; never too small, so never early). It may grow by 100 ppm
        of the time since it was last lowered (clock drift).
        """
        self._offset = self._next_offset(received - (slot_us - wait_us) / 1e6, received)
        self._offset_at = received
        return max(0.0, slot_us / 1e6 + self._offset - time.monotonic())

    def _next_offset(self, observed: float, received: float) -> float:
        """The offset after a reply ``observed`` above Redis' clock, received at ``received``.

        Replies over 0.5 s above the offset are a stall of this process (replies
        read late) or Redis' clock stepped back (a failover): only the second
        lasts, so the offset moves up to the least of them once they have kept
        coming for 0.5 s. (Moving up at the first one made a stall of 0.5 s
        late the sends of every reply read after it by as much again.)
        """
        offset = self._offset + _DRIFT * (received - self._offset_at)
        if observed - offset <= _OFFSET_RESET_S:
            self._raised_since = None
            return min(offset, observed)
        if self._raised_since is None:
            self._raised_since, self._raised_least = received, observed
        self._raised_least = min(self._raised_least, observed)
        if received - self._raised_since < _OFFSET_RESET_S:
            return offset
        self._raised_since = None
        return self._raised_least

    async def record(
        self, ticket: object, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """Report a slot's fate: a refusal may cut the shared rate; ``retry_after`` pauses all.

        Makes a round trip only when there is something to share (a refusal of an
        adaptive limit, or a ``Retry-After``).
        """
        refused = outcome is Outcome.REFUSED
        if refused:
            self._refused += 1
        pause_ms = _pause_ms(retry_after)
        if not (refused and self._config.adaptive) and pause_ms == 0:
            return
        _, record_script = self._connect()
        slot_us = ticket.slot_us if isinstance(ticket, Ticket) else -1
        args = (
            *self._common,
            "1" if refused and self._config.adaptive else "0",
            str(slot_us),
            repr(float(self._floor)),
            repr(float(self._config.decrease_factor)),
            str(pause_ms),
            self._channel,
        )
        _cut, rate, decreases, estimate, pause_us, now_us = await self._run(record_script, args)
        self._note(rate, decreases, estimate, pause_us, now_us)

    def statistics(self) -> LimiterStatistics:
        """What the last round trip said (no I/O): rate, estimate, pause left, counters."""
        return LimiterStatistics(
            current_rate=self._rate,
            estimated_limit=self._estimate,
            paused_for_s=max(0.0, self._pause_ends - time.monotonic()),
            acquired=self._acquired,
            refused=self._refused,
            decreases=self._decreases,
        )

    async def aclose(self) -> None:
        """Close the connection pool; the limiter is not used afterwards."""
        self._closed = True
        client, self._client = self._client, None
        listener, self._listener = self._listener, None
        self._acquire_script = self._record_script = None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        if client is not None:
            await client.aclose()


def _pause_ms(retry_after: float | None) -> int:
    if retry_after is None or not retry_after > 0 or not math.isfinite(retry_after):
        return 0
    return math.ceil(retry_after * 1000)


def _password(url: str) -> str:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    found = parts.password or ""
    if not found:
        found = next(iter(parse_qs(parts.query).get("password", [])), "")
    return found
