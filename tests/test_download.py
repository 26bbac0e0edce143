"""Image downloads for ``--download``, against a real image server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from nebula_async import GeneratedImage
from nebula_async.cli._download import (
    ImageDownloader,
    address_refusal,
    api_is_loopback,
    extension_for,
    image_file_name,
    safe_file_stem,
)
from nebula_async.testing._png import png_bytes

PNG = png_bytes(4, 4)
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-ish" * 8
MiB = 2**20


class ImageHost:
    """A tiny image server: fixed answers per path, and a hit counter."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # body bytes written, by path
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
        if path == "/drip.png":
            return await self.stream(request, [b"\x89"] * 400, pause=0.05)
        if path == "/slow.png":  # ~0.5 s for the whole image
            return await self.stream(request, [PNG[:8], PNG[8:]], pause=0.5)
        if path == "/big-announced.png":
            return web.Response(body=b"\0" * (3 * MiB), content_type="image/png")
        if path == "/big-chunked.png":
            return await self.stream(request, [b"\0" * 65536] * 1024)  # 64 MiB
        if path == "/exactly-1mib.png":
            return await self.stream(request, [PNG, b"\0" * (MiB - len(PNG))])
        if path == "/to-metadata":
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        if path == "/to-internal-name":
            raise web.HTTPFound(f"http://internal.test:{request.url.port}/photo.jpg")
        if path == "/to-loopback-name":
            raise web.HTTPFound(f"http://metadata.test:{request.url.port}/photo.jpg")
        return web.Response(status=404, text="no such image")

    async def stream(
        self, request: web.Request, chunks: list[bytes], pause: float = 0.0
    ) -> web.StreamResponse:
        """A chunked answer (no Content-Length), ``pause`` seconds between chunks."""
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for index, chunk in enumerate(chunks):
                if index and pause:
                    await asyncio.sleep(pause)
                await response.write(chunk)
                self.sent[request.path] += len(chunk)
            await response.write_eof()
        except ConnectionError:  # the client hung up: what the cap or deadline is for
            pass
        return response


