"""Resume that knows the job: fingerprints, moved and edited jobs, a results file of
another jobs file, ``--shard``, and bad input refused by line, through ``main()``
against a real MockNebulaServer on loopback."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from cli_helpers import mock_credentials, prompts_sent, read_records  # noqa: F401 (an autouse fixture)

import nebula_async as na
from nebula_async._jobs import job_fingerprint, job_from_mapping, shard_of
from nebula_async.cli import main
from nebula_async.cli._jobfile import JobLine, iter_job_lines
from nebula_async.testing import MockNebulaServer
from nebula_async.testing._png import png_bytes


def write_jobs(path: Path, *lines: object) -> Path:
    text = [line if isinstance(line, str) else orjson.dumps(line).decode() for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def latest(path: Path) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in read_records(path)}


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


def run_args(jobs: Path, out: Path, server: MockNebulaServer, *extra: str) -> list[str]:
    return ["run", str(jobs), "--out", str(out), "--base-url", server.base_url, *extra]


def heads(files: list[str]) -> list[bytes]:
    return [Path(file).read_bytes()[:4] for file in files]


def fingerprints_of(path: Path) -> dict[str, str]:
    return {
        line.job_id: line.fingerprint
        for line in iter_job_lines(path, load_images=False)
        if isinstance(line, JobLine)
    }


# -- the fingerprint ---------------------------------------------------------------------


def test_the_fingerprint_ignores_key_style_and_defaults_but_not_content(tmp_path: Path) -> None:
    def fingerprint(fields: dict[str, Any]) -> str:
        return job_fingerprint(job_from_mapping(fields, default_id="1"))

    snake = {"model": "m", "prompt": "p", "response_format": "url", "n": 2}
    same = [
        {"model": "m", "prompt": "p", "responseFormat": "url", "n": 2},
        {"batchImageGenerationDTO.model": "m", "batchImageGenerationDTO.prompt": "p",
         "batchImageGenerationDTO.responseFormat": "url", "batchImageGenerationDTO.n": 2},
        {"batchImageGenerationDTO": {"model": "m", "prompt": "p", "responseFormat": "url",
                                     "n": 2}},
        {**snake, "images": 2, "size": "2048x2048", "id": "another id"},
    ]  # fmt: skip
    assert {fingerprint(fields) for fields in same} == {fingerprint(snake)}
    different = [
        {**snake, "prompt": "q"},
        {**snake, "images": 3},
        {**snake, "n": 1},
        {**snake, "image": "https://example.com/a.png"},
    ]
    assert len({fingerprint(fields) for fields in [snake, *different]}) == 5
    assert len(fingerprint(snake)) == 32


def test_a_local_image_and_the_data_uri_of_its_content_agree(tmp_path: Path) -> None:
    content = png_bytes(5, 3)
    (tmp_path / "in.png").write_bytes(content)
    uri = "data:image/png;base64," + base64.b64encode(content).decode()
    other = "data:image/png;base64," + base64.b64encode(png_bytes(3, 5)).decode()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "file", "model": "m", "prompt": "p", "image": "in.png"},
        {"id": "uri", "model": "m", "prompt": "p", "image": uri},
        {"id": "other", "model": "m", "prompt": "p", "image": other},
    )
    checked = fingerprints_of(jobs)  # the checking pass hashes the file, never encodes it
    assert checked["file"] == checked["uri"] != checked["other"]
    sent = {
        line.job_id: line.fingerprint
        for line in iter_job_lines(jobs, load_images=True)
        if isinstance(line, JobLine)
    }
    assert sent == checked
    assert (
        job_fingerprint(na.Job(na.Img2ImgRequest(model="m", prompt="p", image=uri)))
        == (checked["uri"])
    )


def test_shards_split_ids_stably() -> None:
    ids = [str(i) for i in range(1, 401)]
    shards = Counter(shard_of(job_id, 4) for job_id in ids)
    assert set(shards) == {0, 1, 2, 3}
    assert min(shards.values()) > 60  # roughly even
    assert [shard_of("job-1", 4), shard_of("1", 3)] == [shard_of("job-1", 4), shard_of("1", 3)]
    assert shard_of("a", 1) == 0


# -- resume by id and fingerprint ----------------------------------------------------------


@pytest.mark.anyio
async def test_insert_at_the_top_and_edit_one_generates_just_those_two(tmp_path: Path) -> None:
    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    original = [{"model": "m", "prompt": f"prompt-{i}"} for i in range(1, 31)]  # default ids
    write_jobs(jobs_path, *original)
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs_path, out, server)) == 0
        assert server.request_count == 30

        edited = [dict(job) for job in original]
        edited[9]["prompt"] = "prompt-10-edited"
        write_jobs(jobs_path, {"model": "m", "prompt": "inserted"}, *edited)
        server.requests.clear()
        assert await cli(*run_args(jobs_path, out, server)) == 0
        # Only the inserted and the edited job are generated; nothing twice.
        assert prompts_sent(server) == {"inserted": 1, "prompt-10-edited": 1}

        # Every current job has a latest ok line with its own id and fingerprint.
        records = latest(out)
        for job_id, fingerprint in fingerprints_of(jobs_path).items():
            assert records[job_id]["ok"] is True
            assert records[job_id]["fingerprint"] == fingerprint
        assert records["1"]["line"] == 1
        assert records["2"]["moved_from"] == "1"  # prompt-1, now on line 2
        assert records["2"]["line"] == 2

        # A third run has nothing to do.
        server.requests.clear()
        content = out.read_bytes()
        assert await cli(*run_args(jobs_path, out, server)) == 0
        assert server.requests == []
        assert out.read_bytes() == content


@pytest.mark.anyio
async def test_an_edited_job_with_its_own_id_is_generated_again(tmp_path: Path) -> None:
    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    write_jobs(
        jobs_path,
        {"id": "fox", "model": "m", "prompt": "a fox"},
        {"id": "owl", "model": "m", "prompt": "an owl"},
    )
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs_path, out, server)) == 0
        old = latest(out)["fox"]
        write_jobs(
            jobs_path,
            {"id": "fox", "model": "m", "prompt": "a red fox"},
            {"id": "owl", "model": "m", "prompt": "an owl"},
        )
        server.requests.clear()
        assert await cli(*run_args(jobs_path, out, server)) == 0
        assert prompts_sent(server) == {"a red fox": 1}
    fox = latest(out)["fox"]  # the new line supersedes the old one
    assert fox["ok"]
    assert fox["fingerprint"] != old["fingerprint"]
    assert fox["urls"] != old["urls"]


@pytest.mark.anyio
async def test_a_results_file_of_another_jobs_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    out = tmp_path / "out.jsonl"
    write_jobs(first, *({"model": "m", "prompt": f"first-{i}"} for i in range(5)))
    write_jobs(second, *({"model": "m", "prompt": f"second-{i}"} for i in range(5)))
    async with MockNebulaServer() as server:
        assert await cli(*run_args(first, out, server)) == 0
        server.requests.clear()
        content = out.read_bytes()
        capsys.readouterr()
        assert await cli(*run_args(second, out, server)) == 2
        err = capsys.readouterr().err
        assert "line 1: id '1' is recorded" in err
        assert "another jobs file" in err
        assert "--replace-mismatched" in err
        assert server.requests == []
        assert out.read_bytes() == content

        assert await cli(*run_args(second, out, server, "--replace-mismatched")) == 0
        assert prompts_sent(server) == {f"second-{i}": 1 for i in range(5)}
    assert {r["id"]: r["fingerprint"] for r in latest(out).values()} == fingerprints_of(second)


@pytest.mark.anyio
async def test_an_old_results_file_without_fingerprints_resumes_by_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    write_jobs(jobs_path, *({"model": "m", "prompt": f"p{i}"} for i in range(1, 5)))
    old = [
        {"id": "1", "line": 1, "ok": True, "urls": ["https://x/1.png"], "error": None},
        {"id": "2", "line": 2, "ok": False, "urls": [], "error": {"type": "ServerError"}},
    ]
    out.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in old))
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs_path, out, server)) == 0
        assert prompts_sent(server) == {"p2": 1, "p3": 1, "p4": 1}
    assert "without a fingerprint" in capsys.readouterr().err


@pytest.mark.anyio
async def test_shards_split_one_jobs_file_between_runs(tmp_path: Path) -> None:
    jobs_path = write_jobs(
        tmp_path / "jobs.jsonl", *({"model": "m", "prompt": f"p{i}"} for i in range(1, 41))
    )
    async with MockNebulaServer() as server:
        outs = [tmp_path / f"out-{i}.jsonl" for i in range(3)]
        for i, out in enumerate(outs):
            assert await cli(*run_args(jobs_path, out, server, "--shard", f"{i}/3")) == 0
        assert prompts_sent(server) == {f"p{i}": 1 for i in range(1, 41)}
    for i, out in enumerate(outs):
        assert {shard_of(job_id, 3) for job_id in latest(out)} == {i}
    assert sum(len(latest(out)) for out in outs) == 40
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        assert main(["run", str(jobs_path), "--out", str(outs[0]), "--shard", bad]) == 2


# -- bad input: exit 2 naming the line, whatever the value ---------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "line",
    [
        '{"model": "m", "prompt": "p", "response_format": []}',
        '{"model": "m", "prompt": "p", "sequential_image_generation": {}}',
        '{"model": "m", "prompt": "p", "score": 1e400}',
        '{"model": "m", "prompt": "p", "n": 100000000000000000000000}',
        '{"model": "m", "prompt": "p", "images": 0}',
        '{"model": "m", "prompt": "p", "id": {"a": 1}}',
        '{"model": "m", "prompt": "p", "prompt_options": [1, 2]}',
        '{"model": ["m"], "prompt": "p"}',
    ],
)
async def test_any_bad_value_is_exit_2_naming_the_line_before_anything_is_sent(
    tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs_path = write_jobs(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "good"}, line)
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer() as server:
        assert await cli(*run_args(jobs_path, out, server)) == 2
        assert server.requests == []
    err = capsys.readouterr().err
    assert f"{jobs_path}: line 2: " in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.anyio
async def test_partial_resume_keeps_the_saved_files_of_a_b64_json_job(tmp_path: Path) -> None:
    jobs_path = write_jobs(
        tmp_path / "jobs.jsonl",
        {"id": "b64", "model": "m", "prompt": "p", "n": 1, "images": 3,
         "response_format": "b64_json"},
    )  # fmt: skip
    out, images = tmp_path / "out.jsonl", tmp_path / "images"
    async with MockNebulaServer(fault_script=[None, None, "body_400"]) as server:
        args = run_args(jobs_path, out, server, "--concurrency", "1", "--download", str(images))
        assert await cli(*args) == 1
        first = latest(out)["b64"]
        assert first["ok"] is False
        assert first["urls"] == []
        assert first["files"] == [str(images / "b64-1.png"), str(images / "b64-2.png")]

        server.requests.clear()
        assert await cli(*args) == 0
        assert [r.field("n") for r in server.requests] == [1]  # only the missing image
    again = latest(out)["b64"]
    assert again["ok"] is True
    assert again["resumed_images"] == 2
    assert again["files"] == [str(images / f"b64-{k}.png") for k in (1, 2, 3)]
    assert heads(again["files"]) == [b"\x89PNG"] * 3


# -- fail fast: jobs never sent get no line, and a rerun does them ------------------------


@pytest.mark.anyio
async def test_a_refused_token_stops_the_run_and_a_rerun_does_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs_path = write_jobs(
        tmp_path / "jobs.jsonl", *({"model": "m", "prompt": f"p{i}"} for i in range(1, 101))
    )
    out = tmp_path / "out.jsonl"
    async with MockNebulaServer() as server:
        monkeypatch.setenv("NEBULA_TOKEN", "wrong-token")
        assert await cli(*run_args(jobs_path, out, server, "--concurrency", "2")) == 1
        err = capsys.readouterr().err
        assert "were not attempted" in err
        assert "AuthenticationError" in err
        refused = read_records(out)
        assert 0 < len(refused) < 20  # about the breaker's threshold, not 100
        assert {r["error"]["type"] for r in refused} == {"AuthenticationError"}
        assert server.request_count < 20

        monkeypatch.setenv("NEBULA_TOKEN", "mock-token")
        server.requests.clear()
        assert await cli(*run_args(jobs_path, out, server)) == 0
        assert prompts_sent(server) == {f"p{i}": 1 for i in range(1, 101)}
