"""Any value as a job's ``id`` fails that job alone, never the batch."""

from __future__ import annotations

import pytest

import nebula_async as na
from nebula_async._jobs import explicit_job_id
from nebula_async.testing import MockNebulaServer

pytestmark = pytest.mark.anyio


BAD_IDS = [10**5000, "", "a\x00b", "x" * 10_000, 1.5, [1], {"a": 1}]


@pytest.mark.parametrize(
    "bad", BAD_IDS, ids=["huge-int", "empty", "nul", "long", "float", "list", "dict"]
)
async def test_a_bad_id_of_any_kind_fails_its_job_alone(bad: object) -> None:
    async with MockNebulaServer() as server:
        async with na.NebulaClient(token="mock-token", base_url=server.base_url) as client:
            report = await client.run_batch(
                [{"model": "m", "prompt": "good"}, {"model": "m", "prompt": "p", "id": bad}]
            )
    good, failed = report.results
    assert good.ok
    assert isinstance(failed.error, na.ValidationError)
    assert failed.error.field == "id"
    assert len(server.requests) == 1


def test_explicit_ids_follow_the_one_rule() -> None:
    assert explicit_job_id({"id": 7}) == "7"
    assert explicit_job_id({"id": "job-1"}) == "job-1"
    assert explicit_job_id({"id": 10**5000}) is None  # not an id: the job fails on it
    assert explicit_job_id({"model": "m"}) is None
