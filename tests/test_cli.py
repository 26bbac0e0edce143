"""The ``nebula-async`` command line, end to end against a real MockNebulaServer.

In-process runs call ``main([...])`` in a worker thread (it runs its own event
loop) while the server runs in the test's loop; crash and Ctrl-C behaviour is
tested on a real subprocess.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import orjson
import pytest
from cli_helpers import complete_lines, mock_credentials, prompts_sent, read_records  # noqa: F401 (an autouse fixture)

from nebula_async.cli import main
from nebula_async.cli._progress import JobProgress, progress_wanted
from nebula_async.cli._results import ResultWriter
from nebula_async.testing import MockNebulaServer
from nebula_async.testing._png import png_bytes

RECORD_KEYS = [
    "id",
    "line",
    "ok",
    "urls",
    "error",
    "attempts",
    "submissions",
    "elapsed_s",
    "fingerprint",
]
CLI = [sys.executable, "-m", "nebula_async.cli"]


def write_jobs(path: Path, *lines: object) -> Path:
    text = [line if isinstance(line, str) else orjson.dumps(line).decode() for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in records}  # the latest line per id wins


async def cli(*argv: str) -> int:
    """``main(argv)`` in a worker thread: it runs its own event loop."""
    return await anyio.to_thread.run_sync(main, list(argv))


def summary_rows(err: str) -> dict[str, str]:
    """The end-of-run summary table's rows (``  name   value``) found in ``err``."""
    names = "jobs|ok|failed|not attempted|pending downloads|images|attempts|retries|429s"
    names += "|latency p50|latency p95|elapsed|results"
    found = re.findall(rf"^  ({names})  +(.*)$", err, flags=re.MULTILINE)
    return dict(found)


def run_args(jobs: Path, out: Path, server: MockNebulaServer, *extra: str) -> list[str]:
    return ["run", str(jobs), "--out", str(out), "--base-url", server.base_url, *extra]


# -- run: the happy path -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["dotted", "nested", "flat"])
async def test_run_all_ok(
    tmp_path: Path, style: Literal["dotted", "nested", "flat"], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes(4, 4))
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "p1", "n": 2},
        {"model": "m", "prompt": "p2", "responseFormat": "url", "id": "custom"},
        "",
        {"model": "m", "prompt": "p4", "n": 2, "images": 5},
        {"model": "m", "prompt": "p5", "image": "in.png", "size": "1K"},
    )
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer(payload_style=style) as server:
        code = await cli(
            *run_args(jobs, out, server, "--payload-style", style, "--concurrency", "4")
        )
        assert code == 0
        assert server.request_count == 6  # 1 + 1 + 3 (5 images, 2 per submission) + 1
        [with_image] = [r for r in server.requests if r.field("prompt") == "p5"]
        assert with_image.field("image").startswith("data:image/png;base64,")
    records = read_records(out)
    assert all(list(record) == RECORD_KEYS for record in records)
    results = by_id(records)
    assert sorted(results) == ["1", "4", "5", "custom"]
    assert all(r["ok"] and r["error"] is None for r in records)
    assert len(results["1"]["urls"]) == 2
    assert (len(results["4"]["urls"]), results["4"]["submissions"]) == (5, 3)
    assert results["4"]["line"] == 4
    rows = summary_rows(capsys.readouterr().err)
    assert (rows["jobs"], rows["ok"], rows["failed"], rows["images"]) == ("4", "4", "0", "9")
    assert (rows["attempts"], rows["results"]) == ("6", str(out))


