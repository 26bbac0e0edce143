"""``nebula-async run`` under SIGINT and SIGTERM, on a real subprocess against a
MockNebulaServer on loopback: the first signal drains (no new submissions, every
answer of those in flight written, exit 130 / 143), a second stops at once."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path

import anyio
import orjson
import pytest
from cli_helpers import complete_lines, read_records

from nebula_async.testing import MockNebulaServer

CLI = [sys.executable, "-m", "nebula_async.cli"]


def cli_env(server: MockNebulaServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
    return {**env, "NEBULA_TOKEN": "mock-token", "NEBULA_BASE_URL": server.base_url}


def write_jobs(path: Path, count: int) -> Path:
    lines = (orjson.dumps({"model": "m", "prompt": f"p{i}"}) + b"\n" for i in range(1, count + 1))
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.anyio
@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_first_signal_drains_and_every_answer_is_kept(
    tmp_path: Path, stop: signal.Signals, code: int
) -> None:
    count = 80
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", count), tmp_path / "out.jsonl"
    argv = [*CLI, "run", str(jobs), "--out", str(out), "--concurrency", "8"]
    async with MockNebulaServer(latency=0.4) as server:
        async with await anyio.open_process(argv, env=cli_env(server)) as process:
            with anyio.fail_after(20):
                while complete_lines(out) < 8 and process.returncode is None:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)  # mid-flight: 8 submissions waiting for their answers
            process.send_signal(stop)
            with anyio.fail_after(10):
                await process.wait()
            assert process.stderr is not None
            err = (await process.stderr.receive()).decode()
        assert process.returncode == code, err
        assert "no new submissions" in err
        assert "drained" in err
        # Every generation the server made is on disk, once; the run stopped early.
        sent = Counter(request.field("prompt") for request in server.requests)
        records = read_records(out)
        assert all(record["ok"] for record in records)
        assert Counter(f"p{record['id']}" for record in records) == sent
        assert 8 < len(records) < count

        # The rerun sends only the rest.
        with anyio.fail_after(30):
            rerun = await anyio.run_process(
                [*CLI, "run", str(jobs), "--out", str(out)], env=cli_env(server), check=False
            )
        assert rerun.returncode == 0, rerun.stderr.decode()
        sent = Counter(request.field("prompt") for request in server.requests)
        assert sent == {f"p{i}": 1 for i in range(1, count + 1)}


@pytest.mark.anyio
async def test_a_second_signal_stops_at_once_leaving_whole_lines(tmp_path: Path) -> None:
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", 20), tmp_path / "out.jsonl"
    argv = [*CLI, "run", str(jobs), "--out", str(out), "--concurrency", "4"]
    script = [None] * 4 + ["slow"] * 16  # four quick answers, then 30 s ones
    async with MockNebulaServer(latency=0.05, fault_script=script, slow_s=30.0) as server:
        async with await anyio.open_process(argv, env=cli_env(server)) as process:
            with anyio.fail_after(20):
                # Four lines written and four slow requests sent: a drain now waits.
                while (
                    complete_lines(out) < 4 or server.in_flight < 4
                ) and process.returncode is None:
                    await anyio.sleep(0.01)
            process.send_signal(signal.SIGINT)
            await anyio.sleep(0.3)
            assert process.returncode is None  # draining: waiting for 30 s answers
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(5):
                await process.wait()
            assert process.stderr is not None
            err = (await process.stderr.receive()).decode()
    assert process.returncode == 130
    assert "again: stopping now" in err
    assert out.read_bytes().endswith(b"\n")
    assert len(read_records(out)) == 4
