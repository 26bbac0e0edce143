"""Image downloads for ``--download``, against a real image server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from nebula_async import GeneratedImage
from nebula_async.cli._download import (
    ImageDownloader,
    extension_for,
    image_file_name,
    safe_file_stem,
)
from nebula_async.testing._png import png_bytes

PNG = png_bytes(4, 4)
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-ish" * 8


class ImageHost:
    """A tiny image server: fixed answers per path, and a hit counter."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.base_url = ""
        self.release = asyncio.Event()  # ends the answers to /hang

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        if path == "/photo.jpg":
            return web.Response(body=JPEG, content_type="image/jpeg")
        if path == "/no-type/pic.webp":
            return web.Response(
                body=b"RIFF\0\0\0\0WEBPVP8 ", content_type="application/octet-stream"
            )
        if path == "/sniff-me":
            return web.Response(body=PNG, content_type="application/octet-stream")
        if path == "/flaky.png" and self.hits[path] <= 2:
            return web.Response(status=503, text="busy")
        if path == "/flaky.png":
            return web.Response(body=PNG, content_type="image/png")
        if path == "/always-500.png":
            return web.Response(status=500, text="broken")
        if path == "/hang.png":
            await self.release.wait()
            return web.Response(status=503)
        return web.Response(status=404, text="no such image")


@asynccontextmanager
async def image_host() -> AsyncIterator[ImageHost]:
    host = ImageHost()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", host.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield host
    finally:
        host.release.set()
        await runner.cleanup()


def read(file: str | None) -> bytes:
    assert file is not None
    return Path(file).read_bytes()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".part")]


def test_safe_file_stem_keeps_safe_ids_and_confines_the_rest() -> None:
    assert safe_file_stem("job-7_v2.final") == "job-7_v2.final"
    for unsafe in ("../x", "a/b", "..", "/etc/passwd", "a b", "ü", ""):
        stem = safe_file_stem(unsafe)
        assert stem
        assert set(stem) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert not stem.startswith(".")
        assert "/" not in image_file_name(unsafe, 1, "png")
    # Ids that sanitise alike still get different files.
    assert safe_file_stem("a/b") != safe_file_stem("a_b")
    assert safe_file_stem("a/b") != safe_file_stem("a:b")
    assert len(safe_file_stem("x" * 500)) < 100


def test_extension_from_content_type_then_url_then_bytes() -> None:
    assert extension_for("image/jpeg; charset=binary", "https://h/x.png", b"") == "jpg"
    assert extension_for("application/octet-stream", "https://h/x.webp?sig=1", b"") == "webp"
    assert extension_for(None, "https://h/x.JPEG", b"") == "jpg"
    assert extension_for(None, "https://h/noext", PNG) == "png"
    assert extension_for(None, None, b"????") == "bin"


@pytest.mark.anyio
async def test_downloads_name_files_by_id_and_position(tmp_path: Path) -> None:
    async with (
        image_host() as host,
        ImageDownloader(tmp_path / "imgs", backoff_s=0.01, allow_loopback=True) as dl,
    ):
        images = [
            GeneratedImage(url=f"{host.base_url}/photo.jpg"),
            GeneratedImage(url=f"{host.base_url}/no-type/pic.webp"),
            GeneratedImage(url=f"{host.base_url}/sniff-me"),
            GeneratedImage(b64_json=base64.b64encode(PNG).decode()),
        ]
        outcome = await dl.download_job("job-1", images)
    assert outcome.error is None
    directory = tmp_path / "imgs"
    assert outcome.files == [
        str(directory / "job-1-1.jpg"),
        str(directory / "job-1-2.webp"),
        str(directory / "job-1-3.png"),
        str(directory / "job-1-4.png"),
    ]
    assert read(outcome.files[0]) == JPEG
    assert read(outcome.files[3]) == PNG
    assert no_temp_files(directory)


@pytest.mark.anyio
async def test_unsafe_ids_cannot_leave_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    async with image_host() as host, ImageDownloader(directory, allow_loopback=True) as dl:
        image = [GeneratedImage(url=f"{host.base_url}/photo.jpg")]
        for job_id in ("../x", "a/b", "a_b", "/abs"):
            outcome = await dl.download_job(job_id, image)
            assert outcome.error is None
    written = listing(directory)
    assert len(written) == 4
    assert all(name.endswith("-1.jpg") for name in written)
    assert listing(tmp_path) == ["out"]  # nothing escaped


@pytest.mark.anyio
async def test_retries_5xx_but_not_404_and_reports_failures(tmp_path: Path) -> None:
    async with (
        image_host() as host,
        ImageDownloader(tmp_path, attempts=3, backoff_s=0.01, allow_loopback=True) as dl,
    ):
        images = [
            GeneratedImage(url=f"{host.base_url}/flaky.png"),
            GeneratedImage(url=f"{host.base_url}/missing.png"),
            GeneratedImage(url=f"{host.base_url}/always-500.png"),
            GeneratedImage(url="ftp://example.com/x.png"),
            GeneratedImage(b64_json="!!not base64!!"),
        ]
        outcome = await dl.download_job("j", images)
        hits = dict(host.hits)
    assert outcome.files[0] == str(tmp_path / "j-1.png")
    assert outcome.files[1:] == [None, None, None, None]
    assert hits == {"/flaky.png": 3, "/missing.png": 1, "/always-500.png": 3}
    assert outcome.error is not None
    assert "image 2: HTTP 404" in outcome.error
    assert "image 3: HTTP 500 (after 3 attempts)" in outcome.error
    assert "image 4: not an http(s) URL" in outcome.error
    assert "image 5: invalid b64_json" in outcome.error
    assert no_temp_files(tmp_path)


@pytest.mark.anyio
async def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    async with image_host() as host:
        dead_url = f"{host.base_url}/photo.jpg"
    # The host is closed now: every attempt is refused.
    async with ImageDownloader(tmp_path, attempts=2, backoff_s=0.01, allow_loopback=True) as dl:
        outcome = await dl.download_job("j", [GeneratedImage(url=dead_url)])
    assert outcome.files == [None]
    assert outcome.error is not None
    assert "after 2 attempts" in outcome.error


@pytest.mark.anyio
async def test_a_hanging_image_times_out_each_attempt_then_is_reported(tmp_path: Path) -> None:
    async with (
        image_host() as host,
        ImageDownloader(
            tmp_path, attempts=2, backoff_s=0.01, read_timeout_s=0.2, allow_loopback=True
        ) as dl,
    ):
        outcome = await dl.download_job("j", [GeneratedImage(url=f"{host.base_url}/hang.png")])
        hits = host.hits["/hang.png"]
    assert outcome.files == [None]
    assert outcome.failures.keys() == {1}
    assert "(after 2 attempts)" in outcome.failures[1]
    assert "Timeout" in outcome.failures[1]
    assert hits >= 2


@pytest.mark.anyio
async def test_save_images_by_position_never_raises_for_a_bad_image(tmp_path: Path) -> None:
    async with (
        image_host() as host,
        ImageDownloader(tmp_path, backoff_s=0.01, allow_loopback=True) as dl,
    ):
        saved, failures = await dl.save_images(
            "j",
            {
                2: GeneratedImage(url=f"{host.base_url}/photo.jpg"),
                5: GeneratedImage(url="http://[::1"),  # aiohttp cannot parse it
                7: GeneratedImage(),
            },
        )
    assert saved == {2: str(tmp_path / "j-2.jpg")}
    assert failures.keys() == {5, 7}
    assert failures[5].startswith("bad URL")
    assert failures[7] == "the image has neither a url nor b64_json"