@pytest.mark.anyio
async def test_retries_flag_counts_retries_after_the_first_attempt(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    async with MockNebulaServer(fault_script=["http_500", "http_500"]) as server:
        out = tmp_path / "ok.jsonl"
        assert await cli(*run_args(jobs, out, server, "--retries", "2")) == 0
        assert read_records(out)[0]["attempts"] == 3
        server.fault_script = ["http_500", "http_500"]
        out = tmp_path / "failed.jsonl"
        assert await cli(*run_args(jobs, out, server, "--retries", "1")) == 1
        [record] = read_records(out)
    assert record["attempts"] == 2
    assert record["ok"] is False


# -- run: failures, then resume -------------------------------------------------------------


@pytest.mark.anyio
async def test_failures_exit_1_and_a_rerun_retries_only_them(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", *({"model": "m", "prompt": f"p{i}"} for i in range(1, 5))
    )
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer(fault_script=["body_400"]) as server:
        assert await cli(*run_args(jobs, out, server)) == 1
        first = read_records(out)
        [failed] = [r for r in first if not r["ok"]]
        assert failed["error"] == {
            "type": "BadRequestError",
            "message": failed["error"]["message"],
            "status_code": 200,
            "code": 400,
            "field": None,
        }
        assert failed["urls"] == []
        failed_prompt = f"p{failed['id']}"

        assert await cli(*run_args(jobs, out, server)) == 0
        sent = prompts_sent(server)
    assert sent == {f"p{i}": 2 if f"p{i}" == failed_prompt else 1 for i in range(1, 5)}
    records = read_records(out)
    assert len(records) == 5  # the retried job got a second line, which wins
    assert all(r["ok"] for r in by_id(records).values())
    assert sum(r["ok"] for r in records) == 4


@pytest.mark.anyio
async def test_corrupt_results_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "9", "ok": true}\nnot json\n{"id": "8", "ok": true}\n')
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs, out, server)) == 2
        assert server.request_count == 0
    assert "line 2" in capsys.readouterr().err


@pytest.mark.anyio
async def test_a_results_file_in_use_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer() as server:
        with ResultWriter(out):  # as another run holds it
            assert await cli(*run_args(jobs, out, server)) == 2
        assert server.request_count == 0
    assert "in use by another nebula-async run" in capsys.readouterr().err


# -- run: bad input -------------------------------------------------------------------------

BAD_FILE = (
    {"model": "m", "prompt": "good-1"},
    {"model": "m", "prompt": "good-2", "id": "dup"},
    {"model": "m", "prompt": "p", "n": 99},
    "",
    "{oops",
    {"model": "m", "prompt": "p", "image": "no-such-file.png"},
    {"model": "m", "prompt": "p", "id": "dup"},
    {"model": "m", "prompt": "good-8"},
)


@pytest.mark.anyio
async def test_bad_lines_exit_2_naming_them_and_nothing_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", *BAD_FILE)
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs, out, server)) == 2
        assert server.request_count == 0
    assert not out.exists()
    err = capsys.readouterr().err
    assert "line 3: n: must be an integer from 1 to 15" in err
    assert "line 5: invalid JSON" in err
    assert "line 6: image: local file not found" in err
    assert "line 7: id: duplicate id 'dup' (first used on line 2)" in err
    assert "4 bad lines; nothing was sent" in err


@pytest.mark.anyio
async def test_skip_invalid_records_bad_lines_and_runs_the_rest(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", *BAD_FILE)
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs, out, server, "--skip-invalid")) == 1
        assert sorted(prompts_sent(server)) == ["good-1", "good-2", "good-8"]
    results = by_id(read_records(out))
    assert results["dup"]["ok"] is True  # the duplicate line never overrides the first
    assert results["1"]["ok"]
    assert results["8"]["ok"]
    for job_id, line, field in (("3", 3, "n"), ("5", 5, None), ("6", 6, "image")):
        record = results[job_id]
        assert (record["ok"], record["line"], record["attempts"]) == (False, line, 0)
        assert record["error"]["type"] == "ValidationError"
        assert record["error"]["field"] == field
        assert record["error"]["message"].startswith(f"line {line}: ")


@pytest.mark.anyio
async def test_b64_json_without_download_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p", "response_format": "b64_json"}
    )
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs, tmp_path / "out.jsonl", server)) == 2
    assert "line 1: response_format: b64_json images need --download" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    out = str(tmp_path / "out.jsonl")
    assert main([]) == 2
    assert main(["run", str(jobs)]) == 2  # no --out
    assert main(["run", str(jobs), "--out", out, "--retries", "-1"]) == 2
    assert main(["run", str(jobs), "--out", out, "--concurrency", "0"]) == 2
    assert main(["run", str(jobs), "--out", out, "--rate", "abc"]) == 2
    assert main(["run", str(tmp_path / "missing.jsonl"), "--out", out]) == 2
    assert main(["run", str(jobs), "--out", str(tmp_path / "no-dir" / "o.jsonl")]) == 2
    assert main(["--version"]) == 0
    assert "jobs file not found" in capsys.readouterr().err


