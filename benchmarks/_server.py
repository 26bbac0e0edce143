"""The mock server in a process of its own, pinned to its own core.

The benchmarks measure the client, so the server must never be the client's
bottleneck or steal its CPU: :class:`ServerProcess` starts ``MockNebulaServer``
in ``lean`` mode (precomputed answers, no validation or records) in a child
process, pins it to one core and the client to the others, and stops it on exit.
Run as a module it is that child: the ``nebula-async mock-server`` flags plus
``--cpu``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from nebula_async.testing import add_mock_server_arguments, serve_mock_server

from ._cpu import process_cpu_seconds

__all__ = ["ROOT", "ServerProcess", "pin", "split_cores"]

ROOT: Final = Path(__file__).resolve().parent.parent
_LISTENING: Final = "nebula mock server listening on "
_START_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 10.0


def _allowed_cores() -> frozenset[int]:
    with contextlib.suppress(AttributeError, OSError):
        return frozenset(os.sched_getaffinity(0))
    return frozenset({0})


#: The cores this process could use when it started, before :func:`pin` narrowed
#: them: split from this, not from the current affinity, or the server would land
#: on the client's core once the client is pinned.
_CORES: Final = _allowed_cores()


def split_cores() -> tuple[set[int], set[int]]:
    """(server cores, client cores): the first core for the server, the rest for the
    client; with a single core both share it."""
    cores = sorted(_CORES)
    if len(cores) < 2:
        return set(cores), set(cores)
    return {cores[0]}, set(cores[1:])


def pin(cores: set[int]) -> None:
    """Pin this process (all its threads) to ``cores``; a no-op where unsupported."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, cores)


class ServerProcess:
    """A lean ``MockNebulaServer`` in a child process: ``with ServerProcess(0.05) as server:``.

    ``max_s`` bounds its life even if this process dies without stopping it.
    """

    def __init__(self, latency_s: float = 0.0, *, max_s: float = 900.0) -> None:
        self._latency_s = latency_s
        self._max_s = max_s
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None
        self.base_url = ""

    def __enter__(self) -> Self:
        server_cores, _ = split_cores()
        self._stderr = tempfile.TemporaryFile("w+")
        command = [
            sys.executable,
            "-m",
            "benchmarks._server",
            "--lean",
            "--port=0",
            f"--latency={self._latency_s}",
            f"--duration={self._max_s}",
            f"--cpu={','.join(map(str, sorted(server_cores)))}",
        ]
        self._process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        try:
            self.base_url = self._read_url(self._process)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _read_url(self, process: subprocess.Popen[str]) -> str:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], _START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if not line.startswith(_LISTENING):
            raise RuntimeError(f"mock server did not start: {line!r} {self._errors()}")
        return line[len(_LISTENING) :].strip()

    def _errors(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def affinity(self) -> set[int]:
        """The cores the server process may run on (empty if unknown)."""
        if self._process is None:
            return set()
        try:
            return set(os.sched_getaffinity(self._process.pid))
        except (AttributeError, OSError):
            return set()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far; 0.0 if unknown."""
        return 0.0 if self._process is None else process_cpu_seconds(self._process.pid)

    def __repr__(self) -> str:
        return f"<ServerProcess latency={self._latency_s}s url={self.base_url or '-'}>"


def _cores(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._server")
    add_mock_server_arguments(parser)
    parser.add_argument("--cpu", type=_cores, default=None, help="cores to pin to, e.g. 0")
    args = parser.parse_args(argv)
    if args.cpu:
        pin(args.cpu)
    sys.exit(asyncio.run(serve_mock_server(args)))


if __name__ == "__main__":
    main()
