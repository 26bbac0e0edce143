"""``nebula-async run --download``: failed downloads are failures, and a rerun repairs
them from the results file without generating the job again.

The CLI talks to an :class:`ImageGate` on loopback: a small aiohttp server in front
of a real :class:`MockNebulaServer`. It forwards the API calls to the mock and
rewrites the image URLs of each answer to point at itself, so that the test
decides how every image download goes (served, 404, 500, dropped, hanging).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web
from cli_helpers import mock_credentials, read_records  # noqa: F401 (an autouse fixture)

import nebula_async as na
from nebula_async.cli import main
from nebula_async.testing import MockNebulaServer

CLI = [sys.executable, "-m", "nebula_async.cli"]
IMAGE_ROUTE = "/img/{prompt}/{k}/{name}"

# How the gate answers one image: "ok", "404", "500", "drop" or "hang".
Policy = Callable[[str, int], str]


def serve_all(prompt: str, k: int) -> str:
    return "ok"


class ImageGate:
    """The API of ``upstream`` with image downloads under the test's control.

    ``policy(prompt, k)`` decides the answer for image k (from 1) of the submission
    with that prompt; ``hits`` counts image requests by ``(prompt, k)``.
    """

    def __init__(self, upstream: MockNebulaServer) -> None:
        self.upstream = upstream
        self.policy: Policy = serve_all
        self.hits: Counter[tuple[str, int]] = Counter()
        self.base_url = ""
        self.release = asyncio.Event()  # ends "hang" answers
        self._session: aiohttp.ClientSession | None = None

    async def api(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization",)}
        headers["Content-Type"] = "application/json"
        url = self.upstream.base_url + request.path_qs
        async with self._session.post(url, data=body, headers=headers) as answer:
            status, data = answer.status, await answer.read()
        try:
            envelope = orjson.loads(data)
            prompt = na.from_payload(orjson.loads(body)).prompt
        except (orjson.JSONDecodeError, na.ValidationError):
            return web.Response(status=status, body=data, content_type="application/json")
        images = (envelope.get("data") or {}).get("images") if isinstance(envelope, dict) else None
        for k, image in enumerate(images or [], start=1):
            if "url" not in image:  # b64_json
                continue
            name = image["url"].rsplit("/", 1)[1]
            image["url"] = f"{self.base_url}/img/{quote(prompt, safe='')}/{k}/{name}"
        return web.Response(
            status=status, body=orjson.dumps(envelope), content_type="application/json"
        )

    async def image(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        prompt, k = unquote(request.match_info["prompt"]), int(request.match_info["k"])
        self.hits[prompt, k] += 1
        answer = self.policy(prompt, k)
        if answer == "404":
            return web.Response(status=404, text="no such image")
        if answer == "500":
            return web.Response(status=500, text="broken")
        if answer == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if answer == "hang":
            await self.release.wait()
            return web.Response(status=503)
        assert answer == "ok", answer
        url = f"{self.upstream.base_url}/files/{request.match_info['name']}"
        async with self._session.get(url) as upstream:
            return web.Response(body=await upstream.read(), content_type="image/png")

    def image_hits(self) -> int:
        return sum(self.hits.values())


@asynccontextmanager
async def image_gate(**mock_options: Any) -> AsyncIterator[tuple[ImageGate, MockNebulaServer]]:
    async with MockNebulaServer(**mock_options) as server:
        gate = ImageGate(server)
        app = web.Application()
        app.router.add_post("/{tail:.*}", gate.api)
        app.router.add_get(IMAGE_ROUTE, gate.image)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        async with aiohttp.ClientSession() as session:
            gate._session = session
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                gate.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                yield gate, server
            finally:
                gate.release.set()
                await runner.cleanup()


def write_jobs(path: Path, *jobs: dict[str, Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(job) + b"\n" for job in jobs))
    return path


def latest(path: Path) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in read_records(path)}  # the latest line wins


def ok_lines(path: Path) -> Counter[str]:
    return Counter(record["id"] for record in read_records(path) if record["ok"])


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


def run_args(jobs: Path, out: Path, gate: ImageGate, *extra: str) -> list[str]:
    return ["run", str(jobs), "--out", str(out), "--base-url", gate.base_url, *extra]


def saved(files: list[str | None]) -> list[bytes]:
    return [Path(file).read_bytes()[:4] for file in files if file is not None]


def contents(files: list[str]) -> list[bytes]:
    return [Path(file).read_bytes() for file in files]


def remove(file: str) -> None:
    Path(file).unlink()


# -- failed downloads: exit 1, visible, repaired by a rerun that sends nothing ---------------


@pytest.mark.anyio
async def test_failed_downloads_exit_1_and_a_rerun_saves_them_without_regenerating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "two", "model": "m", "prompt": "two", "n": 2},
        {"id": "dropped", "model": "m", "prompt": "dropped"},
        {"id": "fine", "model": "m", "prompt": "fine"},
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    failing = {("two", 2): "404", ("dropped", 1): "drop"}
    async with image_gate() as (gate, server):
        gate.policy = lambda prompt, k: failing.get((prompt, k), "ok")
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 1
        assert server.request_count == 3
        err = capsys.readouterr().err
        assert re.search(r"^  pending downloads +2$", err, flags=re.MULTILINE), err

        first = latest(out)
        two = first["two"]
        _assert_first_run_records(first, images, gate)
        assert ok_lines(out) == {"fine": 1}

        # The rerun fetches only what is missing, from the recorded URLs: nothing is sent.
        gate.policy = serve_all
        gate.hits.clear()
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert server.request_count == 3
        assert gate.hits == {("two", 2): 1, ("dropped", 1): 1}
        err = capsys.readouterr().err
        assert "2 jobs made ok by saving their images (not generated again)" in err
        assert re.search(r"^  ok +3 \(1 done before\)$", err, flags=re.MULTILINE), err
        _assert_rerun_saved(latest(out), two, images)
        assert ok_lines(out) == {"fine": 1, "two": 1, "dropped": 1}

        # A third run has nothing left to do.
        content, hits = out.read_bytes(), gate.image_hits()
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert (server.request_count, gate.image_hits()) == (3, hits)
        assert out.read_bytes() == content
    assert sorted(p.name for p in images.iterdir()) == [
        "dropped-1.png",
        "fine-1.png",
        "two-1.png",
        "two-2.png",
    ]


def _assert_first_run_records(first: dict[str, Any], images: Path, gate: Any) -> None:
    """What the first run records: two downloads failed (a 404, a dropped line), one ok."""
    two = first["two"]
    assert (two["ok"], two["error"]["type"]) == (False, "DownloadError")
    assert two["error"]["message"] == "1 of 2 images not saved: image 2: HTTP 404"
    assert two["download_error"] == "image 2: HTTP 404"
    assert two["files"] == [str(images / "two-1.png"), None]
    assert len(two["urls"]) == 2
    assert two["pending_downloads"] == [{"image": 2, "url": two["urls"][1], "error": "HTTP 404"}]
    dropped = first["dropped"]
    assert dropped["ok"] is False
    assert dropped["files"] == [None]
    assert "(after 3 attempts)" in dropped["download_error"]
    assert gate.hits["dropped", 1] >= 3  # retried (aiohttp itself may repeat a dropped GET)
    assert first["fine"]["ok"] is True
    assert first["fine"]["error"] is None
    assert first["fine"]["pending_downloads"] == []


def _assert_rerun_saved(second: dict[str, Any], two: dict[str, Any], images: Path) -> None:
    """The rerun saved the missing images under the recorded URLs and lines."""
    assert second["two"]["ok"] is True
    assert second["two"]["error"] is None
    assert second["two"]["pending_downloads"] == []
    assert second["two"]["download_error"] is None
    assert second["two"]["urls"] == two["urls"]
    assert second["two"]["line"] == 1
    assert second["two"]["files"] == [str(images / "two-1.png"), str(images / "two-2.png")]
    assert saved(second["two"]["files"]) == [b"\x89PNG"] * 2
    assert saved(second["dropped"]["files"]) == [b"\x89PNG"]


@pytest.mark.anyio
async def test_downloads_failing_again_stay_pending_and_never_regenerate(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"id": "j", "model": "m", "prompt": "p", "n": 3})
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate() as (gate, server):
        gate.policy = lambda prompt, k: "ok" if k == 1 else "500"
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 1
        gate.policy = lambda prompt, k: "ok" if k <= 2 else "404"
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 1
        record = latest(out)["j"]
        assert record["files"] == [str(images / "j-1.png"), str(images / "j-2.png"), None]
        assert [entry["image"] for entry in record["pending_downloads"]] == [3]
        assert record["error"]["message"] == "1 of 3 images not saved: image 3: HTTP 404"
        gate.policy = serve_all
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert server.request_count == 1
    assert ok_lines(out) == {"j": 1}
    assert latest(out)["j"]["files"] == [str(images / f"j-{k}.png") for k in (1, 2, 3)]


@pytest.mark.anyio
async def test_a_rerun_without_download_neither_resends_nor_calls_it_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"id": "j", "model": "m", "prompt": "p"})
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate() as (gate, server):
        gate.policy = lambda prompt, k: "404"
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 1
        content = out.read_bytes()
        capsys.readouterr()
        assert await cli(*run_args(jobs, out, gate)) == 1
        assert server.request_count == 1
        assert out.read_bytes() == content
        assert "rerun with --download DIR to save them" in capsys.readouterr().err


@pytest.mark.anyio
async def test_skip_invalid_never_records_a_bad_line_over_a_generated_job(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"id": "j", "model": "m", "prompt": "p"})
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate() as (gate, server):
        gate.policy = lambda prompt, k: "404"
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 1
        # The same id again, now on a bad line (a duplicate): the job is still repaired.
        with jobs.open("ab") as file:
            file.write(orjson.dumps({"id": "j", "model": "m", "prompt": "other"}) + b"\n")
        gate.policy = serve_all
        argv = run_args(jobs, out, gate, "--download", str(images), "--skip-invalid")
        assert await cli(*argv) == 1  # the bad line itself counts as failed
        assert server.request_count == 1
    assert latest(out)["j"]["ok"] is True
    assert ok_lines(out) == {"j": 1}


@pytest.mark.anyio
async def test_b64_json_images_are_saved_at_once(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "inline", "model": "m", "prompt": "p", "n": 2, "response_format": "b64_json"},
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate() as (gate, _server):
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
    [record] = read_records(out)  # no pending line first: nothing was left to fetch
    assert record["ok"] is True
    assert record["urls"] == []
    assert saved(record["files"]) == [b"\x89PNG"] * 2


# -- interrupted while downloading: nothing generated is lost -------------------------------


def cli_env(gate: ImageGate) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
    return {**env, "NEBULA_TOKEN": "mock-token", "NEBULA_BASE_URL": gate.base_url}


def pending_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(
        1
        for line in path.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n") and orjson.loads(line).get("pending_downloads")
    )


@pytest.mark.anyio
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
async def test_stopped_while_downloading_then_a_rerun_saves_without_regenerating(
    tmp_path: Path, stop: signal.Signals
) -> None:
    count = 4
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        *({"id": f"j{i}", "model": "m", "prompt": f"p{i}"} for i in range(count)),
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    argv = [*CLI, "run", str(jobs), "--out", str(out), "--download", str(images)]
    async with image_gate() as (gate, server):
        gate.policy = lambda prompt, k: "hang"  # every image download hangs
        async with await anyio.open_process(argv, env=cli_env(gate)) as process:
            with anyio.fail_after(20):
                while pending_lines(out) < count and process.returncode is None:
                    await anyio.sleep(0.01)
            process.send_signal(stop)
            with anyio.fail_after(5):
                await process.wait()
        expected = 130 if stop == signal.SIGINT else -signal.SIGKILL
        assert process.returncode == expected
        assert server.request_count == count
        stopped = latest(out)
        # Recorded as waiting for their images, never as failures.
        assert all(not r["ok"] and r["pending"] for r in stopped.values())
        assert {r["error"] for r in stopped.values()} == {None}
        assert stopped["j0"]["pending_downloads"] == [
            {"image": 1, "url": stopped["j0"]["urls"][0], "error": "not downloaded yet"}
        ]

        gate.policy = serve_all
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert server.request_count == count  # nothing generated twice
    assert ok_lines(out) == {f"j{i}": 1 for i in range(count)}
    assert sorted(p.name for p in images.iterdir()) == [f"j{i}-1.png" for i in range(count)]


# -- the results file cannot be written: stop, show what was not recorded, exit 3 ------------

LIMITED_CLI = (
    "import resource, sys\n"
    "limit = int(sys.argv.pop(1))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "from nebula_async.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def complete_records(path: Path) -> set[str]:
    """Ids of the whole lines (the write that failed may have left a torn one)."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return {orjson.loads(line)["id"] for line in lines}