def test_missing_credentials_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NEBULA_TOKEN")
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    args = [
        "run",
        str(jobs),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--base-url",
        "http://127.0.0.1:9",
    ]
    assert main(args) == 2
    assert "NEBULA_TOKEN" in capsys.readouterr().err


# -- run --download -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_download_writes_files_with_safe_names_atomically(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "p1", "id": "plain", "n": 2},
        {"model": "m", "prompt": "p2", "id": "../x"},
        {"model": "m", "prompt": "p3", "id": "a/b"},
        {"model": "m", "prompt": "p4", "id": "inline", "response_format": "b64_json"},
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs, out, server, "--download", str(images))) == 0
    results = by_id(read_records(out))
    assert results["plain"]["files"] == [str(images / "plain-1.png"), str(images / "plain-2.png")]
    assert results["inline"]["urls"] == []
    assert results["inline"]["files"] == [str(images / "inline-1.png")]
    check_downloads(results, images)
    assert listing(tmp_path) == ["images", "jobs.jsonl", "out.jsonl"]  # nothing escaped


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def check_downloads(results: dict[str, dict[str, Any]], images: Path) -> None:
    for record in results.values():
        assert record["download_error"] is None
        for file in record["files"]:
            path = Path(file)
            assert path.parent == images
            assert path.read_bytes().startswith(b"\x89PNG")
    names = listing(images)
    assert len(names) == 5
    assert not [n for n in names if n.endswith(".part") or n.startswith(".")]  # atomic writes


# -- submit ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_prints_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes(2, 2))
    async with MockNebulaServer() as server:
        base = ["submit", "--model", "m", "--base-url", server.base_url]
        assert await cli(*base, "--prompt", "hello", "--n", "2", "--images", "3") == 0
        urls = capsys.readouterr().out.split()
        assert len(urls) == 3
        assert all(url.startswith(server.base_url + "/files/") for url in urls)

        image = str(tmp_path / "in.png")
        assert await cli(*base, "--prompt", "json", "--image", image, "--json") == 0
        record = orjson.loads(capsys.readouterr().out)
        assert record["ok"] is True
        assert len(record["urls"]) == 1
        assert server.requests[-1].field("image").startswith("data:image/png;base64,")

        server.fault_script = ["body_403"]
        assert await cli(*base, "--prompt", "refused", "--retries", "0") == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "AuthenticationError" in captured.err

        assert await cli(*base, "--prompt", "p", "--n", "99") == 2
        assert await cli(*base, "--prompt", "p", "--response-format", "b64_json") == 2
        assert "n: must be an integer from 1 to 15" in capsys.readouterr().err


# -- demo -----------------------------------------------------------------------------------


def test_demo_runs_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.jsonl"
    assert (
        main(["demo", "--jobs", "15", "--concurrency", "16", "--out", str(out), "--no-progress"])
        == 0
    )
    table = capsys.readouterr().out
    for row in ("jobs", "ok", "failed", "images", "attempts", "retries", "429s",
                "throughput", "latency p50", "latency p95", "elapsed"):  # fmt: skip
        assert f"  {row} " in table
    records = read_records(out)
    assert len(records) == 15
    assert all(r["ok"] for r in records)
    assert any(r["submissions"] > 1 for r in records)  # some jobs were fanned out


def test_demo_with_an_unwritable_out_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-dir" / "demo.jsonl"
    args = ["demo", "--jobs", "3", "--no-progress", "--out"]
    assert main([*args, str(missing)]) == 2
    assert "cannot write" in capsys.readouterr().err
    # A disk that fills up mid-run: the results cannot be recorded (exit 3, no traceback).
    assert main([*args, "/dev/full"]) == 3
    assert "cannot write to /dev/full" in capsys.readouterr().err


# -- progress -------------------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert progress_wanted(disabled_by_user=False) is False  # captured stderr is no terminal
    with JobProgress(3, enabled=True) as progress:
        progress.job_finished(ok=True, images=2)
        progress.job_finished(ok=False, images=0, rate_limited=1)
        progress.job_finished(ok=True, images=1)
    err = capsys.readouterr().err
    assert "3/3" in err
    assert "failed=1" in err
    assert "images=3" in err
    with JobProgress(3, enabled=False) as progress:
        progress.job_finished(ok=True, images=1)
    assert capsys.readouterr().err == ""


