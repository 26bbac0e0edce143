"""The command line as a newcomer meets it (issue 13): stdin, the summary, messages in
CLI words, logging flags, and the client options reaching the wire.

Through the real entry point: ``main([...])`` in a worker thread, or
``python -m nebula_async.cli`` in a subprocess, against servers on loopback.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest
from aiohttp import web
from test_cli import CLI, cli, read_records, run_args, summary_rows, write_jobs
from test_cli_downloads import image_gate
from test_cli_downloads import run_args as gate_args

from nebula_async import RateLimit
from nebula_async._protocol import IMG2IMG_PATH
from nebula_async.cli import build_parser, main
from nebula_async.cli._main import _client_settings
from nebula_async.testing import MockNebulaServer
from nebula_async.testing._png import png_bytes

SECRET = "tok-9f8e7d6c5b4a-secret"
SUMMARY_KEYS = [
    "jobs",
    "ok",
    "ok_before",
    "failed",
    "not_attempted",
    "pending_downloads",
    "images",
    "attempts",
    "retries",
    "rate_limited",
    "latency_p50_s",
    "latency_p95_s",
    "elapsed_s",
    "results",
    "exit_code",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEBULA_TOKEN", SECRET)
    for name in ("NEBULA_USERNAME", "NEBULA_PASSWORD", "NEBULA_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def sub_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
    return {**env, "NEBULA_TOKEN": SECRET, **extra}


# -- 1. jobs from stdin, --out -, a directory ---------------------------------------------


@pytest.mark.anyio
async def test_jobs_from_stdin_resume_and_images_relative_to_the_cwd(tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes())
    lines = [
        {"id": "a", "model": "m", "prompt": "pa", "image": "in.png"},
        {"id": "b", "model": "m", "prompt": "pb"},
    ]
    stdin = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    async with MockNebulaServer(token=SECRET) as server:
        argv = [*CLI, "run", "-", "--out", "results.jsonl", "--base-url", server.base_url]
        first = await anyio.run_process(argv, input=stdin, cwd=tmp_path, env=sub_env(), check=False)
        assert first.returncode == 0, first.stderr.decode()
        assert server.request_count == 2
        [with_image] = [r for r in server.requests if r.field("prompt") == "pa"]
        assert with_image.field("image").startswith("data:image/png;base64,")
        # The same jobs again: every one is matched by id and fingerprint, none sent.
        again = await anyio.run_process(argv, input=stdin, cwd=tmp_path, env=sub_env(), check=False)
        assert again.returncode == 0, again.stderr.decode()
        assert server.request_count == 2
        # An edited job on stdin is generated again (its fingerprint changed).
        edited = stdin.replace(b'"pb"', b'"pb2"')
        third = await anyio.run_process(
            argv, input=edited, cwd=tmp_path, env=sub_env(), check=False
        )
        assert third.returncode == 0
        assert server.request_count == 3
    assert sorted(os.listdir(tmp_path)) == ["in.png", "results.jsonl"]  # no spool left behind
    records = read_records(tmp_path / "results.jsonl")
    assert [r["id"] for r in records] == ["a", "b", "b"]
    assert summary_rows(again.stderr.decode())["ok"] == "2 (2 done before)"


@pytest.mark.anyio
async def test_a_bad_line_on_stdin_is_named_as_stdin(tmp_path: Path) -> None:
    stdin = b'{"model": "m", "prompt": "p"}\n{"model": "m", "prompt": "p", "image": "nope.png"}\n'
    argv = [*CLI, "run", "-", "--out", "r.jsonl", "--base-url", "http://127.0.0.1:9"]
    done = await anyio.run_process(argv, input=stdin, cwd=tmp_path, env=sub_env(), check=False)
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "<stdin>: line 2: image: local file not found" in err
    assert str(tmp_path / "nope.png") in err  # resolved against the current directory
    assert "1 bad line; nothing was sent" in err


def test_out_dash_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    assert main(["run", "jobs.jsonl", "--out", "-", "--base-url", "http://127.0.0.1:9"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "--out - is not supported" in captured.err
    assert not (tmp_path / "-").exists()


def test_a_directory_as_jobs_file_or_out_is_named_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "o.jsonl")
    assert main(["run", str(tmp_path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"the jobs file is a directory: {tmp_path}" in err
    assert "not found" not in err
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p"})
    assert main(["run", str(jobs), "--out", str(tmp_path)]) == 2
    assert f"--out is a directory: {tmp_path}" in capsys.readouterr().err


# -- 2. the summary table and --summary-json -----------------------------------------------


@pytest.mark.anyio
async def test_summary_table_and_json_even_when_the_run_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "ok one", "n": 2},
        {"model": "m", "prompt": "bad", "n": 0},  # a bad line, recorded as failed
    )
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    async with MockNebulaServer(token=SECRET) as server:
        extra = ("--skip-invalid", "--summary-json", str(summary))
        assert await cli(*run_args(jobs, out, server, *extra)) == 1
    figures = orjson.loads(summary.read_bytes())
    assert list(figures) == SUMMARY_KEYS
    assert figures["jobs"] == 2
    assert (figures["ok"], figures["ok_before"], figures["failed"]) == (1, 0, 1)
    assert (figures["images"], figures["attempts"], figures["retries"]) == (2, 1, 0)
    assert (figures["rate_limited"], figures["not_attempted"], figures["exit_code"]) == (0, 0, 1)
    assert figures["results"] == str(out)
    assert 0 < figures["latency_p50_s"] <= figures["latency_p95_s"] < 5
    rows = summary_rows(capsys.readouterr().err)
    assert (rows["jobs"], rows["ok"], rows["failed"], rows["images"]) == ("2", "1", "1", "2")
    assert (rows["attempts"], rows["retries"], rows["429s"]) == ("1", "0", "0")
    assert rows["latency p50"].endswith(" s")
    assert rows["results"] == str(out)
    assert "not attempted" not in rows
    assert "pending downloads" not in rows


@pytest.mark.anyio
async def test_summary_json_to_stdout_counts_retries_and_429s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", *({"model": "m", "prompt": f"p{i}"} for i in range(6))
    )
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer(
        token=SECRET, faults={"http_429": 0.4}, retry_after=0.01, seed=3
    ) as server:
        extra = ("--summary-json", "-", "--retries", "8")
        assert await cli(*run_args(jobs, out, server, *extra)) == 0
        requests = server.request_count
        refused = sum(1 for r in server.requests if r.status == 429)
    captured = capsys.readouterr()
    figures = orjson.loads(captured.out)
    assert figures["attempts"] == requests
    assert figures["retries"] == requests - 6
    assert figures["rate_limited"] == refused > 0
    assert summary_rows(captured.err)["429s"] == str(refused)


# -- 3. messages in CLI words ----------------------------------------------------------------


def test_missing_credentials_name_the_variables_not_keyword_arguments(
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
    err = capsys.readouterr().err
    assert "set NEBULA_TOKEN (or NEBULA_USERNAME and NEBULA_PASSWORD)" in err
    assert "token=" not in err
    assert "pass " not in err
    monkeypatch.setenv("NEBULA_USERNAME", "someone")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "NEBULA_USERNAME is set but NEBULA_PASSWORD is not" in err
    assert "password=" not in err
    assert (
        main(["submit", "--model", "m", "--prompt", "p", "--base-url", "http://127.0.0.1:9"]) == 2
    )
    assert "NEBULA_PASSWORD is not" in capsys.readouterr().err


def test_invalid_utf8_names_one_line_and_no_surrogates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(
        b'{"model": "m", "prompt": "ok"}\n\n{"model": "m", "prompt": "caf\xe9"}\n{"model": "m" x}\n'
    )
    assert main(["run", str(jobs), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.splitlines()
    utf8 = next(line for line in err if "UTF-8" in line)
    where = "line 3: not valid UTF-8 (byte 0xe9 at column 30)"
    assert utf8 == f"nebula-async: {jobs}: {where}; save the jobs file as UTF-8"
    assert "surrogate" not in utf8
    bad_json = next(line for line in err if "invalid JSON" in line)
    assert bad_json.count("line") == 1
    assert "line 4:" in bad_json
    assert "2 bad lines; nothing was sent" in err[-1]


def test_demo_help_shows_a_plain_percent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "~5% faults" in out
    assert "%%" not in out


def test_counts_are_pluralised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p", "n": 0})
    assert main(["run", str(jobs), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "1 bad line;" in err
    assert "(s)" not in err


# -- 4. -v / --log-level ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_vv_logs_retries_one_line_each_and_never_the_token(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", *({"model": "m", "prompt": f"p{i}"} for i in range(4))
    )
    async with MockNebulaServer(token=SECRET, faults={"http_503": 0.5}, seed=1) as server:
        argv = [*CLI, *run_args(jobs, tmp_path / "o.jsonl", server, "-vv", "--retries", "10")]
        done = await anyio.run_process(argv, env=sub_env(), check=False)
        assert all(r.authorization == f"Bearer {SECRET}" for r in server.requests)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert SECRET not in err
    assert SECRET not in done.stdout.decode()
    logged = [line for line in err.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3}Z ", line)]
    assert any(re.match(r"\S+ DEBUG +retrying in \d", line) for line in logged), err
    # --log-level INFO: the same retries, not logged (they are DEBUG).
    async with MockNebulaServer(token=SECRET, faults={"http_503": 0.5}, seed=1) as server:
        argv = [*CLI, *run_args(jobs, tmp_path / "o2.jsonl", server, "--log-level", "info")]
        quiet = await anyio.run_process([*argv, "--retries", "10"], env=sub_env(), check=False)
        assert server.request_count > 4  # it did retry
    assert quiet.returncode == 0
    assert "DEBUG" not in quiet.stderr.decode()


def test_log_level_is_checked_and_on_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "demo", "submit", "mock-server"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "-v, --verbose" in out
        assert "--log-level LEVEL" in out
    assert main(["demo", "--log-level", "chatty"]) == 2
    assert "expected DEBUG, INFO, WARNING, ERROR or CRITICAL" in capsys.readouterr().err


# -- client options reach the client ---------------------------------------------------------


@asynccontextmanager
async def recording_api(status: int = 200) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A purpose-built API on loopback recording every request's headers (a proxy
    request arrives here too: aiohttp serves its absolute-form target)."""
    seen: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request)
        await request.read()
        if status != 200:
            return web.Response(status=status, text="boom")
        url = f"http://127.0.0.1:{port}/files/x.png"
        body = {"code": 200, "msg": "success", "data": {"images": [{"url": url}]}}
        return web.json_response(body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.mark.anyio
async def test_header_flags_arrive_on_every_request(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", {"model": "m", "prompt": "a"}, {"model": "m", "prompt": "b"}
    )
    async with recording_api() as (url, seen):
        extra = ["--header", "X-Gateway-Key=k1=v", "--header", "X-Team= ml "]
        argv = ["run", str(jobs), "--out", str(tmp_path / "o.jsonl"), "--base-url", url, *extra]
        assert await cli(*argv) == 0
    assert len(seen) == 2
    assert all(r.headers["X-Gateway-Key"] == "k1=v" for r in seen)
    assert all(r.headers["X-Team"] == " ml ".strip() for r in seen)
    assert main(["run", str(jobs), "--out", "o", "--header", "novalue"]) == 2


@pytest.mark.anyio
async def test_trust_env_sends_through_the_environments_proxy(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "a"})
    with socket.socket() as closed:  # a port nothing listens on: the API "behind" the proxy
        closed.bind(("127.0.0.1", 0))
        api = f"http://127.0.0.1:{closed.getsockname()[1]}"
    async with recording_api() as (proxy, seen):
        env = sub_env(HTTP_PROXY=proxy)
        base = [*CLI, "run", str(jobs), "--base-url", api, "--retries", "0", "--timeout", "5"]
        without = await anyio.run_process(
            [*base, "--out", str(tmp_path / "a.jsonl")], env=env, check=False
        )
        assert without.returncode == 1
        assert seen == []
        via = await anyio.run_process(
            [*base, "--out", str(tmp_path / "b.jsonl"), "--trust-env"], env=env, check=False
        )
        assert via.returncode == 0, via.stderr.decode()
    [request] = seen
    assert request.path == IMG2IMG_PATH
    # Addressed to the API, delivered to the proxy.
    assert request.headers["Host"] == api.removeprefix("http://")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("flag", "attempts"), [("--retry-ambiguous", 3), ("--no-retry-ambiguous", 1)]
)
async def test_retry_ambiguous_flags(tmp_path: Path, flag: str, attempts: int) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "a"})
    async with recording_api(status=500) as (url, seen):
        argv = ["run", str(jobs), "--out", str(tmp_path / "o.jsonl"), "--base-url", url]
        assert await cli(*argv, "--retries", "2", flag) == 1
    assert len(seen) == attempts