@pytest.mark.anyio
async def test_a_results_write_error_stops_the_run_with_exit_3(tmp_path: Path) -> None:
    count = 30
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        *({"id": f"j{i}", "model": "m", "prompt": f"p{i}"} for i in range(count)),
    )
    out = tmp_path / "out.jsonl"
    argv = ["run", str(jobs), "--out", str(out), "--concurrency", "1"]
    async with image_gate() as (gate, server):
        # The file may not grow past 1000 bytes (EFBIG, as a full disk gives ENOSPC).
        limited = [sys.executable, "-c", LIMITED_CLI, "1000", *argv]
        with anyio.fail_after(30):
            first = await anyio.run_process(limited, env=cli_env(gate), check=False)
        err = first.stderr.decode()
        assert first.returncode == 3, err
        assert "cannot write to" in err
        assert "the run stopped" in err
        [unrecorded] = [line for line in err.splitlines() if "was not recorded" in line]
        record = orjson.loads(unrecorded.split("was not recorded: ", 1)[1])
        assert record["ok"] is True
        assert len(record["urls"]) == 1
        assert server.request_count < count  # stopped, rather than sending the rest

        sent, recorded = server.request_count, complete_records(out)
        assert record["id"] not in recorded
        with anyio.fail_after(30):
            second = await anyio.run_process([*CLI, *argv], env=cli_env(gate), check=False)
        assert second.returncode == 0, second.stderr.decode()
        assert server.request_count == sent + count - len(recorded)  # the rest, once each
    assert ok_lines(out) == {f"j{i}": 1 for i in range(count)}


