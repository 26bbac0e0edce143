"""The ``nebula-async`` command line: ``run``, ``demo``, ``submit``, ``mock-server``.

A layer of its own on top of the library: it reads JSONL job files, writes
resumable results files, downloads images and shows progress. The library core
never imports it.
"""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
