"""The one request every benchmark sends, and the mock server's token."""

from __future__ import annotations

from typing import Final

import nebula_async as na

__all__ = ["REQUEST", "TOKEN"]

REQUEST: Final = na.Img2ImgRequest(
    model="doubao-seedream-4-0-250828",
    prompt="a red fox in fresh snow, golden hour",
    image="https://example.com/in.png",
)
TOKEN: Final = "mock-token"