# -- crashes and interrupts (real subprocesses) ---------------------------------------------


def cli_env(server: MockNebulaServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
    return {**env, "NEBULA_TOKEN": "mock-token", "NEBULA_BASE_URL": server.base_url}


async def run_to_end(
    argv: Sequence[str], env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(30):
        return await anyio.run_process([*CLI, *argv], env=env, check=False)


@pytest.mark.anyio
async def test_sigkill_then_resume_sends_every_job_once_until_ok(tmp_path: Path) -> None:
    count = 60
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        *({"model": "m", "prompt": f"prompt-{i}"} for i in range(1, count + 1)),
    )
    out = tmp_path / "out.jsonl"
    argv = ["run", str(jobs), "--out", str(out), "--concurrency", "2"]
    async with MockNebulaServer(latency=0.05) as server:
        env = cli_env(server)
        async with await anyio.open_process([*CLI, *argv], env=env) as process:
            with anyio.fail_after(20):
                while complete_lines(out) < 5 and process.returncode is None:
                    await anyio.sleep(0.01)
            process.kill()  # SIGKILL: no cleanup at all
            with anyio.fail_after(10):
                await process.wait()
        assert process.returncode == -signal.SIGKILL
        await anyio.sleep(0.2)  # let the server record whatever was already on the wire
        ok_before = {r["id"] for r in read_records_tolerant(out) if r["ok"]}
        assert 5 <= len(ok_before) < count
        sent_before = prompts_sent(server)
        with out.open("ab") as file:  # and a torn line, as a crash mid-write leaves
            file.write(b'{"id": "7", "ok": tr')

        second = await run_to_end(argv, env)
        assert second.returncode == 0, second.stderr.decode()
        sent_after = prompts_sent(server)
        for job_id in ok_before:  # jobs already ok were not sent again
            assert sent_after[f"prompt-{job_id}"] == sent_before[f"prompt-{job_id}"]
        records = read_records(out)  # every line parses: the torn one was cut
        ok_lines = Counter(r["id"] for r in records if r["ok"])
        assert ok_lines == {str(i): 1 for i in range(1, count + 1)}

        requests, content = server.request_count, out.read_bytes()
        third = await run_to_end(argv, env)
        assert third.returncode == 0, third.stderr.decode()
        assert server.request_count == requests  # nothing left to send
        assert out.read_bytes() == content


def read_records_tolerant(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a torn line from the kill
    return records


@pytest.mark.anyio
async def test_ctrl_c_stops_promptly_with_results_on_disk(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", *({"model": "m", "prompt": f"p{i}"} for i in range(40))
    )
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer(latency=0.1) as server:
        argv = [*CLI, "run", str(jobs), "--out", str(out), "--concurrency", "1"]
        async with await anyio.open_process(argv, env=cli_env(server)) as process:
            with anyio.fail_after(20):
                while complete_lines(out) < 2 and process.returncode is None:
                    await anyio.sleep(0.01)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(5):  # promptly (the work left would take ~4 s)
                await process.wait()
            assert process.stderr is not None
            err = (await process.stderr.receive()).decode()
    assert process.returncode == 130
    assert "interrupted" in err
    records = read_records(out)
    assert 2 <= len(records) < 40
    assert all(r["ok"] for r in records)


@pytest.mark.anyio
async def test_mock_server_subcommand_listens_and_stops_on_sigint() -> None:
    argv = [*CLI, "mock-server", "--port", "0", "--latency", "0.05"]
    async with await anyio.open_process(argv) as process:
        assert process.stdout is not None
        with anyio.fail_after(15):
            line = (await process.stdout.receive()).decode()
        assert line.startswith("nebula mock server listening on http://127.0.0.1:")
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            await process.wait()
    assert process.returncode == 0


# -- run: a partly failed job is resumed for its missing images only -------------------------


@pytest.mark.anyio
async def test_a_partly_failed_job_is_sent_again_only_for_its_missing_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "fan", "model": "m", "prompt": "fan", "n": 2, "images": 5},  # 2 + 2 + 1
        {"id": "whole", "model": "m", "prompt": "whole", "n": 2, "images": 4},  # 2 + 2
    )
    out = tmp_path / "out.jsonl"
    # One request at a time; the two jobs' submissions take turns for the one slot
    # (fan, whole, fan, whole, fan), so the script hits known submissions: fan's 2nd
    # fails for good, and both of whole's fail (it keeps no URL, so it is sent again whole).
    async with MockNebulaServer(fault_script=[None, "http_500", "http_500", "http_500", None]) as (
        server
    ):
        args = run_args(jobs, out, server, "--retries", "0", "--concurrency", "1")
        assert await cli(*args) == 1
        assert [r.field("prompt") for r in server.requests] == ["fan", "whole"] * 2 + ["fan"]
        assert [r.field("n") for r in server.requests] == [2, 2, 2, 2, 1]
        first = by_id(read_records(out))
        fan = first["fan"]
        assert (fan["ok"], fan["error"]["type"], len(fan["urls"])) == (False, "ServerError", 3)
        assert "resumed_urls" not in fan
        assert first["whole"]["urls"] == []
        capsys.readouterr()

        # The rerun asks only for fan's 5 - 3 = 2 missing images, and all 4 of whole's.
        server.requests.clear()
        assert await cli(*args) == 0
        assert Counter(r.field("prompt") for r in server.requests) == {"fan": 1, "whole": 2}
        assert sum(r.field("n") for r in server.requests if r.field("prompt") == "fan") == 2
        second = by_id(read_records(out))
        fan_now = second["fan"]
        assert (fan_now["ok"], fan_now["error"], fan_now["resumed_urls"]) == (True, None, 3)
        assert len(fan_now["urls"]) == 5
        assert fan_now["urls"][:3] == fan["urls"]  # the old URLs first, then the new ones
        assert len(set(fan_now["urls"])) == 5
        assert (fan_now["line"], fan_now["submissions"]) == (1, 1)
        assert list(fan_now)[: len(RECORD_KEYS)] == RECORD_KEYS
        assert "resumed_urls" not in second["whole"]
        assert len(second["whole"]["urls"]) == 4
        rows = summary_rows(capsys.readouterr().err)
        assert (rows["jobs"], rows["ok"], rows["failed"]) == ("2", "2", "0")

        # A third run sends nothing and writes nothing.
        server.requests.clear()
        content = out.read_bytes()
        assert await cli(*args) == 0
        assert server.requests == []
        assert out.read_bytes() == content
    assert Counter(r["id"] for r in read_records(out) if r["ok"]) == {"fan": 1, "whole": 1}


