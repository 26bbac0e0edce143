"""The thin aiohttp shell: move bytes, map transport failures to our errors.

One ``ClientSession`` per client, created inside the running loop (a session
made outside it, or reused across loops, is what gives "Event loop is closed").
Network timeouts are aiohttp's ``sock_connect`` / ``sock_read``; the per-attempt
limit is our own scope around the send, because aiohttp's ``total`` also counts
time spent waiting for a pooled connection (REFERENCES, aiohttp). The connector
limit matches our concurrency cap, so our limiter, not aiohttp's pool, queues.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

import aiohttp
import anyio
from aiohttp import BasicAuth
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from ._exceptions import APIConnectionError, APITimeoutError, ValidationError
from ._models import Timeout
from ._protocol import HttpRequest

__all__ = ["AiohttpTransport", "RawResponse", "USER_AGENT"]

USER_AGENT: Final = "nebula-async/0.1.0"
#: How many distinct request URLs keep their proxy answer (the API uses two or three).
_PROXY_URL_CACHE: Final = 32

RawResponse = tuple[int, Mapping[str, str], bytes]


class AiohttpTransport:
    """Sends :class:`HttpRequest` objects over one aiohttp session."""

    def __init__(
        self,
        *,
        connection_limit: int,
        timeout: Timeout,
        trust_env: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._connection_limit = connection_limit
        self._trust_env = trust_env
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self._attempt_timeout = timeout.attempt
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout.connect, sock_read=timeout.read
        )
        self._session: aiohttp.ClientSession | None = None
        # (scheme, host, port) -> (proxy URL, proxy auth), or None for a direct line.
        self._proxies: dict[
            tuple[str, str | None, int | None], tuple[URL, BasicAuth | None] | None
        ] = {}
        self._proxy_by_url: dict[str, tuple[URL | None, BasicAuth | None]] = {}

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
        # The client sends to a handful of URLs (base URL + two paths): remember each
        # one's answer rather than parse the URL on every request.
        known = self._proxy_by_url.get(url)
        if known is not None:
            return known
        target = URL(url)
        key = (target.scheme, target.host, target.port)
        if key not in self._proxies:
            try:
                self._proxies[key] = get_env_proxy_for_url(target)
            except LookupError:
                self._proxies[key] = None
        found = self._proxies[key]
        answer = (None, None) if found is None else found
        if len(self._proxy_by_url) < _PROXY_URL_CACHE:
            self._proxy_by_url[url] = answer
        return answer

    async def send(self, request: HttpRequest) -> RawResponse:
        """One HTTP exchange: (status, headers, body), or an ``APIConnectionError``."""
        session = self._session
        if session is None:
            raise APIConnectionError("transport is closed", request_sent=False)
        proxy, proxy_auth = self._proxy_for(request.url)
        try:
            # asyncio.timeout is one timer handle; an anyio cancel scope costs several
            # times more per attempt, and this sits on the hot path.
            async with asyncio.timeout(self._attempt_timeout):
                async with session.request(
                    request.method,
                    request.url,
                    data=request.body,
                    headers=request.headers,
                    allow_redirects=False,
                    proxy=proxy,
                    proxy_auth=proxy_auth,
                ) as response:
                    body = await response.read()
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
            raise APIConnectionError(
                f"connection failed: {type(exc).__name__}: {exc}".rstrip(": ")
            ) from exc
        except ValueError as exc:
            # aiohttp refuses, before sending, a header or URL it cannot write. Its
            # message may quote the header, so it is not passed on (secrets).
            raise ValidationError(
                "request cannot be sent: a header or the URL holds characters HTTP "
                f"cannot carry ({type(exc).__name__})",
                field="request",
            ) from None
