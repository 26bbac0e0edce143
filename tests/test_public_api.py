"""The public surface: an explicit, sorted ``__all__`` that matches the contract, and
the same rule for every module of the package, private ones included."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import nebula_async as na

CONTRACT = {
    "Img2ImgRequest",
    "to_payload",
    "from_payload",
    "NebulaClient",
    "RateLimit",
    "RetryPolicy",
    "Timeout",
    "ImageResult",
    "Job",
    "JobResult",
    "BatchReport",
    "NebulaError",
    "ValidationError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "AuthenticationError",
    "RateLimitError",
    "BadRequestError",
    "ServerError",
    "ResponseDecodeError",
}


# Every module of the package, private ones included (httpx's rule: each states what
# it offers); ``__main__`` modules run the command when imported.
def _modules() -> list[str]:
    return [na.__name__] + [
        info.name
        for info in pkgutil.walk_packages(na.__path__, prefix=f"{na.__name__}.")
        if not info.name.endswith("__main__")
    ]


@pytest.mark.parametrize("name", _modules())
def test_all_is_sorted_and_exported(name: str) -> None:
    module = importlib.import_module(name)
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for exported in names:
        assert hasattr(module, exported), exported


def test_contract_names_are_public() -> None:
    assert set(na.__all__) >= CONTRACT


def test_public_objects_live_in_private_modules_and_have_docstrings() -> None:
    for name in na.__all__:
        obj = getattr(na, name)
        if name.startswith("__"):
            continue
        assert obj.__module__.startswith("nebula_async."), name
        assert obj.__doc__, f"{name} has no docstring"


def test_exception_hierarchy() -> None:
    assert issubclass(na.ValidationError, ValueError)
    assert issubclass(na.APITimeoutError, na.APIConnectionError)
    for cls in (na.AuthenticationError, na.RateLimitError, na.BadRequestError, na.ServerError):
        assert issubclass(cls, na.APIStatusError)
    for cls in (
        na.ValidationError,
        na.APIConnectionError,
        na.APIStatusError,
        na.ResponseDecodeError,
    ):
        assert issubclass(cls, na.NebulaError)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