class MapResolver(AbstractResolver):
    """DNS by table: each name resolves to the listed addresses, whatever they are."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


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
async def test_a_stalled_attempt_times_out_then_is_retried_within_the_deadline(
    tmp_path: Path,
) -> None:
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


# -- the deadline and the size cap ------------------------------------------------------


@pytest.mark.anyio
async def test_a_drip_fed_image_ends_at_its_deadline(tmp_path: Path) -> None:
    # One byte every 50 ms: each resets any read timeout, so only a deadline ends it.
    async with image_host() as host:
        async with ImageDownloader(tmp_path, timeout_s=2, allow_loopback=True) as dl:
            started = time.perf_counter()
            outcome = await dl.download_job("j", [GeneratedImage(url=f"{host.base_url}/drip.png")])
            elapsed = time.perf_counter() - started
        dripped = host.sent["/drip.png"]
    assert 1.9 < elapsed < 3.0
    assert outcome.files == [None]
    assert outcome.failures[1] == "not downloaded within 2 s (timeout_s)"
    assert 10 < dripped < 60  # it was dripping all along, and stopped when we hung up
    assert listing(tmp_path) == []  # the partial file is gone


@pytest.mark.anyio
async def test_the_deadline_does_not_count_the_wait_for_a_slot(tmp_path: Path) -> None:
    async with (
        image_host() as host,
        ImageDownloader(tmp_path, concurrency=1, timeout_s=0.9, allow_loopback=True) as dl,
    ):
        images = [GeneratedImage(url=f"{host.base_url}/slow.png")] * 3  # ~1.5 s in a row
        outcome = await dl.download_job("j", images)
    assert outcome.error is None
    assert [read(file) for file in outcome.files] == [PNG] * 3


@pytest.mark.anyio
async def test_images_over_the_size_cap_fail_and_leave_no_file(tmp_path: Path) -> None:
    async with (
        image_host() as host,
        ImageDownloader(tmp_path, max_bytes=MiB, backoff_s=0.01, allow_loopback=True) as dl,
    ):
        images = [
            GeneratedImage(url=f"{host.base_url}/big-announced.png"),
            GeneratedImage(url=f"{host.base_url}/big-chunked.png"),
            GeneratedImage(url=f"{host.base_url}/exactly-1mib.png"),
            GeneratedImage(b64_json=base64.b64encode(b"\0" * (MiB + 3)).decode()),
        ]
        outcome = await dl.download_job("j", images)
        hits, sent = dict(host.hits), host.sent["/big-chunked.png"]
    assert outcome.failures[1] == "Content-Length 3,145,728 is over max_bytes (1,048,576 bytes)"
    assert outcome.failures[2] == "larger than max_bytes (1,048,576 bytes)"
    assert outcome.failures[4] == "larger than 1,048,576 bytes (max_bytes)"
    assert outcome.files[2] == str(tmp_path / "j-3.png")
    assert len(read(outcome.files[2])) == MiB
    assert listing(tmp_path) == ["j-3.png"]  # no partial file of the others
    assert hits["/big-announced.png"] == hits["/big-chunked.png"] == 1  # not retried
    assert sent < 32 * MiB  # the chunked one was cut off, not read to its end


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("93.184.215.14", None),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", None),
        ("127.0.0.1", "loopback"),
        ("127.200.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "private"),  # reserved, and private to the ipaddress module
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("not-an-ip", "not an IP address"),
    ],
)
def test_address_refusal(address: str, expected: str | None) -> None:
    assert address_refusal(address) == expected
    assert address_refusal(address, allow_private=True) is None
    loopback_allowed = address_refusal(address, allow_loopback=True)
    assert loopback_allowed == (None if expected == "loopback" else expected)


def test_loopback_is_allowed_for_a_loopback_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEBULA_BASE_URL", raising=False)
    assert not api_is_loopback(None)  # the service itself
    assert api_is_loopback("http://127.0.0.1:8000")
    assert api_is_loopback("http://localhost:8000/")
    assert not api_is_loopback("https://ai-nebula.com")
    monkeypatch.setenv("NEBULA_BASE_URL", "http://[::1]:9")
    assert api_is_loopback(None)
    assert not api_is_loopback("https://10.0.0.1")  # private is not loopback
    assert not api_is_loopback("http://[::1")


@pytest.mark.anyio
async def test_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    async with image_host() as host:
        image = [GeneratedImage(url=f"{host.base_url}/photo.jpg")]
        async with ImageDownloader(tmp_path, attempts=3) as dl:
            refused = await dl.download_job("a", image)
        hits = host.hits["/photo.jpg"]
        async with ImageDownloader(tmp_path, allow_loopback=True) as dl:
            allowed = await dl.download_job("b", image)
    assert refused.failures[1].startswith("address 127.0.0.1 is loopback: not fetched")
    assert "after" not in refused.failures[1]  # a refusal is not retried
    assert hits == 0  # never connected
    assert allowed.error is None


@pytest.mark.anyio
async def test_a_name_that_resolves_to_loopback_is_refused(tmp_path: Path) -> None:
    # The metadata-service attack by name: DNS answers an internal address.
    async with image_host() as host:
        port = host.base_url.rpartition(":")[2]
        resolver = MapResolver({"metadata.test": ["127.0.0.1"]})
        image = [GeneratedImage(url=f"http://metadata.test:{port}/photo.jpg")]
        async with ImageDownloader(tmp_path, resolver=resolver) as dl:
            refused = await dl.download_job("a", image)
        hits = host.hits["/photo.jpg"]
        # The same name, once loopback is allowed, is fetched: the refusal was the address's.
        resolver = MapResolver({"metadata.test": ["127.0.0.1"]})
        async with ImageDownloader(tmp_path, resolver=resolver, allow_loopback=True) as dl:
            allowed = await dl.download_job("b", image)
    assert refused.failures[1].startswith("address 127.0.0.1 is loopback")
    assert hits == 0
    assert allowed.error is None
    assert read(allowed.files[0]) == JPEG


@pytest.mark.anyio
async def test_internal_addresses_are_refused_by_name_and_by_literal(tmp_path: Path) -> None:
    resolver = MapResolver(
        {
            "meta.test": ["169.254.169.254"],
            "v6-meta.test": ["fe80::1"],
            "lan.test": ["10.0.0.1", "192.168.0.1"],
            "group.test": ["224.0.0.251"],
            "nowhere.test": ["0.0.0.0"],
        }
    )
    urls = [
        "http://meta.test/latest/meta-data/",
        "http://v6-meta.test/x.png",
        "http://lan.test/x.png",
        "http://group.test/x.png",
        "http://nowhere.test/x.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fe80::1]/x.png",
        "http://[::ffff:169.254.169.254]/x.png",
        "https://10.0.0.1/x.png",
    ]
    # Loopback allowed (a mock-server run) changes nothing for the others.
    async with ImageDownloader(tmp_path, resolver=resolver, allow_loopback=True) as dl:
        started = time.perf_counter()
        outcome = await dl.download_job("j", [GeneratedImage(url=url) for url in urls])
        elapsed = time.perf_counter() - started
    kinds = [outcome.failures[k].split(": not fetched")[0] for k in range(1, len(urls) + 1)]
    # Both of its addresses are private; aiohttp tries each and reports the last one.
    assert kinds[2] in ("address 10.0.0.1 is private", "address 192.168.0.1 is private")
    kinds[2] = "one of two"
    assert kinds == [
        "address 169.254.169.254 is link-local",
        "address fe80::1 is link-local",
        "one of two",
        "address 224.0.0.251 is multicast",
        "address 0.0.0.0 is unspecified",
        "address 169.254.169.254 is link-local",
        "address fe80::1 is link-local",
        "address ::ffff:a9fe:a9fe is link-local",  # ::ffff:169.254.169.254
        "address 10.0.0.1 is private",
    ]
    assert elapsed < 1  # refused before connecting: no connect timeout waited for
    assert listing(tmp_path) == []


@pytest.mark.anyio
async def test_a_name_with_a_refused_and_an_allowed_address_uses_the_allowed(
    tmp_path: Path,
) -> None:
    async with image_host() as host:
        port = host.base_url.rpartition(":")[2]
        resolver = MapResolver({"mixed.test": ["169.254.169.254", "127.0.0.1"]})
        async with ImageDownloader(tmp_path, resolver=resolver, allow_loopback=True) as dl:
            outcome = await dl.download_job(
                "j", [GeneratedImage(url=f"http://mixed.test:{port}/photo.jpg")]
            )
    assert outcome.error is None


@pytest.mark.anyio
async def test_redirects_to_refused_addresses_are_refused(tmp_path: Path) -> None:
    resolver = MapResolver({"internal.test": ["10.0.0.1"], "metadata.test": ["127.0.0.1"]})
    async with image_host() as host:
        async with ImageDownloader(tmp_path, resolver=resolver, allow_loopback=True) as dl:
            outcome = await dl.download_job(
                "j",
                [
                    GeneratedImage(url=f"{host.base_url}/to-metadata"),
                    GeneratedImage(url=f"{host.base_url}/to-internal-name"),
                    GeneratedImage(url=f"{host.base_url}/to-loopback-name"),  # allowed here
                ],
            )
        hits = dict(host.hits)
    assert outcome.failures[1].startswith("address 169.254.169.254 is link-local")
    assert outcome.failures[2].startswith("address 10.0.0.1 is private")
    assert outcome.files[2] == str(tmp_path / "j-3.jpg")
    assert hits["/to-metadata"] == hits["/to-internal-name"] == 1  # refusals not retried