@pytest.mark.anyio
async def test_a_resumed_job_failing_again_keeps_every_url_so_far(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", {"id": "j", "model": "m", "prompt": "p", "n": 1, "images": 4}
    )
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer(fault_script=[None, "body_400", "body_400", None]) as server:
        args = run_args(jobs, out, server, "--retries", "0", "--concurrency", "1")
        assert await cli(*args) == 1  # images 1 and 4 made, 2 and 3 not
        first = read_records(out)[-1]
        assert (first["ok"], len(first["urls"])) == (False, 2)
        # A torn last line (a crash while writing) is cut; the job resumes from the one before.
        with out.open("ab") as file:
            file.write(b'{"id": "j", "ok": tr')
        server.fault_script = ["body_400", None]
        server.requests.clear()
        assert await cli(*args) == 1  # one more image made
        assert [r.field("n") for r in server.requests] == [1, 1]
        second = read_records(out)[-1]
        assert (second["ok"], second["resumed_urls"]) == (False, 2)
        assert second["error"]["type"] == "BadRequestError"
        assert second["urls"][:2] == first["urls"]
        assert len(second["urls"]) == 3
        server.requests.clear()
        assert await cli(*args) == 0
        assert [r.field("n") for r in server.requests] == [1]
        third = read_records(out)[-1]
        assert (third["ok"], third["resumed_urls"], third["urls"][:3]) == (True, 3, second["urls"])
        assert len(set(third["urls"])) == 4
    assert [r["ok"] for r in read_records(out)] == [False, False, True]