def test_rate_flags_build_the_limit_the_client_gets() -> None:
    parse = build_parser().parse_args
    settings = _client_settings(
        parse(["run", "j", "--out", "o", "--rate", "20", "--burst", "5", "--no-adaptive"])
    )
    assert settings.rate_limit() == RateLimit(20.0, burst=5, adaptive=False)
    default = _client_settings(parse(["run", "j", "--out", "o", "--rate", "20"]))
    assert default.rate_limit() == RateLimit(20.0, burst=1, adaptive=True)
    assert _client_settings(parse(["run", "j", "--out", "o"])).rate_limit() is None


def test_redis_needs_rate_and_limit_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "a"})
    args = [
        "run",
        str(jobs),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--redis",
        "redis://127.0.0.1:9/0",
    ]
    assert main(args) == 2
    assert "--redis needs --rate and --limit-key" in capsys.readouterr().err


def test_insecure_http_is_refused_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parse = build_parser().parse_args
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "a"})
    remote = [
        "run",
        str(jobs),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--base-url",
        "http://192.0.2.1",
    ]
    assert main(remote) == 2  # refused before anything is sent
    assert "http" in capsys.readouterr().err
    # Allowed: the client is built (nothing is sent here: no network in tests).
    _client_settings(parse([*remote, "--allow-insecure-http"])).make_client()


