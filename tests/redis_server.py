"""A real ``redis-server`` on 127.0.0.1 for the tests (and the benchmarks).

``RedisServer`` picks a free port, starts ``redis-server`` with no persistence,
waits for ``PING`` and stops it; ``restart()`` stops and starts it again on the
same port (empty, like a real restart without persistence: scripts and keys
gone). ``require_redis_server()`` skips a test when no ``redis-server`` binary
can be found, except in CI (``CI=true``), where a missing one is a failure.

In a test module::

    from redis_server import RedisServer, require_redis_server

    @pytest.fixture(scope="module")
    def redis_server():
        with RedisServer(require_redis_server()) as server:
            yield server
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Final, Self

__all__ = ["RedisServer", "free_port", "require_redis_server"]

_START_TIMEOUT_S: Final = 10.0


def require_redis_server() -> str:
    """The path of ``redis-server``; skips the test when it is missing (fails in CI)."""
    found = shutil.which("redis-server") or next(
        (
            p
            for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if found:
        return found
    import pytest  # here, so that the benchmarks can use this module without pytest

    message = "redis-server not found (Debian: apt-get install redis-server)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise pytest.fail.Exception(f"{message}; CI must have it (.ci/run installs it)")
    raise pytest.skip.Exception(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # A server with requirepass answers -NOAUTH: it is up all the same.
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """``with RedisServer(path) as server:`` a throwaway Redis at ``server.url``."""

    def __init__(
        self, executable: str, *, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.executable = executable
        self.extra_args = extra_args
        self.port = free_port() if port is None else port
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="nebula-redis-")
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--protected-mode", "yes",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _ping(self.port):
            if self._process.poll() is not None:
                err = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise RuntimeError(f"redis-server exited at start: {err[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same port: keys and the script cache are gone."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
