"""Wire conversion: one configured cattrs ``Converter``.

Requests go out in one of three payload styles (DESIGN section 1)::

    dotted  {"batchImageGenerationDTO.model": "m", "batchImageGenerationDTO.n": 2, ...}
    nested  {"batchImageGenerationDTO": {"model": "m", "n": 2, ...}}
    flat    {"model": "m", "n": 2, ...}

cattrs generates one unstructure function per style with every key renamed
(``override(rename=...)`` takes any string, dots included, at no run-time cost;
attrs aliases cannot hold a dot). Required fields are always sent, optional ones
only when not None, and object fields (``promptOptions``...) pass through untouched.

Answers are not converted here: ``_protocol`` reads their one list of two
optional strings by hand, with the first problem and its JSON path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, get_args

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from ._exceptions import ValidationError
from ._models import Img2ImgRequest

__all__ = [
    "DTO_PREFIX",
    "PayloadStyle",
    "REQUIRED_FIELDS",
    "converter",
    "from_payload",
    "request_field_from_key",
    "to_payload",
    "wire_name",
]

PayloadStyle = Literal["dotted", "nested", "flat"]
PAYLOAD_STYLES: Final[tuple[str, ...]] = get_args(PayloadStyle)
DTO_PREFIX: Final = "batchImageGenerationDTO"
REQUIRED_FIELDS: Final = frozenset({"model", "prompt", "n", "size", "temperature", "watermark"})


def wire_name(attribute: str) -> str:
    """snake_case attribute -> the API's camelCase key (``prompt_options`` -> ``promptOptions``)."""
    head, *rest = attribute.split("_")
    return head + "".join(word.capitalize() for word in rest)


_FIELDS: Final = tuple(field.name for field in attrs.fields(Img2ImgRequest))
_BY_CAMEL: Final = {wire_name(name): name for name in _FIELDS}
# A flat key may be camelCase (the wire) or snake_case (Python): both map to the attribute.
_BY_FLAT_KEY: Final = {**_BY_CAMEL, **{name: name for name in _FIELDS}}
_BY_DOTTED: Final = {f"{DTO_PREFIX}.{camel}": name for camel, name in _BY_CAMEL.items()}


def _pass_through(value: Any) -> Any:
    return value


converter: Final = cattrs.Converter()
"""The one configured converter of the package."""


def _request_unstructurer(
    key_for: Callable[[str], str],
) -> Callable[[Img2ImgRequest], dict[str, Any]]:
    overrides = {}
    for name in _FIELDS:
        hook = None if name in REQUIRED_FIELDS else _pass_through
        overrides[name] = override(
            rename=key_for(name),
            omit_if_default=name not in REQUIRED_FIELDS,
            unstruct_hook=hook,
        )
    return make_dict_unstructure_fn(Img2ImgRequest, converter, **overrides)  # type: ignore[arg-type]


_dotted = _request_unstructurer(lambda name: f"{DTO_PREFIX}.{wire_name(name)}")
_flat = _request_unstructurer(wire_name)


def _nested(request: Img2ImgRequest) -> dict[str, Any]:
    return {DTO_PREFIX: _flat(request)}


_UNSTRUCTURERS: Final[dict[str, Callable[[Img2ImgRequest], dict[str, Any]]]] = {
    "dotted": _dotted,
    "nested": _nested,
    "flat": _flat,
}


def payload_encoder(style: str) -> Callable[[Img2ImgRequest], dict[str, Any]]:
    """The unstructure function of one payload style (hoisted out of the hot path)."""
    try:
        return _UNSTRUCTURERS[style]
    except KeyError:
        raise ValidationError(
            f"payload_style: must be one of {', '.join(PAYLOAD_STYLES)}, got {style!r}",
            field="payload_style",
        ) from None


