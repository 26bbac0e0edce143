"""run_batch's repeated-id check: the same answer as a set of every id, in input order,
while keeping nothing per job for items known by their position."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nebula_async as na
from nebula_async._jobs import RefusedItem, RepeatedIdCheck, job_id_of, position_id
from nebula_async.testing import MockNebulaServer

REQUEST = na.Img2ImgRequest(model="m", prompt="p")

# Ids that clash with positions ("0".."6"), look like them but are not ("00", "+1",
# " 1", an Arabic-Indic one), or are plain names; dict ids may be ints or bools.
_IDS = st.sampled_from(["0", "1", "2", "3", "5", "6", "00", "01", "+1", " 1", "\u0661", "a", "b"])
items = st.one_of(
    st.just(REQUEST),
    st.builds(lambda i: na.Job(REQUEST, id=i), st.none() | _IDS),
    st.builds(lambda i: {"model": "m", "prompt": "p", "id": i}, _IDS | st.integers(0, 6)),
    st.builds(lambda i: {"model": "m", "prompt": "p", "id": i}, st.booleans() | st.none()),
    st.just({"model": "m", "prompt": "p"}),
)


def refused_by_a_set_of_every_id(sequence: list[Any]) -> list[int]:
    """The rule stated plainly: an id already seen earlier in the input is refused."""
    seen: set[str] = set()
    refused = []
    for index, item in enumerate(sequence):
        job_id = job_id_of(item, index)
        if job_id in seen:
            refused.append(index)
        else:
            seen.add(job_id)
    return refused


def refused_by_the_check(sequence: list[Any]) -> list[int]:
    check = RepeatedIdCheck().check
    return [
        index for index, item in enumerate(sequence) if isinstance(check(index, item), RefusedItem)
    ]


@settings(max_examples=500, deadline=None)
@given(st.lists(items, max_size=12))
def test_refuses_exactly_what_a_set_of_every_id_refuses(sequence: list[Any]) -> None:
    assert refused_by_the_check(sequence) == refused_by_a_set_of_every_id(sequence)


def test_named_ids_that_clash_with_positions_either_way() -> None:
    sequence = [
        REQUEST,  # "0"
        na.Job(REQUEST, id="0"),  # refused: position 0 has it
        na.Job(REQUEST, id="3"),  # named first...
        REQUEST,  # "3": refused, the named job 2 has it
        {"model": "m", "prompt": "p", "id": 4},  # "4" at position 4: its own position
        na.Job(REQUEST, id="1"),  # free: position 1 named "0" instead
    ]
    assert refused_by_the_check(sequence) == [1, 3]


def test_a_refused_item_names_the_id_and_the_field() -> None:
    check = RepeatedIdCheck().check
    first = na.Job(REQUEST, id="fox")
    assert check(0, first) is first
    refused = check(1, na.Job(REQUEST, id="fox"))
    assert isinstance(refused, RefusedItem)
    assert refused.job_id == "fox"
    assert refused.error.field == "id"
    assert "'fox'" in str(refused.error)
    assert "job 1" in str(refused.error)


def test_bare_requests_keep_nothing_per_job() -> None:
    check = RepeatedIdCheck()
    for index in range(1000):
        assert check.check(index, REQUEST) is REQUEST
    assert check._named == {}
    assert check._named_at == set()


def test_position_id_takes_only_what_str_of_an_index_gives() -> None:
    assert [position_id(s) for s in ("0", "7", "42", "9" * 18)] == [0, 7, 42, 10**18 - 1]
    # Longer than any position, and int() would refuse it (over 4,300 digits).
    assert position_id("1" * 19) is None
    assert position_id("1" * 5000) is None
    for text in ("00", "07", "-1", "+1", " 1", "1.0", "\u0661", "\u00b2", "a", ""):
        assert position_id(text) is None, text


def test_a_huge_all_digit_id_is_an_ordinary_name() -> None:
    long_id = "1" * 5000
    sequence = [REQUEST, na.Job(REQUEST, id=long_id), {"model": "m", "prompt": "p", "id": long_id}]
    assert refused_by_the_check(sequence) == [2]


@pytest.mark.anyio
async def test_run_batch_with_a_huge_all_digit_id_runs_every_job() -> None:
    jobs = [REQUEST, na.Job(REQUEST, id="1" * 5000), REQUEST]
    async with MockNebulaServer() as server:
        async with na.NebulaClient(token="mock-token", base_url=server.base_url) as client:
            report = await client.run_batch(jobs)
    assert [result.ok for result in report.results] == [True, True, True]
    assert [result.job_id for result in report.results] == ["0", "1" * 5000, "2"]
    assert len(server.requests) == 3
