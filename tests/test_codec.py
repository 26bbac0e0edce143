"""The cattrs codec: three payload styles, exact round trips, strict answers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nebula_async as na
from nebula_async._codec import DTO_PREFIX, wire_name

STYLES = ["dotted", "nested", "flat"]


def test_wire_names() -> None:
    assert wire_name("model") == "model"
    assert wire_name("prompt_options") == "promptOptions"
    assert wire_name("sequential_image_generation_options") == "sequentialImageGenerationOptions"


def test_dotted_payload_is_the_default_and_exact() -> None:
    request = na.Img2ImgRequest(
        model="m", prompt="p", n=2, image="https://x.example/in.png", response_format="url"
    )
    assert na.to_payload(request) == {
        "batchImageGenerationDTO.model": "m",
        "batchImageGenerationDTO.prompt": "p",
        "batchImageGenerationDTO.n": 2,
        "batchImageGenerationDTO.size": "2048x2048",
        "batchImageGenerationDTO.temperature": 1,
        "batchImageGenerationDTO.watermark": False,
        "batchImageGenerationDTO.image": "https://x.example/in.png",
        "batchImageGenerationDTO.responseFormat": "url",
    }


def test_required_fields_are_sent_at_their_defaults() -> None:
    # cattrs' omit_if_default would drop n=1; the API requires it.
    payload = na.to_payload(na.Img2ImgRequest(model="m", prompt="p"), style="flat")
    assert payload == {
        "model": "m",
        "prompt": "p",
        "n": 1,
        "size": "2048x2048",
        "temperature": 1,
        "watermark": False,
    }


def test_nested_style() -> None:
    payload = na.to_payload(na.Img2ImgRequest(model="m", prompt="p"), style="nested")
    assert list(payload) == [DTO_PREFIX]
    assert payload[DTO_PREFIX]["model"] == "m"


def test_object_fields_are_sent_as_given_and_owned_by_the_request() -> None:
    options = {"max_images": 3, "nested": {"deep": [1, 2, {"k": None}], "pair": (1, 2)}}
    request = na.Img2ImgRequest(
        model="m", prompt="p", sequential_image_generation_options=options, prompt_options={"a": 1}
    )
    payload = na.to_payload(request, style="flat")
    sent = {"max_images": 3, "nested": {"deep": [1, 2, {"k": None}], "pair": [1, 2]}}
    assert payload["sequentialImageGenerationOptions"] == sent
    assert payload["promptOptions"] == {"a": 1}
    # A copy: a later change to the caller's dict cannot make the request unencodable.
    options["nested"]["deep"].append({1, 2})  # type: ignore[index]
    assert na.to_payload(request, style="flat")["sequentialImageGenerationOptions"] == sent


def test_unknown_style_is_refused() -> None:
    with pytest.raises(na.ValidationError, match="payload_style"):
        na.to_payload(na.Img2ImgRequest(model="m", prompt="p"), style="xml")


def test_from_payload_accepts_snake_case_flat_keys() -> None:
    request = na.from_payload({"model": "m", "prompt": "p", "response_format": "b64_json"})
    assert request.response_format == "b64_json"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"model": "m", "prompt": "p", "colour": "red"}, "colour"),
        (
            {"batchImageGenerationDTO.model": "m", "batchImageGenerationDTO.prompt": "p", "x": 1},
            "x",
        ),
        (
            {"batchImageGenerationDTO.model": "m", "batchImageGenerationDTO.colour": 1},
            "batchImageGenerationDTO.colour",
        ),
        ({DTO_PREFIX: {"model": "m", "prompt": "p", "bogus": 1}}, "batchImageGenerationDTO.bogus"),
        ({"model": "m", "prompt": "p", "n": 0}, "n"),
        # A bad value is named by the key it came as, in every style.
        ({"model": "m", "prompt": "p", "responseFormat": []}, "responseFormat"),
        ({"model": "m", "prompt": "p", "response_format": []}, "response_format"),
        (
            {f"{DTO_PREFIX}.model": "m", f"{DTO_PREFIX}.prompt": "p", f"{DTO_PREFIX}.n": 0},
            f"{DTO_PREFIX}.n",
        ),
        ({DTO_PREFIX: {"model": "m", "prompt": "p", "score": 10**400}}, f"{DTO_PREFIX}.score"),
        (
            {"model": "m", "prompt": "p", "promptOptions": {"a": [{1, 2}]}},
            "promptOptions.a[0]",
        ),
        # A missing field is named as the style spells it.
        ({f"{DTO_PREFIX}.model": "m"}, f"{DTO_PREFIX}.prompt"),
        ({DTO_PREFIX: {"prompt": "p"}}, f"{DTO_PREFIX}.model"),
        ({"prompt": "p"}, "model"),
        ({1: "m"}, "<int key>"),
    ],
)
def test_from_payload_names_the_bad_key(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(na.ValidationError) as info:
        na.from_payload(payload)
    assert info.value.field == field
    assert field in str(info.value)


def test_from_payload_refuses_a_field_given_twice() -> None:
    with pytest.raises(na.ValidationError, match="twice"):
        na.from_payload(
            {"model": "m", "prompt": "p", "responseFormat": "url", "response_format": "url"}
        )


# Characters the request's text fields take: no controls (C0, DEL, C1), no lone surrogates.
LINE_CHARS = st.characters(blacklist_categories=("Cc", "Cs"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)

requests = st.builds(
    na.Img2ImgRequest,
    model=st.text(LINE_CHARS, min_size=1, max_size=20).filter(str.strip),
    prompt=st.text(LINE_CHARS | st.sampled_from("\t\n\r"), min_size=1, max_size=80).filter(
        str.strip
    ),
    n=st.integers(1, 15),
    size=st.sampled_from(["1K", "2K", "3K", "4K", "2048x2048", "1024x768", "100x1600"]),
    watermark=st.booleans(),
    image=st.none() | st.sampled_from(["https://x.example/a.png", "data:image/png;base64,AAAA"]),
    prompt_options=st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    optimize_prompt=st.none() | st.text(LINE_CHARS, max_size=10),
    quality=st.none() | st.text(LINE_CHARS, max_size=10),
    response_format=st.none() | st.sampled_from(["url", "b64_json"]),
    score=st.none()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False),
    temperature=st.integers(-(2**63), 2**64 - 1),
    sequential_image_generation=st.none() | st.sampled_from(["auto", "disabled"]),
    sequential_image_generation_options=st.none()
    | st.fixed_dictionaries({"max_images": st.integers(1, 15)}),
)


@given(request=requests, style=st.sampled_from(STYLES))
def test_round_trip_is_exact(request: na.Img2ImgRequest, style: str) -> None:
    payload = na.to_payload(request, style=style)
    assert na.from_payload(payload) == request
    # ...and through JSON bytes, as it travels.
    assert na.from_payload(orjson.loads(orjson.dumps(payload))) == request
    optional_none = [
        name
        for name in ("image", "quality", "score", "response_format")
        if getattr(request, name) is None
    ]
    flat = na.to_payload(request, style="flat")
    assert all(wire_name(name) not in flat for name in optional_none)