def to_payload(request: Img2ImgRequest, style: str = "dotted") -> dict[str, Any]:
    """The JSON-ready body of one submission in the given payload style.

    >>> import nebula_async as na
    >>> req = na.Img2ImgRequest(model="m", prompt="a fox", n=2)
    >>> na.to_payload(req, style="flat")  # doctest: +NORMALIZE_WHITESPACE
    {'model': 'm', 'prompt': 'a fox', 'n': 2, 'size': '2048x2048',
     'temperature': 1, 'watermark': False}
    >>> list(na.to_payload(req, style="nested"))
    ['batchImageGenerationDTO']
    """
    return payload_encoder(style)(request)


def request_field_from_key(key: str) -> str | None:
    """The attribute name for a payload key in any style, or None if it is not one."""
    return _BY_DOTTED.get(key) or _BY_FLAT_KEY.get(key)


def from_payload(payload: Mapping[str, Any]) -> Img2ImgRequest:
    """Read a payload of any style (dotted, nested, or flat with camelCase or
    snake_case keys) back into a validated :class:`Img2ImgRequest`.

    Whatever the payload holds, a problem is a :class:`ValidationError` whose
    ``field`` is the payload's own key (``batchImageGenerationDTO.n``,
    ``responseFormat``...), an unknown key included.

    >>> import nebula_async as na
    >>> na.from_payload({"batchImageGenerationDTO.model": "m",
    ...                  "batchImageGenerationDTO.prompt": "p"}).prompt
    'p'
    """
    if not isinstance(payload, Mapping):
        raise ValidationError(
            f"payload must be a JSON object, got {type(payload).__name__}", field=None
        )
    nested = payload.get(DTO_PREFIX)
    if isinstance(nested, Mapping):
        extra = [key for key in payload if key != DTO_PREFIX]
        if extra:
            raise ValidationError(
                f"unknown field {_key_text(extra[0])!r} beside {DTO_PREFIX!r}",
                field=_key_text(extra[0]),
            )
        return _build(nested, _BY_CAMEL, prefix=f"{DTO_PREFIX}.", wire_prefix=f"{DTO_PREFIX}.")
    if any(isinstance(key, str) and key.startswith(DTO_PREFIX + ".") for key in payload):
        return _build(payload, _BY_DOTTED, prefix="", wire_prefix=f"{DTO_PREFIX}.")
    return _build(payload, _BY_FLAT_KEY, prefix="", wire_prefix="")


def _key_text(key: object) -> str:
    """A payload key as text for a message (keys of a JSON object are strings)."""
    return key[:100] if isinstance(key, str) else f"<{type(key).__name__} key>"


def _build(
    source: Mapping[str, Any], names: Mapping[str, str], *, prefix: str, wire_prefix: str
) -> Img2ImgRequest:
    """The request of one style's keys; ``prefix`` goes before a key in a message,
    ``wire_prefix`` before the wire name of a field the payload lacks."""
    kwargs: dict[str, Any] = {}
    keys: dict[str, str] = {}  # attribute -> the key it came as
    for key, value in source.items():
        name = names.get(key) if isinstance(key, str) else None
        if name is None:
            shown = prefix + _key_text(key)
            raise ValidationError(f"unknown field {shown!r}", field=shown)
        if name in kwargs:
            raise ValidationError(f"field {name!r} given twice", field=name)
        kwargs[name] = value
        keys[name] = prefix + key
    try:
        return Img2ImgRequest(**kwargs)
    except ValidationError as exc:
        raise _named_by_key(exc, keys, wire_prefix=wire_prefix) from None


def _named_by_key(
    exc: ValidationError, keys: Mapping[str, str], *, wire_prefix: str
) -> ValidationError:
    """``exc`` with its field (an attribute, or a path under one) spelled as the
    payload's key: ``n: ...`` read from ``batchImageGenerationDTO.n`` becomes
    ``batchImageGenerationDTO.n: ...``. A missing field is named as the wire spells it."""
    field = exc.field
    if field is None:
        return exc
    attribute = re.match(r"\w+", field)
    if attribute is None or attribute.group() not in _FIELDS:
        return exc
    name = attribute.group()
    key = keys.get(name, wire_prefix + wire_name(name))
    renamed = key + field[len(name) :]
    message = str(exc)
    if message.startswith(field):
        message = renamed + message[len(field) :]
    return ValidationError(message, field=renamed)
