"""Tiny, valid PNG files built with zlib and struct only (no imaging library needed)."""

from __future__ import annotations

import struct
import zlib
from typing import Final

__all__ = ["PNG_SIGNATURE", "png_bytes", "png_for_name"]

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    # Each chunk: length, type, data, then a CRC over type + data.
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (64, 128, 192)) -> bytes:
    """Return a solid-colour 8-bit RGB PNG of ``width`` x ``height`` pixels.

    >>> png_bytes(1, 1)[:8] == PNG_SIGNATURE
    True
    """
    if width < 1 or height < 1:
        raise ValueError("width and height must be at least 1")
    if any(not 0 <= c <= 255 for c in rgb):
        raise ValueError("colour components must be in 0..255")
    # Bit depth 8, colour type 2 (truecolour), deflate, filter 0, no interlace.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(rgb) * width  # filter byte 0 (None) before each scanline
    idat = zlib.compress(row * height, 9)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_for_name(name: str) -> bytes:
    """Return a small PNG whose colour is derived from ``name``.

    Different names usually give different bytes, so a test that downloads several
    images can tell them apart; the same name always gives the same bytes.
    """
    h = zlib.crc32(name.encode("utf-8"))
    return png_bytes(8, 8, ((h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF))
