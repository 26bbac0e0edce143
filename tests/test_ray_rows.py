"""The Ray integration's rows, without Ray: ids follow the library's one rule."""

from __future__ import annotations

import pytest

import nebula_async as na
from nebula_async import ray as nebula_ray
from nebula_async._jobs import job_id_of


@pytest.mark.parametrize("bad_id", ["", True, 7.5, "a\x00b", [1]])
def test_a_row_whose_id_cannot_be_one_is_known_by_its_position(bad_id: object) -> None:
    result = nebula_ray._job_of({"id": bad_id, "model": "m", "prompt": "p"}, 3)
    assert isinstance(result, na.JobResult)
    assert result.job_id == "3"
    assert isinstance(result.error, na.ValidationError)
    assert result.error.field == "id"


def test_a_row_id_is_normalised_as_run_batch_does() -> None:
    job = nebula_ray._job_of({"id": 7, "model": "m", "prompt": "p"}, 0)
    assert isinstance(job, na.Job)
    assert job.id == "7"
    assert job_id_of({"id": 7}, 0) == "7"
    assert job_id_of({"id": True}, 4) == "4"
