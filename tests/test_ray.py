"""Ray Data: 1,000+ jobs on a local Ray (2 CPUs, no dashboard) through the mock server,
in another process, under one limit shared through a real redis-server.

Takes about 20-30 s (Ray's start is most of it). Skipped where Ray or redis-server is
not installed, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
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

pytestmark = pytest.mark.slow

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
def mock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``nebula-async mock-server`` in a process of its own (Ray's actors reach it
    over loopback while the driver blocks), recording every request to a file."""
    record = tmp_path_factory.mktemp("ray") / "record.jsonl"
    port = free_port()
    argv = [sys.executable, "-m", "nebula_async.cli", "mock-server", "--port", str(port)]
    argv += ["--latency", "0.02:0.05", "--record", str(record)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
        yield f"http://127.0.0.1:{port}", record
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def ray_cluster(mock_server: tuple[str, Path]) -> Iterator[Any]:
    ray = _require_ray()
    base_url, _ = mock_server
    env = {"NEBULA_TOKEN": "mock-token", "NEBULA_BASE_URL": base_url}
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
    ray_cluster: Any, redis_url: str, mock_server: tuple[str, Path]
) -> None:
    from nebula_async.ray import OUTPUT_COLUMNS, Img2ImgBatch, pending_rows

    ray = ray_cluster
    _, record = mock_server
    rows = _rows()
    limit = na.SharedRateLimit(redis_url, key="ray-test", per_second=RATE, adaptive=False)
    dataset = ray.data.from_items(rows)
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
    assert all(row["ok"] and row["fingerprint"] for row in good)
    assert len(by_id["r7"]["urls"]) == 3
    assert by_id["r7"]["submissions"] == 3
    urls = [url for row in good for url in row["urls"]]
    assert len(urls) == len(set(urls)) == JOBS + 2

    # Two actors, one account-wide limit: the server saw the limit, not twice it.
    times = _sent_times(record)
    assert len(times) == JOBS + 2
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert RATE * 0.9 <= rate <= RATE * 1.02, (rate, elapsed)
    busiest = max(
        sum(1 for t in times[i:] if t - start <= 1.0) for i, start in enumerate(times)
    )
    assert busiest <= RATE + 1

    # Resume: an earlier output's ok rows are not run again; the bad ones are.
    pending = pending_rows(dataset, ray.data.from_items(out)).take_all()
    assert sorted(row["id"] for row in pending) == ["bad-n", "no-prompt"]