# -- bad places for the output: exit 2 before anything is sent -------------------------------


@pytest.mark.anyio
async def test_unusable_out_or_download_paths_exit_2_and_send_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    async with image_gate() as (gate, server):
        assert await cli(*run_args(jobs, tmp_path, gate)) == 2  # --out is a directory
        assert "--out is a directory" in capsys.readouterr().err
        out = tmp_path / "out.jsonl"
        assert await cli(*run_args(jobs, out, gate, "--download", str(a_file))) == 2
        assert "cannot create the --download directory" in capsys.readouterr().err
        nested = a_file / "images"
        assert await cli(*run_args(jobs, out, gate, "--download", str(nested))) == 2
        base = ["submit", "--model", "m", "--prompt", "p", "--base-url", gate.base_url]
        assert await cli(*base, "--download", str(a_file)) == 2
        assert server.request_count == 0
    assert not out.exists()


# -- submit --download -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_with_failed_downloads_exits_1_and_shows_the_urls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    async with image_gate() as (gate, _server):
        gate.policy = lambda prompt, k: "ok" if k == 1 else "404"
        base = ["submit", "--model", "m", "--prompt", "p", "--base-url", gate.base_url]
        assert await cli(*base, "--n", "2", "--download", str(images), "--json") == 1
        captured = capsys.readouterr()
        record = orjson.loads(captured.out)
        assert record["ok"] is False
        assert record["error"]["type"] == "DownloadError"
        assert record["files"] == [str(images / "submit-1.png"), None]
        assert record["pending_downloads"][0]["image"] == 2
        assert "download failed: image 2: HTTP 404" in captured.err
        assert record["urls"][1] in captured.err  # not lost

        gate.policy = serve_all
        assert await cli(*base, "--download", str(images), "--id", "s2") == 0
        assert capsys.readouterr().out.split() == [str(images / "s2-1.png")]


