"""Test helpers: :class:`MockNebulaServer`, a Nebula v4 API on loopback.

Use it in your own tests to run the client against a real HTTP server with
injected latency, faults, a server-side rate limit and token expiry::

    from nebula_async.testing import MockNebulaServer

    async with MockNebulaServer(faults={"http_503": 0.1}) as server:
        async with na.NebulaClient(token="mock-token", base_url=server.base_url) as client:
            result = await client.img2img(na.Img2ImgRequest(model="m", prompt="p"))
        assert server.requests[-1].field("prompt") == "p"

A limit the client is not told, as issue 10 measures it (at most 20 requests in
any 1 s window, refused as HTTP 429 with ``Retry-After: 1``; 10/s after 5 s)::

    MockNebulaServer(rate_limit=20, rate_limit_algorithm="sliding_window",
                     rate_limit_window_s=1.0, rate_limit_schedule=[(5.0, 10)])

:func:`busiest_window` reads the limit back from ``server.requests``. The
``nebula-async mock-server`` command is built on :func:`add_mock_server_arguments`
and :func:`serve_mock_server`.
"""

from __future__ import annotations

from ._answers import FAULT_KINDS
from ._command import add_mock_server_arguments, serve_mock_server
from ._mock_server import IMG2IMG_PATH, TOKEN_PATH, MockNebulaServer
from ._payload import check_payload
from ._png import PNG_SIGNATURE, png_bytes
from ._ratelimit import ALGORITHMS as RATE_LIMIT_ALGORITHMS
from ._records import ReceivedRequest, busiest_window

__all__ = [
    "FAULT_KINDS",
    "IMG2IMG_PATH",
    "MockNebulaServer",
    "PNG_SIGNATURE",
    "RATE_LIMIT_ALGORITHMS",
    "ReceivedRequest",
    "TOKEN_PATH",
    "add_mock_server_arguments",
    "busiest_window",
    "check_payload",
    "png_bytes",
    "serve_mock_server",
]
