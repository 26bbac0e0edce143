"""A full ``MockNebulaServer`` in a child process that says when each request arrived.

The shared-limit benchmark reads the busiest second at the server, so it needs
the server's own arrival stamps (``ReceivedRequest.received_at``,
``time.monotonic()``: one clock for every process on Linux), which the lean
server of :mod:`benchmarks._server` does not keep. The child is pinned to the
server's core like that one; the parent asks ``take`` on its stdin and reads one
JSON line with the arrival times since the last ``take``. It exits when its stdin
closes (the parent gone) or after ``max_s``.
"""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
from types import TracebackType
from typing import Final, Self

from ._server import ROOT, pin, split_cores

__all__ = ["ArrivalServer"]

_LISTENING: Final = "arrival server listening on "
_START_TIMEOUT_S: Final = 20.0
_TAKE_TIMEOUT_S: Final = 30.0


class ArrivalServer:
    """``with ArrivalServer(0.005) as server:`` then ``server.take()`` after each cell."""

    def __init__(self, latency_s: float, *, max_s: float = 900.0) -> None:
        self._latency_s = latency_s
        self._max_s = max_s
        self._process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> Self:
        command = [sys.executable, "-m", "benchmarks._arrivals", repr(self._latency_s)]
        command.append(repr(self._max_s))
        self._process = process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self._read_line(_START_TIMEOUT_S)
        if not line.startswith(_LISTENING):
            self.__exit__(None, None, None)
            raise RuntimeError(f"arrival server did not start: {line!r}")
        self.base_url = line[len(_LISTENING) :].strip()
        assert process.stdin is not None
        return self

    def _read_line(self, timeout_s: float) -> str:
        assert self._process is not None
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        return self._process.stdout.readline() if ready else ""

    def take(self) -> list[float]:
        """The arrival times (``time.monotonic()``) of the requests since the last take."""
        assert self._process is not None
        assert self._process.stdin is not None
        self._process.stdin.write("take\n")
        self._process.stdin.flush()
        line = self._read_line(_TAKE_TIMEOUT_S)
        if not line:
            raise RuntimeError("arrival server did not answer")
        times: list[float] = json.loads(line)
        return times

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the child's cue to stop
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def _serve(latency_s: float, max_s: float) -> None:
    from nebula_async.testing import MockNebulaServer

    async with MockNebulaServer(latency=latency_s) as server:
        print(_LISTENING + server.base_url, flush=True)
        async with asyncio.timeout(max_s):
            while (await asyncio.to_thread(sys.stdin.readline)).strip() == "take":
                times = [r.received_at for r in server.requests]
                server.requests.clear()
                print(json.dumps(times), flush=True)


def main() -> None:
    pin(split_cores()[0])
    asyncio.run(_serve(float(sys.argv[1]), float(sys.argv[2])))


if __name__ == "__main__":
    main()