def test_help_lists_the_exit_codes() -> None:
    done = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert "3 results file not writable" in " ".join(done.stdout.split())


# -- a partly failed job: carried-over images keep their numbers, new ones follow ---------------


@pytest.mark.anyio
async def test_a_partly_failed_job_resumes_with_its_files_numbered_after_the_old_ones(
    tmp_path: Path,
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", {"id": "fan", "model": "m", "prompt": "fan", "n": 2, "images": 5}
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate(fault_script=[None, "http_500", None]) as (gate, server):
        args = run_args(
            jobs, out, gate, "--retries", "0", "--concurrency", "1", "--download", str(images)
        )
        assert await cli(*args) == 1
        first = latest(out)["fan"]
        assert (first["ok"], first["error"]["type"], len(first["urls"])) == (
            False,
            "ServerError",
            3,
        )
        assert first["files"] == [str(images / f"fan-{k}.png") for k in (1, 2, 3)]
        assert first["pending_downloads"] == []
        assert gate.image_hits() == 3
        old_bytes = contents(first["files"])
        # One saved image went missing since: it is fetched again from its recorded URL.
        remove(first["files"][1])

        server.requests.clear()
        gate.hits.clear()
        assert await cli(*args) == 0
        assert [r.field("n") for r in server.requests] == [2]  # only the 5 - 3 missing
        assert gate.image_hits() == 3  # fan-2 again, and the 2 new images
        second = latest(out)["fan"]
        assert (second["ok"], second["error"], second["resumed_urls"]) == (True, None, 3)
        assert second["urls"][:3] == first["urls"]
        assert len(set(second["urls"])) == 5
        assert second["files"] == [str(images / f"fan-{k}.png") for k in range(1, 6)]
        assert second["pending_downloads"] == []
        assert contents(second["files"][:3]) == old_bytes
        assert saved(second["files"]) == [b"\x89PNG"] * 5

        server.requests.clear()
        content, hits = out.read_bytes(), gate.image_hits()
        assert await cli(*args) == 0
        assert (server.requests, gate.image_hits()) == ([], hits)
        assert out.read_bytes() == content
    assert ok_lines(out) == {"fan": 1}
    assert sorted(p.name for p in images.iterdir()) == [f"fan-{k}.png" for k in range(1, 6)]


@pytest.mark.anyio
async def test_a_job_resumed_from_a_run_without_download_saves_all_its_images(
    tmp_path: Path,
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", {"id": "fan", "model": "m", "prompt": "fan", "n": 2, "images": 4}
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate(fault_script=["http_500", None]) as (gate, server):
        args = run_args(jobs, out, gate, "--retries", "0", "--concurrency", "1")
        assert await cli(*args) == 1
        first = latest(out)["fan"]
        assert len(first["urls"]) == 2
        server.requests.clear()
        # The new images fail to download: the line keeps every URL, pending from 3 on.
        gate.policy = lambda prompt, k: "ok" if k == 1 else "404"
        assert await cli(*args, "--download", str(images)) == 1
        assert [r.field("n") for r in server.requests] == [2]
        second = latest(out)["fan"]
        assert (second["ok"], second["error"]["type"], second["resumed_urls"]) == (
            False,
            "DownloadError",
            2,
        )
        assert second["urls"][:2] == first["urls"]
        assert second["files"][0] == str(images / "fan-1.png")
        assert [entry["image"] for entry in second["pending_downloads"]] == [2, 4]
        assert [entry["url"] for entry in second["pending_downloads"]] == [
            second["urls"][1],
            second["urls"][3],
        ]
        # The pending downloads are repaired as usual, without generating anything.
        gate.policy = serve_all
        assert await cli(*args, "--download", str(images)) == 0
        assert len(server.requests) == 1
        third = latest(out)["fan"]
        assert third["ok"] is True
        assert third["urls"] == second["urls"]
        assert third["files"] == [str(images / f"fan-{k}.png") for k in range(1, 5)]
    assert ok_lines(out) == {"fan": 1}


# -- answers never wait behind downloads; recorded images are fetched, never regenerated -----


@pytest.mark.anyio
async def test_sigkill_while_downloads_hang_loses_no_answer(tmp_path: Path) -> None:
    count = 100  # more than the download stage takes at once (64 jobs)
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        *({"id": f"j{i}", "model": "m", "prompt": f"p{i}"} for i in range(count)),
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    argv = [*CLI, "run", str(jobs), "--out", str(out), "--download", str(images)]
    async with image_gate() as (gate, server):
        gate.policy = lambda prompt, k: "hang"  # no download ever finishes
        async with await anyio.open_process([*argv, "--concurrency", "16"], env=cli_env(gate)) as (
            process
        ):
            with anyio.fail_after(20):
                # Every answer gets its line while all downloads hang.
                while pending_lines(out) < count and process.returncode is None:
                    await anyio.sleep(0.01)
            process.kill()
            with anyio.fail_after(5):
                await process.wait()
        assert server.request_count == count
        assert all(r["pending"] and r["error"] is None for r in latest(out).values())

        gate.policy = serve_all
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert server.request_count == count  # nothing generated twice
    assert ok_lines(out) == {f"j{i}": 1 for i in range(count)}
    assert len(list(images.iterdir())) == count


@pytest.mark.anyio
async def test_download_on_results_made_without_it_fetches_without_generating(
    tmp_path: Path,
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "a", "model": "m", "prompt": "a", "n": 2},
        {"id": "b", "model": "m", "prompt": "b"},
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate() as (gate, server):
        assert await cli(*run_args(jobs, out, gate)) == 0
        assert "files" not in latest(out)["a"]
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert server.request_count == 2  # fetched from the recorded URLs only
        now = latest(out)
        assert now["a"]["files"] == [str(images / "a-1.png"), str(images / "a-2.png")]
        assert saved(now["b"]["files"]) == [b"\x89PNG"]
        content = out.read_bytes()
        assert await cli(*run_args(jobs, out, gate, "--download", str(images))) == 0
        assert out.read_bytes() == content  # done: nothing left to fetch
    assert ok_lines(out) == {"a": 2, "b": 2}  # the line without files, then with them
