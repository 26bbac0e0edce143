"""Shared test set-up: anyio's pytest plugin on asyncio (aiohttp is asyncio-only)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
