"""The layers: the library core never imports the command line, the test helpers or
an integration (Redis, Ray); docs/design.md draws the map this checks."""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nebula_async"
# The Redis limiter is an integration module of its own (the one that imports redis).
INTEGRATIONS = {"_redis.py"}
CORE = sorted(
    p for p in PACKAGE.glob("_*.py") if p.name != "__init__.py" and p.name not in INTEGRATIONS
)
OUTER = (
    "nebula_async.cli",
    "nebula_async.testing",
    "nebula_async.ray",
    "nebula_async._redis",
    "redis",
    "ray",
)
# Integrations the core may reach only lazily, inside a function, where the user chose them.
LAZY_ALLOWED = {"_shared.py": ("nebula_async._redis",)}


def _imports(path: pathlib.Path, *, top_level_only: bool) -> list[str]:
    """The modules ``path`` imports, relative imports resolved against its package;
    ``from X import name`` counts as ``X`` and as ``X.name`` (which may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = ".".join(("nebula_async", *path.parent.relative_to(PACKAGE).parts))
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def _within(name: str, modules: tuple[str, ...] | set[str]) -> bool:
    """Whether ``name`` is one of ``modules`` or something inside one."""
    return any(name == module or name.startswith(module + ".") for module in modules)


@pytest.mark.parametrize("path", [*CORE, PACKAGE / "__init__.py"], ids=lambda p: p.name)
def test_the_core_never_imports_an_outer_layer(path: pathlib.Path) -> None:
    lazy = LAZY_ALLOWED.get(path.name, ())
    top_level = _imports(path, top_level_only=True)
    for name in _imports(path, top_level_only=False):
        if _within(name, lazy):
            assert name not in top_level, f"{path.name} imports {name} at import time"
        elif _within(name, OUTER):
            raise AssertionError(f"{path.name} imports {name}")


# What each block above the line may import of ours besides the core (a module and
# what is under it): the command line also itself and the test helpers (demo,
# mock-server); the test helpers nothing at all, the core included.
OUTER_BLOCKS = {
    "cli": ("nebula_async.cli", "nebula_async.testing"),
    "testing": ("nebula_async.testing",),
    "ray.py": (),
    "_redis.py": (),
}
# Names taken from the package root itself: only the command line's version.
FROM_THE_ROOT = {"cli": ("nebula_async", "nebula_async.__version__")}


def _outer_modules() -> list[pathlib.Path]:
    paths: list[pathlib.Path] = []
    for block in OUTER_BLOCKS:
        target = PACKAGE / block
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return paths


@pytest.mark.parametrize("path", _outer_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_an_outer_block_imports_only_what_the_map_allows(path: pathlib.Path) -> None:
    block = path.relative_to(PACKAGE).parts[0]
    allowed = set(OUTER_BLOCKS[block])
    if block != "testing":
        allowed |= {"nebula_async." + p.stem for p in CORE}
    for name in _imports(path, top_level_only=False):
        if not _within(name, ("nebula_async",)):
            continue  # a third-party or standard module
        if name in FROM_THE_ROOT.get(block, ()):
            continue
        assert _within(name, allowed), f"{path.relative_to(PACKAGE)} imports {name}"


# The aiohttp shell: only these two may import aiohttp (or the transport); the rest
# of the core is sans-I/O or speaks to the transport through what _client injects.
SHELL = {"_transport.py", "_client.py"}


@pytest.mark.parametrize("path", [p for p in CORE if p.name not in SHELL], ids=lambda p: p.name)
def test_only_the_shell_imports_aiohttp(path: pathlib.Path) -> None:
    for name in _imports(path, top_level_only=False):
        assert name.split(".")[0] not in {"aiohttp", "yarl"}, f"{path.name} imports {name}"
        assert name != "nebula_async._transport", f"{path.name} imports the transport"


def _core_map() -> list[str]:
    """The core modules in the order docs/design.md lists them, top to bottom."""
    design = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    block = design.split("## The layers", 1)[1].split("```", 2)[1]
    core = block.split("core (", 1)[1]
    return [line.split()[0] for line in core.splitlines() if line.startswith("  _")]


def test_the_layer_map_lists_every_core_module_once() -> None:
    listed = _core_map()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.stem for p in CORE)


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_a_core_module_imports_only_the_core_modules_below_it(path: pathlib.Path) -> None:
    order = _core_map()
    below = set(order[order.index(path.stem) + 1 :])
    lazy = LAZY_ALLOWED.get(path.name, ())
    for name in _imports(path, top_level_only=False):
        module = name.removeprefix("nebula_async.")
        if name.startswith("nebula_async._") and name not in lazy and module in order:
            assert module in below, f"{path.name} imports {module}, listed above it"
