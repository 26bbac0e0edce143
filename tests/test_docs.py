"""The docs cannot drift from the code.

- Every ```python block of README.md and of every page under docs/ runs as
  written, in a fresh temporary directory. Examples start their own
  MockNebulaServer on 127.0.0.1; those written for the real service (credentials
  and address from the environment) get NEBULA_TOKEN and NEBULA_BASE_URL pointing
  at a mock server run for this module on loopback.
- Every ``nebula-async ...`` line of a ```sh block parses with the real argument
  parser (synopsis lines with ``[optional]`` parts or ``...`` are skipped), and
  every line of a ```json block (job lines, result lines) is a JSON object.
- The API reference page lists every public name; the docstring rewriting that
  renders the reference is checked on the forms the package uses.

``mkdocs build --strict`` itself runs in ``nox -s docs`` (it needs the docs extra).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shlex
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import orjson
import pytest

import nebula_async
import nebula_async.testing
from nebula_async.cli import build_parser
from nebula_async.testing import MockNebulaServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _blocks(language: str) -> list[tuple[str, str, int]]:
    """(name, code, first line number) of every fenced block in ``language``."""
    found = []
    for path in _pages():
        text = path.read_text(encoding="utf-8")
        number = 0
        for match in FENCE.finditer(text):
            if match.group(1) != language:
                continue
            number += 1
            line = text.count("\n", 0, match.start(2)) + 1
            found.append((f"{path.relative_to(ROOT)}#{number}", match.group(2), line))
    return found


EXAMPLES = _blocks("python")


@pytest.fixture(scope="module")
def service() -> Iterator[MockNebulaServer]:
    """A mock server on loopback in a thread of its own, standing in for the service."""
    ready = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        box["stop"], box["loop"] = stop, asyncio.get_running_loop()
        async with MockNebulaServer(latency=0.01) as server:
            box["server"] = server
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the mock server did not start"
    server = box["server"]
    assert isinstance(server, MockNebulaServer)
    yield server
    loop = box["loop"]
    assert isinstance(loop, asyncio.AbstractEventLoop)
    loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
    thread.join(10)


def test_the_readme_and_the_site_have_examples() -> None:
    names = [name for name, _, _ in EXAMPLES]
    assert any(name.startswith("README.md") for name in names)
    assert sum(name.startswith("docs/") for name in names) >= 20


@pytest.mark.parametrize(("name", "code", "line"), EXAMPLES, ids=[name for name, _, _ in EXAMPLES])
def test_example_runs(
    name: str,
    code: str,
    line: int,
    service: MockNebulaServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in ("NEBULA_TOKEN", "NEBULA_USERNAME", "NEBULA_PASSWORD", "NEBULA_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    for_the_service = "MockNebulaServer(" not in code and "NebulaClient(" in code
    if for_the_service:  # written for the real service: give it the stand-in's address
        monkeypatch.setenv("NEBULA_TOKEN", "mock-token")
        monkeypatch.setenv("NEBULA_BASE_URL", service.base_url)
    sent_before = service.request_count
    # Line numbers in a traceback point into the page.
    exec(compile("\n" * (line - 1) + code, name.split("#")[0], "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out or "print(" not in code
    if for_the_service and "async with na.NebulaClient(" in code:
        assert service.request_count > sent_before, "the example sent nothing"


def _command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for name, code, _ in _blocks("sh"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)  # VAR=value nebula-async ...
            if not words or words[0] != "nebula-async" or "[" in line or "..." in line:
                continue
            found.append((name, words[1:]))
    return found


COMMANDS = _command_lines()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize(
    ("name", "argv"), COMMANDS, ids=[f"{name}: {' '.join(argv)}" for name, argv in COMMANDS]
)
def test_command_line_parses(
    name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code: object = None
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or --version exit 0; a usage error exits 2
        code = exc.code
    assert code in (None, 0), f"{name}: nebula-async {' '.join(argv)}: {capsys.readouterr().err}"


JSON_LINES = [
    (name, line) for name, code, _ in _blocks("json") for line in code.splitlines() if line.strip()
]


@pytest.mark.parametrize(("name", "line"), JSON_LINES, ids=[name for name, _ in JSON_LINES])
def test_json_lines_are_json_objects(name: str, line: str) -> None:
    # Job lines and result lines are shown one JSON object a line, as the files hold them.
    assert isinstance(orjson.loads(line), dict), name


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / "hooks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("module", [nebula_async, nebula_async.testing], ids=lambda m: m.__name__)
def test_the_api_reference_shows_every_public_name(module: ModuleType) -> None:
    page = _hook("reference").api_reference_markdown(module.__name__)
    shown = set(re.findall(r"^::: [\w.]*\.(\w+)$", page, re.MULTILINE))
    public = {name for name in module.__all__ if not name.startswith("__")}
    assert public <= shown
    assert len(re.findall(r"^::: ", page, re.MULTILINE)) == len(shown)  # each once


def test_the_cli_reference_shows_every_subcommand() -> None:
    page = _hook("reference").cli_reference_markdown()
    for command in ("run", "demo", "submit", "mock-server"):
        assert f"## nebula-async {command}\n" in page
        assert f"usage: nebula-async {command}" in page


def test_docstrings_are_rewritten_for_markdown() -> None:
    convert = _hook("griffe_docstrings").convert
    text = (
        "Raises :class:`~nebula_async.ClientStateError` (see :meth:`stream`).\n\n"
        ">>> 1 + 1  # doctest: +SKIP\n2\n\nExample::\n\n    code\n"
    )
    assert convert(text) == (
        "Raises `ClientStateError` (see `stream`).\n\n"
        "```pycon\n>>> 1 + 1\n2\n```\n\nExample:\n\n    code"
    )
