"""The results file: record shapes, resume state, torn-tail repair."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from nebula_async import GeneratedImage, JobResult, ServerError, ValidationError
from nebula_async.cli._jobfile import BadLine
from nebula_async.cli._results import (
    Kind,
    ResultsFileBusy,
    ResultsFileError,
    ResultsWriteError,
    ResultWriter,
    ResumeState,
    bad_line_record,
    download_record,
    error_record,
    job_result_record,
    load_resume_state,
    parse_pending_downloads,
    read_record_at,
)


def ids(state: ResumeState, kind: Kind) -> set[str]:
    return {job_id for job_id, entry in state.entries.items() if entry.kind is kind}


def offsets(state: ResumeState, kind: Kind) -> dict[str, int]:
    return {job_id: entry.offset for job_id, entry in state.entries.items() if entry.kind is kind}


def record(job_id: str, ok: bool) -> bytes:
    return orjson.dumps({"id": job_id, "ok": ok, "urls": []}) + b"\n"


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    state = load_resume_state(tmp_path / "none.jsonl")
    assert ids(state, Kind.OK) == set()
    assert state.records == 0


def test_any_ok_line_makes_a_job_done_and_latest_failure_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(
        record("a", False)
        + record("a", True)
        + record("b", False)
        + b"\n"
        + record("c", True)
        + record("a", False)  # written by hand: an ok line still wins, so "a" is never resent
    )
    state = load_resume_state(out)
    assert ids(state, Kind.OK) == {"a", "c"}
    assert ids(state, Kind.FAILED) == {"b"}
    assert state.records == 5
    assert state.keep_bytes == out.stat().st_size
    assert state.torn_line_no is None


@pytest.mark.parametrize("tail", [b'{"id": "z", "ok": tr', b"garbage\n", b"[1]"])
def test_torn_last_line_is_cut_before_appending(tmp_path: Path, tail: bytes) -> None:
    out = tmp_path / "out.jsonl"
    good = record("a", True) + record("b", False)
    out.write_bytes(good + tail)
    state = load_resume_state(out)
    assert ids(state, Kind.OK) == {"a"}
    assert state.torn_line_no == 3
    assert state.keep_bytes == len(good)
    with ResultWriter(out) as writer:
        assert ids(writer.state, Kind.OK) == {"a"}
        writer.write({"id": "b", "ok": True})
    lines = out.read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == ["a", "b", "b"]


def test_complete_last_record_missing_its_newline_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(record("a", True) + record("b", True).rstrip(b"\n"))
    state = load_resume_state(out)
    assert ids(state, Kind.OK) == {"a", "b"}
    assert state.needs_newline
    with ResultWriter(out) as writer:
        writer.write({"id": "c", "ok": True})
    assert [orjson.loads(line)["id"] for line in out.read_bytes().splitlines()] == ["a", "b", "c"]


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(record("a", True) + b"oops\n" + record("b", True))
    with pytest.raises(ResultsFileError, match="line 2"):
        load_resume_state(out)


def test_writer_creates_the_file_and_appends_whole_lines(tmp_path: Path) -> None:
    out = tmp_path / "new.jsonl"
    with ResultWriter(out) as writer:
        writer.write({"id": "1", "ok": True})
        writer.write({"id": "2", "ok": False})
    assert out.read_bytes() == b'{"id":"1","ok":true}\n{"id":"2","ok":false}\n'


def test_writer_without_resume_empties_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(record("old", True) + b"torn")
    with ResultWriter(out, resume=False) as writer:
        assert ids(writer.state, Kind.OK) == set()
        writer.write({"id": "new", "ok": True})
    assert out.read_bytes() == b'{"id":"new","ok":true}\n'


def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with ResultWriter(out), pytest.raises(ResultsFileBusy, match="in use"):
        ResultWriter(out).open()
    with ResultWriter(out):  # released on close
        pass


def test_record_shapes() -> None:
    failure = ServerError("HTTP 503 from the gateway", status_code=503, code=None, msg="busy")
    result = JobResult(
        job_id="j",
        urls=["https://x/1.png"],
        images=[GeneratedImage(url="https://x/1.png")],
        errors=[failure],
        submissions=2,
        attempts=5,
        elapsed_s=1.23456,
    )
    assert job_result_record(result, line_no=3) == {
        "id": "j",
        "line": 3,
        "ok": False,
        "urls": ["https://x/1.png"],
        "error": {
            "type": "ServerError",
            "message": "HTTP 503 from the gateway",
            "status_code": 503,
            "code": None,
            "field": None,
        },
        "attempts": 5,
        "submissions": 2,
        "elapsed_s": 1.235,
        "fingerprint": None,
    }
    assert error_record(ValidationError("n: too big", field="n")) == {
        "type": "ValidationError",
        "message": "n: too big",
        "status_code": None,
        "code": None,
        "field": "n",
    }
    bad = bad_line_record(BadLine(7, "7", "n: must be from 1 to 15", "n"))
    assert bad["ok"] is False
    assert bad["error"]["message"] == "line 7: n: must be from 1 to 15"
    assert bad["error"]["field"] == "n"
    assert bad["attempts"] == 0


# -- pending downloads ------------------------------------------------------------------------


def pending(job_id: str, *, ok: bool = False, entries: object = None) -> bytes:
    if entries is None:
        entries = [{"image": 1, "url": "https://x/1.png", "error": "HTTP 404"}]
    line = {"id": job_id, "ok": ok, "urls": ["https://x/1.png"], "pending_downloads": entries}
    return orjson.dumps(line) + b"\n"


def test_a_latest_line_with_pending_downloads_marks_a_job_to_repair(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    lines = [
        record("a", False),  # generation failed, then generated with a download pending
        pending("a"),
        pending("b"),  # pending, then repaired
        record("b", True),
        pending("c"),  # pending, then (by hand) a plain failure: sent again
        record("c", False),
        pending("d", entries=[]),  # nothing pending: a failure (which kept a URL)
        pending("e", ok=True),  # ok wins whatever it lists
    ]
    out.write_bytes(b"".join(lines))
    state = load_resume_state(out)
    assert ids(state, Kind.OK) == {"b", "e"}
    assert ids(state, Kind.FAILED) == {"c"}
    assert ids(state, Kind.PARTIAL) == {"d"}  # failed, with a URL kept: resumed partly
    assert offsets(state, Kind.REPAIR) == {"a": len(lines[0])}
    assert read_record_at(out, offsets(state, Kind.REPAIR)["a"])["pending_downloads"][0]["url"] == (
        "https://x/1.png"
    )


def test_a_torn_line_after_a_pending_one_leaves_the_job_to_repair(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = pending("a")
    out.write_bytes(good + b'{"id": "a", "ok": true, "fi')
    state = load_resume_state(out)
    assert offsets(state, Kind.REPAIR) == {"a": 0}
    assert ids(state, Kind.OK) == set()
    assert state.keep_bytes == len(good)


@pytest.mark.parametrize(
    "entries",
    [
        "nope",
        [{"image": 0, "url": "u"}],
        [{"image": True, "url": "u"}],
        [{"image": 1}],
        [{"image": 1, "url": "u", "b64_json": "x"}],
        [{"image": 1, "url": "u"}, {"image": 1, "url": "v"}],
    ],
)
def test_malformed_pending_downloads_are_not_a_record(tmp_path: Path, entries: object) -> None:
    assert parse_pending_downloads(entries) is None
    out = tmp_path / "out.jsonl"
    out.write_bytes(pending("a", entries=entries) + record("b", True))
    with pytest.raises(ResultsFileError, match="line 1"):
        load_resume_state(out)
    out.write_bytes(record("b", True) + pending("a", entries=entries))  # last: cut as torn
    assert load_resume_state(out).torn_line_no == 2


def test_download_record_shapes() -> None:
    base = {"id": "j", "line": 1, "ok": True, "urls": ["https://x/1", "https://x/2"],
            "error": None, "attempts": 1, "submissions": 1, "elapsed_s": 0.5}  # fmt: skip
    images = {1: GeneratedImage(url="https://x/1"), 2: GeneratedImage(url="https://x/2")}
    done = download_record(
        base, generated=True, files=["d/j-1.png", "d/j-2.png"], failures={}, images=images
    )
    assert done == {**base, "files": ["d/j-1.png", "d/j-2.png"], "download_error": None,
                    "pending_downloads": [], "pending": False}  # fmt: skip
    partial = download_record(
        base, generated=True, files=["d/j-1.png", None], failures={2: "HTTP 404"}, images=images
    )
    assert partial["ok"] is False
    assert partial["error"] == {
        "type": "DownloadError",
        "message": "1 of 2 images not saved: image 2: HTTP 404",
        "status_code": None,
        "code": None,
        "field": None,
    }
    assert partial["download_error"] == "image 2: HTTP 404"
    assert partial["pending_downloads"] == [{"image": 2, "url": "https://x/2", "error": "HTTP 404"}]
    inline = download_record(
        base,
        generated=True,
        files=[None],
        failures={1: "cannot write"},
        images={1: GeneratedImage(b64_json="QUJD")},
    )
    assert inline["pending_downloads"] == [
        {"image": 1, "b64_json": "QUJD", "error": "cannot write"}
    ]
    assert parse_pending_downloads(inline["pending_downloads"]) == {
        1: GeneratedImage(b64_json="QUJD")
    }
    # A job whose generation failed keeps its error and lists nothing: it is sent again.
    failed = {**base, "ok": False, "error": {"type": "ServerError"}}
    again = download_record(failed, generated=False, files=[None], failures={1: "x"}, images=images)
    assert (again["ok"], again["error"], again["pending_downloads"]) == (
        False,
        {"type": "ServerError"},
        [],
    )
    assert again["download_error"] == "image 1: x"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_write_raises_with_the_line() -> None:
    with ResultWriter("/dev/full", resume=False) as writer:  # every write: ENOSPC
        with pytest.raises(ResultsWriteError, match="cannot write to /dev/full") as caught:
            writer.write({"id": "1", "ok": True})
    assert caught.value.record == b'{"id":"1","ok":true}\n'


def test_a_latest_failed_line_with_urls_marks_a_job_to_resume_partly(tmp_path: Path) -> None:
    def failed(job_id: str, urls: object) -> bytes:
        return orjson.dumps({"id": job_id, "ok": False, "urls": urls}) + b"\n"

    out = tmp_path / "out.jsonl"
    lines = [
        failed("a", ["https://x/1.png"]),  # partly made, then partly made again
        failed("a", ["https://x/1.png", "https://x/2.png"]),
        failed("b", ["https://x/3.png"]),  # partly made, then ok
        record("b", True),
        failed("c", ["https://x/4.png"]),  # partly made, then nothing: sent again whole
        record("c", False),
        pending("d"),  # pending downloads: repaired, not resumed
        failed("e", "not a list"),  # no usable URLs
        failed("f", ["https://x/5.png"]),
    ]
    out.write_bytes(b"".join(lines) + b'{"id": "f", "ok": fa')  # and a torn last line
    state = load_resume_state(out)
    offset_of = {i: sum(len(line) for line in lines[:i]) for i in range(len(lines))}
    assert offsets(state, Kind.PARTIAL) == {"a": offset_of[1], "f": offset_of[8]}
    assert offsets(state, Kind.REPAIR) == {"d": offset_of[6]}
    assert read_record_at(out, offsets(state, Kind.PARTIAL)["a"])["urls"][1] == "https://x/2.png"
