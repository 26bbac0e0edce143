"""Benchmarks of nebula-async beside the clients users would otherwise pick.

Run ``python -m benchmarks`` (``--quick`` for a short run); see docs/benchmarks.md.
"""
