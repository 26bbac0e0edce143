"""Ray Data integration: bulk img2img across a cluster, one client per actor.

Install with ``pip install 'nebula-async[ray]'``. Input rows hold what a CLI job
line holds (``id``, request fields in snake_case or camelCase, ``images``); output
rows hold what a CLI result line holds (``id``, ``ok``, ``urls``, ``error``,
``attempts``, ``submissions``, ``elapsed_s``, ``fingerprint``), exactly one per
input row, failures included as rows (a bad row is that row's
``ValidationError``, never a crashed task)::

    import ray
    import nebula_async as na
    from nebula_async.ray import Img2ImgBatch

    limit = na.SharedRateLimit("redis://10.0.0.5:6379/0", key="acct-1", per_second=20)
    jobs = ray.data.read_json("s3://bucket/jobs/")
    results = jobs.map_batches(
        Img2ImgBatch,
        fn_constructor_kwargs={"rate_limit": limit, "max_concurrency": 32},
        concurrency=8,          # 8 actors, each one NebulaClient
        batch_size=256,
    )
    results.write_json("s3://bucket/results/")

Every actor's client takes its credentials from ``fn_constructor_kwargs`` or
from the actor's environment (``NEBULA_TOKEN``...; pass them with
``ray.init(runtime_env={"env_vars": {...}})``). A
:class:`~nebula_async.SharedRateLimit` is picklable configuration: each actor
connects to Redis itself, so all of them keep one account-wide limit. A float or
:class:`~nebula_async.RateLimit` would be per actor (the limit times the
actors): the shared one is what a cluster wants.

Resume: :func:`pending_rows` drops the rows whose id and fingerprint an earlier
output already holds as ok, so a rerun generates only what is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nebula_async._client import NebulaClient
from nebula_async._exceptions import ValidationError
from nebula_async._jobs import error_record, job_fingerprint, job_from_mapping, job_id_of
from nebula_async._models import Job, JobResult

__all__ = [
    "Img2ImgBatch",
    "OUTPUT_COLUMNS",
    "done_keys",
    "pending_rows",
    "row_key",
]

#: The columns of every output batch, in order.
OUTPUT_COLUMNS = (
    "id",
    "ok",
    "urls",
    "error",
    "attempts",
    "submissions",
    "elapsed_s",
    "fingerprint",
)


class Img2ImgBatch:
    """A callable class for ``Dataset.map_batches``: one :class:`NebulaClient` per actor.

    The keyword arguments are :class:`NebulaClient` options. The client opens on
    the first batch, in the actor's event loop, and serves every later batch.
    """

    def __init__(self, **client_options: Any) -> None:
        self._options = client_options
        self._client: NebulaClient | None = None

    async def _open(self) -> NebulaClient:
        if self._client is None:
            client = NebulaClient(**self._options)
            await client.__aenter__()
            self._client = client
        return self._client

    async def __call__(self, batch: Any) -> dict[str, list[Any]]:
        """Run one batch of job rows; one output row per input row, in order."""
        client = await self._open()
        rows = batch_rows(batch)
        jobs: list[Job | JobResult] = [_job_of(row, index) for index, row in enumerate(rows)]
        runnable = [job for job in jobs if isinstance(job, Job)]
        report = await client.run_batch(_unique_ids(runnable))
        done = iter(report.results)
        results = [job if isinstance(job, JobResult) else next(done) for job in jobs]
        fingerprints = [job_fingerprint(j) if isinstance(j, Job) else None for j in jobs]
        ids = [job_id_of(row, index) for index, row in enumerate(rows)]
        return output_columns(results, fingerprints, ids=ids)

    def __del__(self) -> None:
        # An actor ends with its process; nothing to flush (results were returned).
        self._client = None


def _unique_ids(jobs: list[Job]) -> list[Job]:
    # run_batch refuses a repeated id; rows of one batch are positions, ids per row.
    return [Job(job.request, id=str(at), images=job.images) for at, job in enumerate(jobs)]


def _job_of(row: Mapping[str, Any], index: int) -> Job | JobResult:
    """The job of a row, or the failed result of a row that is not one."""
    try:
        return job_from_mapping(row, default_id=str(index))
    except ValidationError as exc:
        return JobResult(job_id=job_id_of(row, index), errors=[exc])
    except Exception as exc:  # any value of any type: the row's error, not the task's
        error = ValidationError(f"row {index}: {type(exc).__name__}: {exc}", field="row")
        return JobResult(job_id=job_id_of(row, index), errors=[error])


def batch_rows(batch: Any) -> list[dict[str, Any]]:
    """Rows (plain dicts, Python scalars, missing values dropped) of a Ray batch:
    a dict of columns (``batch_format="numpy"``, the default) or a pandas DataFrame."""
    if hasattr(batch, "to_dict") and not isinstance(batch, Mapping):
        batch = batch.to_dict("list")  # a pandas DataFrame
    columns = {name: list(values) for name, values in batch.items()}
    length = max((len(values) for values in columns.values()), default=0)
    return [
        {
            name: _plain(values[i], integer=name in _INTEGER_COLUMNS)
            for name, values in columns.items()
            if not _missing(values[i])
        }
        for i in range(length)
    ]


#: Integer fields, which a column with missing values holds as floats (3 as 3.0).
_INTEGER_COLUMNS = frozenset({"n", "images", "temperature"})


def _plain(value: Any, *, integer: bool = False) -> Any:
    """A numpy scalar or array as the Python value a job line would hold."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    elif hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and value != value  # NaN: a column absent in this row


def output_columns(
    results: list[JobResult], fingerprints: list[str | None], *, ids: list[str]
) -> dict[str, list[Any]]:
    """The output batch: one row per result, as columns."""
    return {
        "id": ids,
        "ok": [result.ok for result in results],
        "urls": [list(result.urls) for result in results],
        "error": [error_record(result.error) for result in results],
        "attempts": [result.attempts for result in results],
        "submissions": [result.submissions for result in results],
        "elapsed_s": [round(result.elapsed_s, 3) for result in results],
        "fingerprint": fingerprints,
    }


def row_key(job_id: str, fingerprint: str) -> str:
    """The key an ok output row is known by when resuming: id and fingerprint."""
    return f"{job_id}\x00{fingerprint}"


def done_keys(previous_rows: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The keys of the ok rows of an earlier output (``Dataset.iter_rows()``)."""
    return frozenset(
        row_key(str(row["id"]), str(row["fingerprint"]))
        for row in previous_rows
        if row.get("ok") and row.get("fingerprint")
    )


class _DropDone:
    """``map_batches`` step keeping the rows not in ``done`` (by id and fingerprint)."""

    def __init__(self, done: frozenset[str]) -> None:
        self._done = done

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch_rows(batch)
        keep = []
        for index, row in enumerate(rows):
            job = _job_of(row, index)
            key = (
                row_key(job_id_of(row, index), job_fingerprint(job)) if isinstance(job, Job) else ""
            )
            if key not in self._done:
                keep.append(row)
        names = sorted({name for row in keep for name in row})
        return {name: [row.get(name) for row in keep] for name in names}


def pending_rows(jobs: Any, previous_output: Any) -> Any:
    """The rows of ``jobs`` (a Ray ``Dataset``) that ``previous_output`` (a
    ``Dataset`` of output rows) does not hold as ok with the same fingerprint.

    The done keys are gathered on the driver (about 80 bytes per ok row: shard a
    run of tens of millions of jobs by id first, see docs/scale-out.md).
    """
    done = done_keys(previous_output.iter_rows())
    return jobs.map_batches(_DropDone, fn_constructor_kwargs={"done": done}, concurrency=1)
