"""Every ``>>>`` example in the package's docstrings runs and shows what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import nebula_async

# ``__main__`` modules run the command when imported; Ray's module imports Ray.
_MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(nebula_async.__path__, "nebula_async.")
    if not info.name.endswith("__main__") and info.name != "nebula_async.ray"
)


@pytest.mark.parametrize("name", _MODULES)
def test_docstring_examples_hold(name: str) -> None:
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, report=False)
    assert failed == 0, f"{failed} docstring example(s) of {name} failed (python -m doctest -v)"
