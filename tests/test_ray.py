"""Ray Data: 1,000+ jobs on a local Ray (2 CPUs, no dashboard) through the mock server,
in another process, under one limit shared through a real redis-server.

Takes about 20-30 s (Ray's start is most of it). Skipped where Ray or redis-server is
not installed, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis_server import RedisServer, free_port, require_redis_server

import nebula_async as na

pytestmark = [
    pytest.mark.slow,
    # Ray's own deprecations (its data context), not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]

RATE = 100.0
JOBS = 1000


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            raise pytest.fail.Exception("ray not installed; CI must have it") from None
        raise pytest.skip.Exception("ray not installed (pip install 'nebula-async[ray]')") from None
    return ray


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer(require_redis_server()) as server:
        yield server.url


@pytest.fixture(scope="module")
def mock_port() -> int:
    return free_port()


@contextlib.contextmanager
def mock_server_process(port: int, record: Path) -> Iterator[None]:
    """``nebula-async mock-server`` in a process of its own (Ray's actors reach it
    over loopback while the driver blocks); its record is written when it stops."""
    argv = [sys.executable, "-m", "nebula_async.cli", "mock-server", "--port", str(port)]
    argv += ["--latency", "0.02:0.05", "--record", str(record)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the mock server did not start") from None
                time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def ray_cluster(mock_port: int) -> Iterator[Any]:
    ray = _require_ray()
    env = {"NEBULA_TOKEN": "mock-token", "NEBULA_BASE_URL": f"http://127.0.0.1:{mock_port}"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"id": f"r{i}", "model": "m", "prompt": f"ray-{i}"} for i in range(JOBS)
    ]
    rows[7]["images"] = 3  # a fanned-out job: 3 submissions of n=1
    rows += [
        {"id": "bad-n", "model": "m", "prompt": "p", "n": 99},  # n above 15
        {"id": "no-prompt", "model": "m"},
    ]
    return rows


def _sent_times(record: Path) -> list[float]:
    lines = [orjson.loads(line) for line in record.read_bytes().splitlines() if line]
    return sorted(float(line["received_s"]) for line in lines)


def test_a_ray_data_run_under_a_shared_limit(
    ray_cluster: Any, redis_url: str, mock_port: int, tmp_path: Path
) -> None:
    from nebula_async.ray import OUTPUT_COLUMNS, Img2ImgBatch, pending_rows

    ray = ray_cluster
    record = tmp_path / "record.jsonl"
    rows = _rows()
    limit = na.SharedRateLimit(redis_url, key="ray-test", per_second=RATE, adaptive=False)
    dataset = ray.data.from_items(rows)
    with mock_server_process(mock_port, record):
        started = time.monotonic()
        out = dataset.map_batches(
            Img2ImgBatch,
            fn_constructor_kwargs={"rate_limit": limit, "max_concurrency": 16},
            concurrency=2,
            batch_size=128,
        ).take_all()
        elapsed = time.monotonic() - started

    # Exactly one output row per input row, failures as rows.
    assert Counter(row["id"] for row in out) == Counter(row["id"] for row in rows)
    assert all(list(row) == list(OUTPUT_COLUMNS) for row in out)
    by_id = {row["id"]: row for row in out}
    assert by_id["bad-n"]["ok"] is False
    assert by_id["bad-n"]["error"]["type"] == "ValidationError"
    assert by_id["no-prompt"]["error"]["type"] == "ValidationError"
    good = [row for row in out if row["id"].startswith("r")]
    assert [row for row in good if not (row["ok"] and row["fingerprint"])] == []
    assert len(by_id["r7"]["urls"]) == 3
    assert by_id["r7"]["submissions"] == 3
    urls = [url for row in good for url in row["urls"]]
    assert len(urls) == len(set(urls)) == JOBS + 2

    # Two actors, one account-wide limit: the server saw the limit, not twice it.
    times = _sent_times(record)
    assert len(times) == JOBS + 2
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert RATE * 0.9 <= rate <= RATE * 1.02, (rate, elapsed)
    busiest = max(sum(1 for t in times[i:] if t - start <= 1.0) for i, start in enumerate(times))
    # Arrival times, not send slots: a send that a busy actor delayed by d seconds bunches
    # up with its successors by d x rate (the anchored schedule pays lateness back).
    assert busiest <= RATE * 1.05, busiest

    # Resume: an earlier output's ok rows are not run again; the bad ones are.
    pending = pending_rows(dataset, ray.data.from_items(out)).take_all()
    assert sorted(row["id"] for row in pending) == ["bad-n", "no-prompt"]