# -- 5. --download: waiting is pending, not failed -------------------------------------------


@pytest.mark.anyio
async def test_a_job_waiting_for_its_images_is_pending_never_failed_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "two", "model": "m", "prompt": "two", "n": 2},
        {"id": "fine", "model": "m", "prompt": "fine"},
    )
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with image_gate(token=SECRET) as (gate, _):
        gate.policy = lambda prompt, k: "404" if (prompt, k) == ("two", 2) else "ok"
        assert await cli(*gate_args(jobs, out, gate, "--download", str(images))) == 1
    for job_id in ("two", "fine"):
        lines = [r for r in read_records(out) if r["id"] == job_id]
        first, final = lines[0], lines[-1]
        assert len(lines) == 2
        assert (first["ok"], first["error"], first["pending"]) == (False, None, True)
        assert final["pending"] is False
    final_two = [r for r in read_records(out) if r["id"] == "two"][-1]
    assert final_two["error"]["type"] == "DownloadError"
    assert summary_rows(capsys.readouterr().err)["pending downloads"] == "1"


# -- 6. mock-server on a port in use --------------------------------------------------------


@pytest.mark.anyio
async def test_mock_server_on_a_busy_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with anyio.fail_after(20):
            done = await anyio.run_process(
                [*CLI, "mock-server", "--port", str(port)], env=sub_env(), check=False
            )
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"port {port}" in lines[0]
    assert "in use" in lines[0]
    assert "Traceback" not in done.stderr.decode()
