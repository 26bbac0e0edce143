"""Saving a job's generated images to a directory (the CLI's ``--download DIR``).

A separate, small aiohttp session fetches image URLs under its own concurrency
limit (the generation client's limits are for the API, not for the image host),
retrying connection errors and 5xx/429 answers with exponential backoff.
``b64_json`` images are decoded instead. Each file is written atomically (a
temporary file in DIR, then ``os.replace``) as ``{safe id}-{k}.{ext}``, k counting
the job's images from 1; the id is reduced to ``[A-Za-z0-9._-]`` so no name can
leave DIR.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

import aiohttp
import anyio

from nebula_async._models import GeneratedImage

from ._jobfile import sniff_image_mime

__all__ = [
    "DownloadError",
    "DownloadOutcome",
    "ImageDownloader",
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
    ``attempts`` tries with backoff ``backoff_s * 2**retry`` between them.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        concurrency: int = 8,
        attempts: int = 3,
        backoff_s: float = 0.25,
        timeout_s: float = 60.0,
        max_bytes: int = 64 * 2**20,
    ) -> None:
        self.directory = Path(directory)
        self._concurrency = concurrency
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._concurrency),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=min(10.0, self._timeout_s), sock_read=self._timeout_s
            ),
        )
        return self

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
            data, content_type = await self._fetch(image.url)
            name = image_file_name(job_id, k, extension_for(content_type, image.url, data))
        elif image.b64_json is not None:
            try:
                data = base64.b64decode(image.b64_json)
            except (binascii.Error, ValueError) as exc:
                raise DownloadError(f"invalid b64_json: {exc}") from None
            name = image_file_name(job_id, k, extension_for(None, None, data))
        else:
            raise DownloadError("the image has neither a url nor b64_json")
        try:
            return await anyio.to_thread.run_sync(_write_atomically, self.directory, name, data)
        except OSError as exc:
            raise DownloadError(f"cannot write {self.directory / name}: {exc.strerror}") from None

    async def _fetch(self, url: str) -> tuple[bytes, str | None]:
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise DownloadError(f"bad URL {url[:80]!r}: {exc}") from None
        if scheme not in ("http", "https"):
            raise DownloadError(f"not an http(s) URL: {url[:80]!r}")
        last_problem = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._limiter:
                    return await self._get(url)
            except _RetryableDownloadError as exc:
                last_problem = str(exc)
            except (TimeoutError, aiohttp.ClientError) as exc:
                last_problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            except ValueError as exc:  # a URL aiohttp cannot even parse
                raise DownloadError(f"bad URL {url[:80]!r}: {exc}") from None
            if attempt < self._attempts:
                await anyio.sleep(self._backoff_s * 2 ** (attempt - 1))
        raise DownloadError(f"{last_problem} (after {self._attempts} attempts)")

    async def _get(self, url: str) -> tuple[bytes, str | None]:
        assert self._session is not None, "use ImageDownloader as an async context manager"
        async with self._session.get(url) as response:
            if response.status in _RETRY_STATUSES:
                raise _RetryableDownloadError(f"HTTP {response.status}")
            if response.status >= 400:
                raise DownloadError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > self._max_bytes:
                    raise DownloadError(f"larger than {self._max_bytes // 2**20} MB")
            return bytes(body), response.headers.get("Content-Type")
