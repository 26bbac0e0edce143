"""The thin aiohttp shell: move bytes, map transport failures to our errors.

One ``ClientSession`` per client, created inside the running loop (a session
made outside it, or reused across loops, is what gives "Event loop is closed").
Network timeouts are aiohttp's ``sock_connect`` / ``sock_read``; the per-attempt
limit is our own scope around the send, because aiohttp's ``total`` also counts
time spent waiting for a pooled connection (REFERENCES, aiohttp). The connector
limit matches our concurrency cap, so our limiter, not aiohttp's pool, queues.

Answers are read under ``max_response_bytes``: a Content-Length over it is refused
before reading, and a body without one (chunked, or compressed) is read chunk by
chunk and dropped the moment it passes the cap. aiohttp (3.13.3+) inflates a
gzip/deflate body in pieces of at most its read buffer (64 KiB) as we consume them,
so a gzip bomb never exists inflated beyond the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import aiohttp
import anyio
from aiohttp import BasicAuth
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from ._exceptions import (
    APIConnectionError,
    APITimeoutError,
    ResponseDecodeError,
    ValidationError,
)
from ._models import Timeout
from ._protocol import DEFAULT_MAX_RESPONSE_BYTES, HttpRequest, RawResponse, truncate_text

__all__ = ["AiohttpTransport", "RawResponse", "USER_AGENT", "check_max_response_bytes"]

USER_AGENT: Final = "nebula-async/0.1.0"


def check_max_response_bytes(value: object) -> int:
    """``value`` if it is a usable answer cap (an int >= 1), else a ``ValidationError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(
            f"max_response_bytes: must be a whole number of bytes >= 1, got "
            f"{truncate_text(repr(value), 100)}",
            field="max_response_bytes",
        )
    return value


def _too_large(status: int, limit: int, what: str) -> ResponseDecodeError:
    return ResponseDecodeError(
        f"answer too large: {what}, over max_response_bytes ({limit:,} bytes); not read further",
        status_code=status,
        path="$",
    )


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | bytearray:
    """The body, decompressed, or a ``ResponseDecodeError`` once it passes ``limit``."""
    length = response.content_length
    if length is not None and length > limit:
        raise _too_large(response.status, limit, f"Content-Length is {length:,} bytes")
    header = response.headers.get("Content-Encoding")
    encoding = "identity" if header is None else header.strip().lower() or "identity"
    if length is not None and encoding == "identity":
        # aiohttp reads exactly Content-Length bytes: the common answer, in one call.
        return await response.read()
    # One growing buffer, not a list of chunks joined at the end: the join would
    # hold the answer twice at its peak.
    body = bytearray()
    async for chunk in response.content.iter_any():
        if len(body) + len(chunk) > limit:
            shown = "after decompression " if encoding != "identity" else ""
            raise _too_large(
                response.status, limit, f"{len(body) + len(chunk):,}+ bytes {shown}read so far"
            )
        body += chunk
    return body


class AiohttpTransport:
    """Sends :class:`HttpRequest` objects over one aiohttp session."""

    def __init__(
        self,
        *,
        connection_limit: int,
        timeout: Timeout,
        trust_env: bool = False,
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._max_response_bytes = check_max_response_bytes(max_response_bytes)
        self._connection_limit = connection_limit
        self._trust_env = trust_env
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self._attempt_timeout = timeout.attempt
        # aiohttp's own total timeout bounds each attempt from the send to the last body
        # byte (the body is read inside it); past aiohttp's ceil_threshold (5 s) its
        # deadline is rounded up to a whole second, which groups the timers. An
        # asyncio.timeout() around the request did the same at 47k more instructions
        # per request (callgrind, whole client: 714k -> 667k).
        self._client_timeout = aiohttp.ClientTimeout(
            total=timeout.attempt, sock_connect=timeout.connect, sock_read=timeout.read
        )
        self._session: aiohttp.ClientSession | None = None
        # (scheme, host, port) -> (proxy URL, proxy auth), or None for a direct line.
        self._proxies: dict[
            tuple[str, str | None, int | None], tuple[URL, BasicAuth | None] | None
        ] = {}

    @property
    def is_open(self) -> bool:
        return self._session is not None and not self._session.closed

    async def open(self) -> None:
        """Create the session; must run inside the event loop that will use it."""
        connector = aiohttp.TCPConnector(limit=self._connection_limit, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._client_timeout,
            headers=self._headers,
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        """Close the session, even from inside a cancelled scope."""
        session, self._session = self._session, None
        if session is not None:
            # A cancelled scope would abort the close and leak the connector.
            with anyio.CancelScope(shield=True):
                await session.close()

    def _proxy_for(self, url: str) -> tuple[URL | None, BasicAuth | None]:
        """The proxy for ``url`` from ``HTTP(S)_PROXY`` / ``NO_PROXY``, with ``trust_env``.

        Looked up here rather than by the session's own ``trust_env``, which would
        also send ``~/.netrc`` credentials for the API host and then refuse our
        ``Authorization`` header ("Cannot combine AUTHORIZATION header with AUTH").
        """
        if not self._trust_env:
            return None, None
        target = URL(url)
        key = (target.scheme, target.host, target.port)
        if key not in self._proxies:
            try:
                self._proxies[key] = get_env_proxy_for_url(target)
            except LookupError:
                self._proxies[key] = None
        found = self._proxies[key]
        return (None, None) if found is None else found

    async def send(self, request: HttpRequest) -> RawResponse:
        """One HTTP exchange: (status, headers, body), or an ``APIConnectionError``.

        An answer over the cap (the request's own, if tighter) is a
        ``ResponseDecodeError``; its body is not kept.
        """
        session = self._session
        if session is None:
            raise APIConnectionError("transport is closed", request_sent=False)
        limit = self._max_response_bytes
        if request.max_response_bytes is not None and request.max_response_bytes < limit:
            limit = request.max_response_bytes
        proxy, proxy_auth = self._proxy_for(request.url)
        try:
            async with session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as response:
                body = await _read_capped(response, limit)
                return response.status, response.headers, body
        except aiohttp.ConnectionTimeoutError as exc:
            raise APITimeoutError(f"connect timed out: {exc}", request_sent=False) from exc
        except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
            raise APITimeoutError(
                f"no complete answer within the timeout ({self._attempt_timeout}s per attempt)"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made: nothing reached the server.
            raise APIConnectionError(f"cannot connect: {exc}", request_sent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # A malformed answer's text may quote the server at length.
            raise APIConnectionError(
                truncate_text(f"connection failed: {type(exc).__name__}: {exc}".rstrip(": "))
            ) from exc
        except ValueError as exc:
            # aiohttp refuses, before sending, a header or URL it cannot write. Its
            # message may quote the header, so it is not passed on (secrets).
            raise ValidationError(
                "request cannot be sent: a header or the URL holds characters HTTP "
                f"cannot carry ({type(exc).__name__})",
                field="request",
            ) from None
