"""The independent check of an img2img body (DESIGN section 1).

Written from the API's docs, not from the client's codec, on purpose: it is the
check of that codec, so it must not share its code or its mistakes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import orjson

__all__ = ["FIELDS", "PREFIX", "PayloadStyle", "check_payload", "field_of"]

PayloadStyle = Literal["dotted", "nested", "flat", "any"]

PREFIX: Final = "batchImageGenerationDTO"


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python, but JSON true is not a number on the wire.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_object(v: Any) -> bool:
    return isinstance(v, dict)


#: camelCase wire key -> (required, check, what the check wants)
FIELDS: Final[dict[str, tuple[bool, Callable[[Any], bool], str]]] = {
    "model": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "prompt": (True, _is_str, "a string"),
    "n": (True, lambda v: _is_int(v) and 1 <= v <= 15, "an integer from 1 to 15"),
    "size": (True, _is_str, "a string"),
    "temperature": (True, _is_int, "an integer"),
    "watermark": (True, lambda v: isinstance(v, bool), "a boolean"),
    "image": (False, _is_str, "a string"),
    "promptOptions": (False, _is_object, "an object"),
    "optimizePrompt": (False, _is_str, "a string"),
    "quality": (False, _is_str, "a string"),
    "responseFormat": (
        False,
        lambda v: isinstance(v, str) and v in ("url", "b64_json"),
        '"url" or "b64_json"',
    ),
    "score": (False, _is_number, "a number"),
    "sequentialImageGeneration": (False, _is_str, "a string"),
    "sequentialImageGenerationOptions": (False, _is_object, "an object"),
}
_SNAKE_TO_CAMEL: Final = {re.sub(r"([A-Z])", r"_\1", k).lower(): k for k in FIELDS}


def _detect_style(payload: Mapping[str, Any]) -> Literal["dotted", "nested", "flat"]:
    if PREFIX in payload:
        return "nested"
    if any(k.startswith(PREFIX + ".") for k in payload):
        return "dotted"
    return "flat"


def _shown(v: Any) -> str:
    text = orjson.dumps(v).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(
    payload: dict[str, Any], style: Literal["dotted", "nested", "flat"], problems: list[str]
) -> dict[str, Any] | None:
    """The fields by camelCase key, or None when the body's shape is already wrong."""
    if style == "flat":
        return payload
    if style == "dotted":
        prefix = PREFIX + "."
        fields: dict[str, Any] = {}
        for key, value in payload.items():
            if key.startswith(prefix) and len(key) > len(prefix):
                fields[key[len(prefix) :]] = value
            else:
                problems.append(f"unknown field {key}")
        return fields
    problems.extend(f"unknown field {key}" for key in payload if key != PREFIX)
    if PREFIX not in payload:
        problems.append(f"missing required field {PREFIX}")
        return None
    inner = payload[PREFIX]
    if not isinstance(inner, dict):
        problems.append(f"{PREFIX} must be an object, got {_shown(inner)}")
        return None
    return inner


def check_payload(payload: Any, style: PayloadStyle) -> tuple[dict[str, Any], list[str]]:
    """Check an img2img body against the wire schema of ``style``.

    Returns the fields by camelCase key and the list of problems (empty when the
    body is valid); each problem names the full wire key.
    """
    if not isinstance(payload, dict):
        return {}, ["request body must be a JSON object"]
    shape = _detect_style(payload) if style == "any" else style
    problems: list[str] = []
    fields = _unwrap(payload, shape, problems)
    if fields is None:
        return {}, problems
    prefix = "" if shape == "flat" else PREFIX + "."
    for key, value in fields.items():
        spec = FIELDS.get(key)
        if spec is None:
            problems.append(f"unknown field {prefix}{key}")
        elif not spec[1](value):
            problems.append(f"{prefix}{key} must be {spec[2]}, got {_shown(value)}")
    problems.extend(
        f"missing required field {prefix}{key}"
        for key, (required, _, _) in FIELDS.items()
        if required and key not in fields
    )
    return fields, problems


def field_of(payload: Mapping[str, Any] | None, name: str) -> Any:
    """A request field of ``payload`` by its snake_case or camelCase name, whatever the
    payload style; None when it was not sent. KeyError for a name that is no field."""
    camel = _SNAKE_TO_CAMEL.get(name) or (name if name in FIELDS else None)
    if camel is None:
        raise KeyError(f"unknown img2img field {name!r}; known: {sorted(_SNAKE_TO_CAMEL)}")
    if payload is None:
        return None
    dotted = f"{PREFIX}.{camel}"
    if dotted in payload:
        return payload[dotted]
    inner = payload.get(PREFIX)
    if isinstance(inner, dict):
        return inner.get(camel)
    return payload.get(camel)
