"""Saving a job's generated images to a directory (the CLI's ``--download DIR``).

A separate, small aiohttp session fetches image URLs under its own concurrency
limit (the generation client's limits are for the API, not for the image host),
retrying connection errors and 5xx/429 answers with exponential backoff.
``b64_json`` images are decoded instead. Each file is written atomically (a
temporary file in DIR, then ``os.replace``) as ``{safe id}-{k}.{ext}``, k counting
the job's images from 1; the id is reduced to ``[A-Za-z0-9._-]`` so no name can
leave DIR.

The URLs come from the service's answers, so an image host is not trusted:

- every image has a total deadline (``timeout_s``, all attempts and pauses
  included; a host that drips one byte a second resets any read timeout forever)
  and a size cap (``max_bytes``; the body streams to the temporary file, which is
  removed when the cap is passed);
- the address of every connection is checked as the socket is made (aiohttp's
  ``socket_factory``, called with each address it is about to connect to), so
  a name, an IP literal, a redirect and a DNS answer that changes between two
  look-ups (rebinding) all meet the same check: loopback, link-local
  (169.254.0.0/16, the cloud metadata address, and fe80::/10), private,
  multicast, unspecified, reserved and other non-global addresses are refused
  unless allowed (``allow_loopback`` for a loopback API such as the mock server,
  ``allow_private_addresses`` for everything).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
import anyio

from nebula_async._models import GeneratedImage
from nebula_async._protocol import DEFAULT_BASE_URL, is_loopback_host

from ._jobfile import sniff_image_mime

__all__ = [
    "AddressRefusedError",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DownloadError",
    "DownloadOutcome",
    "ImageDownloader",
    "address_refusal",
    "api_is_loopback",
    "describe_failures",
    "extension_for",
    "image_file_name",
    "safe_file_stem",
]

_UNSAFE_CHARS: Final = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM: Final = 80
_EXTENSION_BY_MIME: Final = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}
_URL_EXTENSION: Final = re.compile(r"\.([A-Za-z0-9]{1,5})$")
_RETRY_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK: Final = 1 << 16
#: Bytes gathered before one write to the temporary file (one thread hop each).
_WRITE_BATCH: Final = 1 << 20
#: The cap on one image. The largest the API makes is 4096x4096; as an RGBA PNG that
#: does not compress at all, 4 bytes a pixel + a filter byte a row + zlib framing is
#: 64.1 MiB, so 80 MiB refuses no real image and stops an endless one.
DEFAULT_MAX_IMAGE_BYTES: Final = 80 * 2**20
_SHOWN_URL: Final = 80


def address_refusal(
    address: str, *, allow_loopback: bool = False, allow_private: bool = False
) -> str | None:
    """Why a download must not connect to the IP ``address``, or None when it may.

    Only globally routable unicast addresses are allowed by default; an
    IPv4-mapped IPv6 address is judged as the IPv4 address it carries.

    >>> address_refusal("93.184.215.14") is None
    True
    >>> address_refusal("169.254.169.254"), address_refusal("::ffff:10.0.0.1")
    ('link-local', 'private')
    >>> address_refusal("127.0.0.1", allow_loopback=True) is None
    True
    """
    if allow_private:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    # Most specific first: 169.254.0.0/16 is also "private" to the ipaddress module.
    for kind, hit in (
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    ):
        if hit:
            return kind
    return None


def api_is_loopback(base_url: str | None) -> bool:
    """Whether the API named by ``base_url`` (else ``$NEBULA_BASE_URL``, else the
    service) is on this machine: then its image URLs may be loopback too (the mock
    server's are), so pass this as ``ImageDownloader(allow_loopback=...)``."""
    url = base_url or os.environ.get("NEBULA_BASE_URL") or DEFAULT_BASE_URL
    try:
        return is_loopback_host(urlsplit(url.strip()).hostname)
    except ValueError:
        return False


class AddressRefusedError(OSError):
    """A connection refused by the download address policy (before connecting)."""

    def __init__(self, address: str, kind: str) -> None:
        # One errno for every refusal: aiohappyeyeballs keeps it when it merges the
        # errors of a name's several addresses, so the refusal is still recognised.
        super().__init__(
            errno.EACCES,
            f"address {address} is {kind}: not fetched (image downloads connect only "
            "to public addresses)",
        )


def safe_file_stem(job_id: str) -> str:
    """A file-name stem for a job id, using only ``[A-Za-z0-9._-]``.

    An id that is already safe is kept as is. Otherwise unsafe characters (and
    leading dots, so neither ``..`` nor hidden files appear) become ``_`` and a
    short hash of the real id is appended, so two ids that sanitise alike
    (``a/b``, ``a_b``) never share files.

    >>> safe_file_stem("job-7")
    'job-7'
    >>> safe_file_stem("../x").startswith("___x_")
    True
    """
    stem = _UNSAFE_CHARS.sub("_", job_id)
    stripped = stem.lstrip(".")
    stem = "_" * (len(stem) - len(stripped)) + stripped
    stem = stem[:_MAX_STEM]
    if stem != job_id or not stem:
        stem = f"{stem}_{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"
    return stem


def extension_for(content_type: str | None, url: str | None, head: bytes) -> str:
    """A file extension from the Content-Type, else the URL's, else the bytes' magic."""
    if content_type:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime in _EXTENSION_BY_MIME:
            return _EXTENSION_BY_MIME[mime]
    if url:
        match = _URL_EXTENSION.search(urlsplit(url).path)
        if match:
            extension = match.group(1).lower()
            return "jpg" if extension == "jpeg" else extension
    sniffed = sniff_image_mime(head[:16])
    return _EXTENSION_BY_MIME[sniffed] if sniffed else "bin"


def image_file_name(job_id: str, k: int, extension: str) -> str:
    """The file name of a job's k-th image (k from 1)."""
    return f"{safe_file_stem(job_id)}-{k}.{extension}"


def _write_atomically(directory: Path, name: str, data: bytes) -> Path:
    # A temp file in the same directory, so os.replace is an atomic rename: a reader
    # (or a crash) never sees a half-written image under its final name.
    target = directory / name
    handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    return target


class DownloadError(Exception):
    """One image could not be saved (the message says why)."""


class _RetryableDownloadError(DownloadError):
    pass


@dataclass(frozen=True, slots=True)
class DownloadOutcome:
    """The files written for one job (None where an image failed) and what went wrong.

    ``failures`` maps the position k (from 1) of each image not saved to the reason;
    ``error`` joins them into one message (None when every image was saved).
    """

    files: list[str | None]
    error: str | None
    failures: Mapping[int, str] = field(default_factory=dict)


def describe_failures(failures: Mapping[int, str]) -> str | None:
    """``"image 2: HTTP 404; image 3: ..."`` in image order, or None when there are none."""
    return "; ".join(f"image {k}: {failures[k]}" for k in sorted(failures)) or None


class ImageDownloader:
    """Fetches and writes job images into ``directory``; use as an async context manager.

    ``concurrency`` images are fetched at once over all jobs; each fetch gets
    ``attempts`` tries with backoff ``backoff_s * 2**retry`` between them, all
    within ``timeout_s`` from the moment the image gets its download slot; an
    attempt that receives nothing for ``read_timeout_s`` is abandoned (and
    retried while time remains). An image over ``max_bytes`` fails and leaves no
    file. Addresses are checked on every connection (see the module docstring);
    ``resolver`` replaces aiohttp's DNS resolver (an ``aiohttp.abc.AbstractResolver``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        concurrency: int = 8,
        attempts: int = 3,
        backoff_s: float = 0.25,
        timeout_s: float = 120.0,
        read_timeout_s: float = 30.0,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        allow_loopback: bool = False,
        allow_private_addresses: bool = False,
        resolver: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._concurrency = concurrency
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._read_timeout_s = min(read_timeout_s, timeout_s)
        self._max_bytes = max_bytes
        self._allow_loopback = allow_loopback
        self._allow_private = allow_private_addresses
        self._resolver = resolver
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._concurrency,
                resolver=self._resolver,
                socket_factory=self._checked_socket,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=min(10.0, self._timeout_s),
                sock_read=self._read_timeout_s,
            ),
        )
        return self

    def _checked_socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """aiohttp's socket factory: a socket for an allowed address, else the refusal.

        Called with the very address the connection is about to be made to, after
        any DNS look-up, for every connection (redirects included).
        """
        family, kind, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        refusal = address_refusal(
            address, allow_loopback=self._allow_loopback, allow_private=self._allow_private
        )
        if refusal is not None:
            raise AddressRefusedError(address, refusal)
        return socket.socket(family=family, type=kind, proto=proto)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            # Shielded: a cancelled run still closes its connections (no unclosed warnings).
            with anyio.CancelScope(shield=True):
                await session.close()

    async def download_job(self, job_id: str, images: Sequence[GeneratedImage]) -> DownloadOutcome:
        """Save every image of a job concurrently; never raises for a failed image."""
        saved, failures = await self.save_images(job_id, dict(enumerate(images, start=1)))
        files: list[str | None] = [saved.get(k) for k in range(1, len(images) + 1)]
        return DownloadOutcome(files, describe_failures(failures), failures)

    async def save_images(
        self, job_id: str, images: Mapping[int, GeneratedImage]
    ) -> tuple[dict[int, str], dict[int, str]]:
        """Save some images of a job, keyed by their position k (from 1), concurrently.

        Returns the paths written and the reasons for the images not saved, both by
        k. Never raises for a failed image (only cancellation gets through).
        """
        saved: dict[int, str] = {}
        failures: dict[int, str] = {}

        async def save(k: int, image: GeneratedImage) -> None:
            try:
                saved[k] = str(await self._save_one(job_id, k, image))
            except DownloadError as exc:
                failures[k] = str(exc)
            except Exception as exc:  # one odd image never stops the run
                failures[k] = f"{type(exc).__name__}: {exc}".rstrip(": ")

        async with anyio.create_task_group() as tasks:
            for k, image in images.items():
                tasks.start_soon(save, k, image)
        return saved, failures

    async def _save_one(self, job_id: str, k: int, image: GeneratedImage) -> Path:
        if image.url is not None:
            return await self._download(image.url, job_id, k)
        if image.b64_json is None:
            raise DownloadError("the image has neither a url nor b64_json")
        if len(image.b64_json) // 4 * 3 > self._max_bytes + 2:
            raise DownloadError(f"larger than {self._max_bytes:,} bytes (max_bytes)")
        try:
            data = base64.b64decode(image.b64_json)
        except (binascii.Error, ValueError) as exc:
            raise DownloadError(f"invalid b64_json: {exc}") from None
        name = image_file_name(job_id, k, extension_for(None, None, data))
        try:
            return await anyio.to_thread.run_sync(_write_atomically, self.directory, name, data)
        except OSError as exc:
            raise DownloadError(f"cannot write {self.directory / name}: {exc.strerror}") from None

    async def _download(self, url: str, job_id: str, k: int) -> Path:
        """Every attempt at one URL, within the image's deadline."""
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise DownloadError(f"bad URL {url[:_SHOWN_URL]!r}: {exc}") from None
        if scheme not in ("http", "https"):
            raise DownloadError(f"not an http(s) URL: {url[:_SHOWN_URL]!r}")
        last_problem = ""
        # The slot is held through the pauses between attempts, so the deadline
        # never counts time spent queueing behind other images.
        async with self._limiter:
            with anyio.move_on_after(self._timeout_s):
                for attempt in range(1, self._attempts + 1):
                    try:
                        return await self._attempt(url, job_id, k)
                    except _RetryableDownloadError as exc:
                        last_problem = str(exc)
                    except aiohttp.ClientConnectorError as exc:
                        if isinstance(exc.os_error, OSError) and exc.os_error.errno == errno.EACCES:
                            raise DownloadError(_refusal_text(exc.os_error)) from None
                        last_problem = _describe(exc)
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        last_problem = _describe(exc)
                    except ValueError as exc:  # a URL aiohttp cannot even parse
                        raise DownloadError(f"bad URL {url[:_SHOWN_URL]!r}: {exc}") from None
                    if attempt < self._attempts:
                        await anyio.sleep(self._backoff_s * 2 ** (attempt - 1))
                raise DownloadError(f"{last_problem} (after {self._attempts} attempts)")
        shown = f"; last problem: {last_problem}" if last_problem else ""
        raise DownloadError(f"not downloaded within {self._timeout_s:g} s (timeout_s){shown}")

    async def _attempt(self, url: str, job_id: str, k: int) -> Path:
        """One GET, streamed into a temporary file that becomes the image's file."""
        assert self._session is not None, "use ImageDownloader as an async context manager"
        async with self._session.get(url) as response:
            if response.status in _RETRY_STATUSES:
                raise _RetryableDownloadError(f"HTTP {response.status}")
            if response.status >= 400:
                raise DownloadError(f"HTTP {response.status}")
            length = response.content_length
            if length is not None and length > self._max_bytes:
                raise DownloadError(
                    f"Content-Length {length:,} is over max_bytes ({self._max_bytes:,} bytes)"
                )
            file, temp_name = await anyio.to_thread.run_sync(self._temp_file, job_id, k)
            try:
                with file:
                    head = await self._stream_into(response, file)
                name = image_file_name(
                    job_id, k, extension_for(response.headers.get("Content-Type"), url, head)
                )
                target = self.directory / name
                await anyio.to_thread.run_sync(os.replace, temp_name, target)
            except BaseException:
                # Over the cap, timed out, cancelled: no partial file stays behind.
                with contextlib.suppress(OSError):
                    os.unlink(temp_name)
                raise
            return target

    def _temp_file(self, job_id: str, k: int) -> tuple[IO[bytes], str]:
        """A new temporary file in the directory (same file system: ``os.replace``
        is then an atomic rename), open for writing, and its path."""
        try:
            handle, name = tempfile.mkstemp(
                dir=self.directory, prefix=f".{safe_file_stem(job_id)}-{k}.", suffix=".part"
            )
        except OSError as exc:
            raise DownloadError(f"cannot write in {self.directory}: {exc.strerror}") from None
        return os.fdopen(handle, "wb"), name

    async def _stream_into(self, response: aiohttp.ClientResponse, file: IO[bytes]) -> bytes:
        """Copy the body into ``file`` under the size cap; returns its first bytes."""
        head = b""
        size = 0
        pending = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > self._max_bytes:
                raise DownloadError(f"larger than max_bytes ({self._max_bytes:,} bytes)")
            if len(head) < 16:
                head += chunk[: 16 - len(head)]
            pending += chunk
            if len(pending) >= _WRITE_BATCH:
                await self._write(file, bytes(pending))
                pending.clear()
        if pending:
            await self._write(file, bytes(pending))
        return head

    async def _write(self, file: IO[bytes], data: bytes) -> None:
        try:
            await anyio.to_thread.run_sync(file.write, data)
        except OSError as exc:
            raise DownloadError(f"cannot write in {self.directory}: {exc.strerror}") from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _refusal_text(error: OSError) -> str:
    # aiohappyeyeballs joins several addresses' refusals as "Multiple exceptions: ...".
    return str(error.strerror or error).removeprefix("Multiple exceptions: ")
