"""A griffe extension: the package's reST-flavoured docstrings, rendered as Markdown.

The docstrings are written for ``help()`` and doctest (``:class:`~x.Y```` roles,
bare ``>>>`` examples, ``Example::`` blocks). mkdocstrings renders Markdown, where a
bare ``>>>`` would become nested block quotes. This extension, run by griffe as it
loads the package, turns roles into code spans and doctest runs into ``pycon``
fences; the docstrings themselves stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :class:`~nebula_async.ClientStateError` -> `ClientStateError`; :meth:`stream` -> `stream`
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj):`~?([^`]+)`")


def _role_to_code(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).count("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _fence_doctests(text: str) -> str:
    """Wrap every run of ``>>>`` lines (and their output, up to a blank line) in a fence."""
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.lstrip()
        if not stripped.startswith(">>>"):
            out.append(line)
            index += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block: list[str] = []
        while index < len(lines) and lines[index].strip():
            block.append(lines[index][len(indent) :])
            index += 1
        out.extend([f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"])
    return "\n".join(out)


def convert(text: str) -> str:
    """The Markdown form of one docstring."""
    text = _ROLE.sub(_role_to_code, text)
    text = re.sub(r"\s*# doctest: \+\w+", "", text)
    # "Example::" ends a reST paragraph that introduces a literal block; Markdown
    # needs only the colon (the indented block after it is already code).
    text = re.sub(r"::$", ":", text, flags=re.MULTILINE)
    return _fence_doctests(text)


class ReSTRoles(griffe.Extension):
    """Rewrite each loaded object's docstring for Markdown (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
