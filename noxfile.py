"""Project gates: ``nox -s tests lint typing docs``; ``bench``, ``soak`` apart (``nox -l``)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing", "docs"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

PYTHON = ["3.11"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, warnings as errors (set in pyproject.toml)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typing(session: nox.Session) -> None:
    """mypy --strict on the package."""
    # The redis extra: mypy checks _redis.py against redis-py's own types.
    session.install("-e", ".[redis]", "mypy>=1.11")
    session.run("mypy", "--strict", "nebula_async")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the site strictly (no broken link, no missing docstring target, offline),
    and run every example of the README and the site against the mock server."""
    session.install("-e", ".[docs,test]")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "build/site", env={"NO_MKDOCS_2_WARNING": "1"}
    )
    session.run("python", "-m", "pytest", "-q", "tests/test_docs.py", "tests/test_public_api.py")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks side by side with the baselines; pass ``-- --quick`` for a short run."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """The long reliability run (minutes): 10,000 jobs per phase through ~20% mixed
    faults, SIGKILL + resume at random moments, with and without --download,
    reconciled against the mock server's record. ``-- --jobs N --kills K`` to resize."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks.soak", *session.posargs)
