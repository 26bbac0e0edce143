"""A purpose-built img2img endpoint on loopback whose answers wait for the test's word.

``MockNebulaServer`` fixes each answer's delay at arrival; the pipeline, drain and
lifecycle tests need to hold requests in flight for as long as they like, to see
exactly which requests arrive while others are held, and to see a request the
client abandoned (handler cancellation on: a disconnect cancels the handler).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import anyio
import orjson
from aiohttp import web

__all__ = ["GatedServer", "request_for", "wait_until"]

IMG2IMG_PATH = "/prod-api/nebula/v4/api/img2imgSubmit"
MODEL = "doubao-seedream-4-0-250828"

#: Answers a test may script for a (prompt, attempt number from 1) pair: an HTTP
#: status (200 answers with an image), or None for a success.
Script = Callable[[str, int], int | None]


def request_for(prompt: str, n: int = 1) -> Any:
    import nebula_async as na

    return na.Img2ImgRequest(model=MODEL, prompt=prompt, image="https://example.com/a.png", n=n)


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        while not predicate():
            await anyio.sleep(0.002)


class GatedServer:
    """Counts requests in flight; holds every answer until :meth:`open` (unless born open).

    ``arrivals`` lists the prompt of each request in arrival order, ``answered`` those
    answered, ``abandoned`` those whose client went away first. ``latency`` is added
    after the gate. ``script(prompt, attempt)`` may answer an error status instead.
    """

    def __init__(
        self, *, opened: bool = False, latency: float = 0.0, script: Script | None = None
    ) -> None:
        self.latency = latency
        self.script = script
        self.arrivals: list[str] = []
        self.answered: list[str] = []
        self.abandoned: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._gate = asyncio.Event()
        if opened:
            self._gate.set()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def open(self) -> None:
        """Let every held answer (and every later one) go."""
        self._gate.set()

    def close_gate(self) -> None:
        """Hold the answers of requests from now on."""
        self._gate.clear()

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post(IMG2IMG_PATH, self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._gate.set()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        prompt = str(payload["batchImageGenerationDTO.prompt"])
        self.arrivals.append(prompt)
        attempt = self.arrivals.count(prompt)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._gate.wait()
            if self.latency:
                await asyncio.sleep(self.latency)
        except asyncio.CancelledError:
            self.abandoned.append(prompt)
            raise
        finally:
            self.in_flight -= 1
        status = self.script(prompt, attempt) if self.script is not None else None
        if status is not None:
            body = {"code": status, "msg": "scripted failure", "data": None}
            return web.json_response(body, status=status)
        n = int(payload.get("batchImageGenerationDTO.n", 1))
        images = [{"url": f"https://img.example.com/{prompt}-{attempt}-{k}.png"} for k in range(n)]
        self.answered.append(prompt)
        return web.json_response({"code": 200, "msg": "ok", "data": {"images": images}})
