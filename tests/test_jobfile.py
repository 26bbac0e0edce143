"""The JSONL jobs reader: line numbers, key styles, ids, local images."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest

from nebula_async.cli._jobfile import (
    MAX_LOCAL_IMAGE_BYTES,
    BadLine,
    JobLine,
    iter_job_lines,
    local_image_data_uri,
    sniff_image_mime,
)
from nebula_async.testing._png import png_bytes


def write_lines(path: Path, *lines: object) -> Path:
    """Write a jobs file; str items are written verbatim, others as JSON."""
    out = []
    for line in lines:
        out.append(line if isinstance(line, str) else orjson.dumps(line).decode())
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def read_all(path: Path, **options: object) -> list[JobLine | BadLine]:
    options.setdefault("load_images", True)
    return list(iter_job_lines(path, **options))  # type: ignore[arg-type]


def only_bad(items: list[JobLine | BadLine]) -> list[BadLine]:
    return [item for item in items if isinstance(item, BadLine)]


def test_snake_camel_dotted_and_nested_keys_all_read(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "a", "response_format": "url", "n": 2},
        {"model": "m", "prompt": "b", "responseFormat": "url", "promptOptions": {"k": 1}},
        {"batchImageGenerationDTO.model": "m", "batchImageGenerationDTO.prompt": "c"},
        {"batchImageGenerationDTO": {"model": "m", "prompt": "d", "optimizePrompt": "x"}},
    )
    items = read_all(jobs)
    assert all(isinstance(item, JobLine) for item in items)
    good = [item for item in items if isinstance(item, JobLine)]
    assert [g.job.request.prompt for g in good] == ["a", "b", "c", "d"]
    assert good[0].job.request.n == 2
    assert good[1].job.request.response_format == "url"
    assert good[1].job.request.prompt_options == {"k": 1}
    assert good[3].job.request.optimize_prompt == "x"


def test_default_ids_are_line_numbers_counting_blank_lines(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "a"},
        "",
        "   ",
        {"model": "m", "prompt": "b", "id": "custom"},
        {"model": "m", "prompt": "c", "id": 42, "images": 5},
    )
    items = read_all(jobs)
    assert [(item.line_no, item.job_id) for item in items] == [(1, "1"), (4, "custom"), (5, "42")]
    last = items[-1]
    assert isinstance(last, JobLine)
    assert last.job.images == 5


def test_bad_lines_name_their_line_number_and_field(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "ok"},
        "{not json",
        "[1, 2]",
        {"model": "m", "prompt": "p", "n": 99},
        {"model": "m"},
        {"model": "m", "prompt": "p", "colour": "red"},
        {"model": "m", "prompt": "p", "id": ["x"]},
        {"model": "m", "prompt": "p", "images": 0},
        {"model": "m", "prompt": "p", "prompt_options": {}, "promptOptions": {}},
    )
    bad = only_bad(read_all(jobs))
    assert [b.line_no for b in bad] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "invalid JSON" in bad[0].describe()
    assert bad[0].describe().startswith("line 2: ")
    assert "expected a JSON object" in bad[1].message
    assert [b.field for b in bad[2:]] == ["n", "prompt", "colour", "id", "images", "prompt_options"]
    assert "line 4: " in bad[2].describe()
    assert "n" in bad[2].describe()


def test_duplicate_ids_are_refused_on_the_later_line(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "a", "id": "x"},
        {"model": "m", "prompt": "b", "id": "y"},
        {"model": "m", "prompt": "c", "id": "x"},
        {"model": "m", "prompt": "d", "id": 2},  # "2" is free: line 2 is called "y"
        {"model": "m", "prompt": "e"},  # default id "5"
        {"model": "m", "prompt": "f", "id": "5"},
    )
    items = read_all(jobs)
    bad = only_bad(items)
    assert [(b.line_no, b.field) for b in bad] == [(3, "id"), (6, "id")]
    assert "first used on line 1" in bad[0].message
    assert "first used on line 5" in bad[1].message


def test_a_bad_line_claims_its_id_as_run_batch_does(tmp_path: Path) -> None:
    """Ids are unique over the whole file, good lines or bad: the bad line's id is in
    the results, and fixing it later must not turn the line that reuses it into a
    duplicate after that line was already generated."""
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "id": "a"},  # no prompt: bad, but it names "a"
        {"model": "m", "prompt": "b", "id": "a"},
    )
    bad = only_bad(read_all(jobs))
    assert [(b.line_no, b.field) for b in bad] == [(1, "prompt"), (2, "id")]
    assert "first used on line 1" in bad[1].message


def test_duplicates_not_checked_when_asked(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "a", "id": "x"},
        {"model": "m", "prompt": "b", "id": "x"},
    )
    assert only_bad(read_all(jobs, skip_lines={2})) == []
    assert len(read_all(jobs, check_duplicates=False)) == 2


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (png_bytes(2, 2), "image/png"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 20, "image/jpeg"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\0" * 8, "image/webp"),
        (b"GIF89a" + b"\0" * 10, "image/gif"),
        (b"BM" + b"\0" * 20, "image/bmp"),
        (b"II*\x00" + b"\0" * 10, "image/tiff"),
        (b"MM\x00*" + b"\0" * 10, "image/tiff"),
    ],
)
def test_local_image_becomes_data_uri_with_sniffed_mime(
    tmp_path: Path, head: bytes, mime: str
) -> None:
    image = tmp_path / "input.bin"  # the extension is ignored: the bytes decide
    image.write_bytes(head)
    assert sniff_image_mime(head) == mime
    uri = local_image_data_uri(image)
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix)
    assert base64.b64decode(uri[len(prefix) :]) == head


def test_relative_image_paths_resolve_against_the_jobs_file(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "in.png").write_bytes(png_bytes(3, 3))
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "rel", "image": "imgs/in.png"},
        {"model": "m", "prompt": "abs", "image": str(tmp_path / "imgs" / "in.png")},
        {"model": "m", "prompt": "url", "image": "https://example.com/a.png"},
        {
            "batchImageGenerationDTO.model": "m",
            "batchImageGenerationDTO.prompt": "dotted",
            "batchImageGenerationDTO.image": "imgs/in.png",
        },
        {"batchImageGenerationDTO": {"model": "m", "prompt": "nested", "image": "imgs/in.png"}},
    )
    items = read_all(jobs)
    assert not only_bad(items)
    images = [item.job.request.image for item in items if isinstance(item, JobLine)]
    assert images[0] is not None
    assert images[0].startswith("data:image/png;base64,")
    assert images[1] == images[0] == images[3] == images[4]
    assert images[2] == "https://example.com/a.png"


def test_checking_pass_does_not_read_images(tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes(3, 3))
    jobs = write_lines(tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p", "image": "in.png"})
    [item] = read_all(jobs, load_images=False)
    assert isinstance(item, JobLine)
    assert item.job.request.image == "data:image/png;base64,AA=="  # the placeholder


def test_missing_oversized_and_non_image_files_are_bad_lines(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(1, 1) + b"\0" * MAX_LOCAL_IMAGE_BYTES)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "ok.png").write_bytes(png_bytes(1, 1))
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"model": "m", "prompt": "p", "image": "missing.png"},
        {"model": "m", "prompt": "p", "image": "big.png"},
        {"model": "m", "prompt": "p", "image": "notes.txt"},
        {"model": "m", "prompt": "p", "image": "ok.png"},
    )
    for load_images in (False, True):
        bad = only_bad(read_all(jobs, load_images=load_images))
        assert [(b.line_no, b.field) for b in bad] == [(1, "image"), (2, "image"), (3, "image")]
        assert "not found" in bad[0].message
        assert "10 MB limit" in bad[1].message
        assert "not a PNG, JPEG" in bad[2].message


def test_b64_json_needs_download_when_refused(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl", {"model": "m", "prompt": "p", "responseFormat": "b64_json"}
    )
    [bad] = read_all(jobs, allow_b64_json=False)
    assert isinstance(bad, BadLine)
    assert bad.field == "response_format"
    assert "--download" in bad.message
    [good] = read_all(jobs, allow_b64_json=True)
    assert isinstance(good, JobLine)


def test_utf8_bom_and_last_line_without_newline(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b'\xef\xbb\xbf{"model": "m", "prompt": "a"}\n{"model": "m", "prompt": "b"}')
    items = read_all(jobs)
    assert [item.job_id for item in items] == ["1", "2"]
    assert not only_bad(items)
