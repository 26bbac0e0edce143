"""mkdocs hook: the generated parts of the reference pages.

A page holding ``<!-- api-reference: MODULE -->`` gets one mkdocstrings block per
name of ``MODULE.__all__``, grouped under headings (a name exported later lands in
its group, or under "Other", by itself: the page cannot miss a public name).
``<!-- cli-reference -->`` becomes the help of ``nebula-async`` and of each of its
subcommands, as ``nebula_async.cli.build_parser()`` prints it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
from typing import Any

#: Where each public name of nebula_async is shown, in reading order.
API_GROUPS: dict[str, list[str]] = {
    "The client": ["NebulaClient", "JobStream", "ClientStatistics"],
    "Requests and jobs": ["Img2ImgRequest", "Job", "to_payload", "from_payload"],
    "Results": ["ImageResult", "GeneratedImage", "JobResult", "BatchReport"],
    "Options": ["RateLimit", "SharedRateLimit", "RetryPolicy", "Timeout"],
    "Rate limiter protocol": ["Limiter", "LimiterFactory", "Outcome", "LimiterStatistics"],
    "Errors": [
        "NebulaError",
        "ValidationError",
        "APIConnectionError",
        "APITimeoutError",
        "ResponseDecodeError",
        "NotAttemptedError",
        "ClientStateError",
        "APIStatusError",
        "AuthenticationError",
        "RateLimitError",
        "BadRequestError",
        "ServerError",
    ],
}

#: Objects the API hands out or raises that ``nebula_async`` does not export yet:
#: shown from their module until they are in ``__all__`` (then from there).
REACHABLE: dict[str, str] = {}

#: Options for single blocks: a stream is made by ``client.stream()``, never by hand,
#: so its constructor is left out.
BLOCK_OPTIONS: dict[str, str] = {
    "JobStream": "    options:\n      merge_init_into_class: false\n",
}

#: Text under a group's heading.
GROUP_INTROS: dict[str, str] = {
    "Errors": (
        "Everything the library raises, or keeps in a `JobResult`, is a `NebulaError`:\n\n"
        "```text\n{hierarchy}\n```\n"
    ),
}

_API_MARKER = re.compile(r"<!-- api-reference: ([\w.]+) -->")
_CLI_MARKER = "<!-- cli-reference -->"
_HELP_WIDTH = 88


def _public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    return [name for name in module.__all__ if not name.startswith("__")]


def _block(identifier: str) -> str:
    name = identifier.rsplit(".", 1)[-1]
    return f"::: {identifier}\n{BLOCK_OPTIONS.get(name, '')}"


def _error_hierarchy() -> str:
    """The tree drawn in the docstring of the errors module (one source for both)."""
    from nebula_async import _exceptions

    doc = _exceptions.__doc__ or ""
    tree = doc.split("::", 1)[1].split("\n\n")[1]
    return "\n".join(line[4:] for line in tree.splitlines()).replace("``", "")


def _intro(title: str) -> str:
    text = GROUP_INTROS.get(title)
    return "" if text is None else text.format(hierarchy=_error_hierarchy()) + "\n"


def api_reference_markdown(module_name: str) -> str:
    """The mkdocstrings blocks for every public name of ``module_name``."""
    names = _public_names(module_name)
    if module_name != "nebula_async":
        return "\n".join(_block(f"{module_name}.{name}") for name in names)
    exported = set(names)
    shown: set[str] = set()
    parts: list[str] = []
    for title, group in API_GROUPS.items():
        blocks = []
        for name in group:
            if name in exported:
                blocks.append(_block(f"nebula_async.{name}"))
            elif name in REACHABLE:
                blocks.append(_block(f"{REACHABLE[name]}.{name}"))
            else:
                continue  # not built yet (SharedRateLimit lands with the Redis work)
            shown.add(name)
        if blocks:
            parts.append(f"## {title}\n\n{_intro(title)}" + "\n".join(blocks))
    rest = [name for name in names if name not in shown]
    if rest:
        parts.append("## Other\n\n" + "\n".join(_block(f"nebula_async.{n}") for n in rest))
    return "\n".join(parts)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public way to list subparsers; _actions is stable since 3.2.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    # A fixed width, so the page does not depend on the terminal that built it.
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=_HELP_WIDTH)
    return parser.format_help().rstrip()


def cli_reference_markdown() -> str:
    """The help of ``nebula-async`` and of each subcommand, from the real parser."""
    from nebula_async.cli import build_parser

    parser = build_parser()
    parts = ["## nebula-async\n", f"```text\n{_help(parser)}\n```\n"]
    for name, subparser in _subcommands(parser).items():
        parts += [f"## nebula-async {name}\n", f"```text\n{_help(subparser)}\n```\n"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """mkdocs event: fill the markers of a page before it is rendered."""
    markdown = _API_MARKER.sub(lambda m: api_reference_markdown(m.group(1)), markdown)
    if _CLI_MARKER in markdown:
        markdown = markdown.replace(_CLI_MARKER, cli_reference_markdown())
    return markdown
