"""Helpers shared by the command-line tests (imported by module name, like ``_gated``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from nebula_async.testing import MockNebulaServer

__all__ = ["complete_lines", "mock_credentials", "prompts_sent", "read_records"]


@pytest.fixture(autouse=True)
def mock_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mock server's token, and no other credential, in the environment."""
    monkeypatch.setenv("NEBULA_TOKEN", "mock-token")
    for name in ("NEBULA_USERNAME", "NEBULA_PASSWORD", "NEBULA_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a results file, parsed."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def prompts_sent(server: MockNebulaServer) -> Counter[str]:
    """How many requests the server got for each prompt."""
    return Counter(record.field("prompt") for record in server.requests)


def complete_lines(path: Path) -> int:
    """Lines written in full so far (0 before the file exists)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0
