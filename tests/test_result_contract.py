"""The public contract of the result classes, however a result was made.

A :class:`JobResult` or :class:`ImageResult` built by hand with keywords and one
built by the client (decoded from an answer, gathered by ``aggregate``, returned by
``run_batch``) must behave alike: real lists, the same list on every read,
mutations that stick, equality, repr, pickling, ``attrs.evolve``, ``attrs.asdict``.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, assert_type

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nebula_async as na
from nebula_async._aggregate import aggregate
from nebula_async._protocol import decipher_img2img
from nebula_async.testing import MockNebulaServer

URL1 = "https://x/1.png"
URL2 = "https://x/2.png"


def answer(*images: dict[str, str], msg: str = "ok") -> na.ImageResult:
    """An ImageResult as the client decodes it from an HTTP 200 answer."""
    body = orjson.dumps({"code": 200, "msg": msg, "data": {"images": list(images)}})
    return decipher_img2img(200, {}, body)


def gathered(*outcomes: na.ImageResult | na.NebulaError, job_id: str = "j") -> na.JobResult:
    """A JobResult as the client builds it from a job's submission outcomes."""
    return aggregate(
        job_id,
        list(outcomes),
        attempts=len(outcomes),
        retries=0,
        rate_limited=0,
        elapsed_s=0.5,
        requested_images=len(outcomes),
    )


def by_hand(
    urls: list[str],
    images: list[na.GeneratedImage],
    errors: list[na.NebulaError],
    submissions: int,
    job_id: str = "j",
) -> na.JobResult:
    return na.JobResult(
        job_id=job_id,
        urls=urls,
        images=images,
        errors=errors,
        submissions=submissions,
        attempts=submissions,
        elapsed_s=0.5,
        requested_images=submissions,
    )


def one_url_job() -> na.JobResult:
    return gathered(answer({"url": URL1}))


# Each maker returns a client-built result and its hand-built twin.
MAKERS = {
    "one url": lambda: (
        one_url_job(),
        by_hand([URL1], [na.GeneratedImage(url=URL1)], [], 1),
    ),
    "two urls": lambda: (
        gathered(answer({"url": URL1}, {"url": URL2})),
        by_hand([URL1, URL2], [na.GeneratedImage(url=URL1), na.GeneratedImage(url=URL2)], [], 1),
    ),
    "two submissions": lambda: (
        gathered(answer({"url": URL1}), answer({"url": URL2})),
        by_hand([URL1, URL2], [na.GeneratedImage(url=URL1), na.GeneratedImage(url=URL2)], [], 2),
    ),
    "b64": lambda: (
        gathered(answer({"b64_json": "QUJD"})),
        by_hand([], [na.GeneratedImage(b64_json="QUJD")], [], 1),
    ),
    "no image": lambda: (gathered(answer()), by_hand([], [], [], 1)),
    "no submission": lambda: (gathered(), by_hand([], [], [], 0)),
    "failed": lambda: (
        gathered(na.ServerError("boom", status_code=500)),
        by_hand([], [], [na.ServerError("boom", status_code=500)], 1),
    ),
    "partly failed": lambda: (
        gathered(answer({"url": URL1}), na.ServerError("boom", status_code=500)),
        by_hand(
            [URL1], [na.GeneratedImage(url=URL1)], [na.ServerError("boom", status_code=500)], 2
        ),
    ),
}


@pytest.fixture(params=sorted(MAKERS))
def pair(request: pytest.FixtureRequest) -> tuple[na.JobResult, na.JobResult]:
    made: tuple[na.JobResult, na.JobResult] = MAKERS[request.param]()
    return made


# -- construction -----------------------------------------------------------------------


def test_keyword_construction_and_defaults() -> None:
    result = na.JobResult(job_id="x")
    assert (result.urls, result.images, result.errors) == ([], [], [])
    assert (result.submissions, result.attempts, result.retries, result.rate_limited) == (0,) * 4
    assert (result.elapsed_s, result.requested_images) == (0.0, 0)
    other = na.JobResult(job_id="y")
    assert result.urls is not other.urls  # a fresh list per result, not a shared default
    assert result.images is not other.images
    assert result.errors is not other.errors


def test_given_lists_are_kept_as_given() -> None:
    urls = [URL1]
    images = [na.GeneratedImage(url=URL1)]
    errors: list[na.NebulaError] = [na.ServerError("x", status_code=500)]
    result = na.JobResult(job_id="x", urls=urls, images=images, errors=errors)
    assert result.urls is urls
    assert result.images is images
    assert result.errors is errors


def test_field_names_are_unchanged() -> None:
    assert [field.name for field in attrs.fields(na.JobResult)] == [
        "job_id",
        "urls",
        "images",
        "errors",
        "submissions",
        "attempts",
        "retries",
        "rate_limited",
        "elapsed_s",
        "requested_images",
    ]
    assert [field.name for field in attrs.fields(na.ImageResult)] == ["images", "code", "msg"]


def test_frozen() -> None:
    result = one_url_job()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.urls = []  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.images = []  # type: ignore[misc]


# -- the lists --------------------------------------------------------------------------


def test_lists_are_real_lists_read_as_the_same_object(
    pair: tuple[na.JobResult, na.JobResult],
) -> None:
    result, _ = pair
    assert_type(result.urls, list[str])
    assert_type(result.images, list[na.GeneratedImage])
    assert_type(result.errors, list[na.NebulaError])
    for name in ("urls", "images", "errors"):
        value = getattr(result, name)
        assert type(value) is list
        assert getattr(result, name) is value
    assert all(type(url) is str for url in result.urls)
    assert all(type(image) is na.GeneratedImage for image in result.images)


def test_values_match_the_hand_built_twin(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, twin = pair
    assert result.urls == twin.urls
    assert result.images == twin.images
    assert [repr(error) for error in result.errors] == [repr(error) for error in twin.errors]
    assert result.ok == twin.ok
    assert repr(result.error) == repr(twin.error)


@pytest.mark.parametrize("first", ["urls", "images", "errors"])
def test_mutations_stick_and_stay_in_their_own_list(first: str) -> None:
    """A mutation of one list shows on later reads and leaves the others alone,
    whichever list is read first."""
    result = one_url_job()
    getattr(result, first)  # read order must not matter
    result.urls.append(URL2)
    assert result.urls == [URL1, URL2]
    assert result.images == [na.GeneratedImage(url=URL1)]
    result.images.clear()
    assert result.images == []
    assert result.urls == [URL1, URL2]
    error = na.ServerError("late", status_code=500)
    result.errors.append(error)
    assert result.errors == [error]
    assert result.error is error
    assert not result.ok


def test_clearing_urls_leaves_the_images() -> None:
    result = gathered(answer({"url": URL1}, {"url": URL2}))
    result.urls.clear()
    assert result.images == [na.GeneratedImage(url=URL1), na.GeneratedImage(url=URL2)]


def test_ok_and_error() -> None:
    assert one_url_job().ok
    assert one_url_job().error is None
    error = na.ServerError("boom", status_code=500)
    failed = gathered(answer({"url": URL1}), error)
    assert not failed.ok
    assert failed.error is error
    assert failed.errors == [error]


# -- equality, repr, pickling, attrs ----------------------------------------------------


def test_equal_to_the_hand_built_twin(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, twin = pair
    # NebulaError compares by identity: give the twin the very same errors.
    twin = attrs.evolve(twin, errors=result.errors)
    assert result == twin
    assert twin == result
    assert (result != twin) is False
    assert result != attrs.evolve(twin, urls=[*twin.urls, "https://x/other.png"])
    assert result != attrs.evolve(twin, images=[*twin.images, na.GeneratedImage(url="o")])


def test_results_compare_by_value() -> None:
    assert one_url_job() == one_url_job()
    assert gathered(answer({"url": URL1})) != gathered(answer({"url": URL2}))
    assert gathered(answer({"url": URL1})) != gathered(answer({"url": URL1}), job_id="k")


def test_repr_shows_the_lists(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, twin = pair
    assert repr(result) == repr(twin)


def test_repr_format() -> None:
    assert repr(one_url_job()) == (
        "JobResult(job_id='j', urls=['https://x/1.png'], "
        "images=[GeneratedImage(url='https://x/1.png', b64_json=None)], errors=[], "
        "submissions=1, attempts=1, retries=0, rate_limited=0, elapsed_s=0.5, "
        "requested_images=1)"
    )


def test_unhashable() -> None:
    with pytest.raises(TypeError, match="unhashable"):
        hash(one_url_job())


def test_pickles(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, _ = pair
    copied = pickle.loads(pickle.dumps(result))
    assert copied.urls == result.urls
    assert copied.images == result.images
    assert [repr(e) for e in copied.errors] == [repr(e) for e in result.errors]
    assert repr(copied) == repr(result)
    assert type(copied.urls) is list
    assert copied.urls is copied.urls
    assert copied.images is copied.images


def test_pickled_state_names_the_fields() -> None:
    state = one_url_job().__getstate__()
    assert state == {
        "job_id": "j",
        "urls": [URL1],
        "images": [na.GeneratedImage(url=URL1)],
        "errors": [],
        "submissions": 1,
        "attempts": 1,
        "retries": 0,
        "rate_limited": 0,
        "elapsed_s": 0.5,
        "requested_images": 1,
    }


# pickle.dumps(JobResult(job_id="j", urls=[URL1], images=[GeneratedImage(url=URL1)],
# errors=[ServerError("boom", status_code=500)], submissions=2, attempts=3, retries=1,
# elapsed_s=0.5, requested_images=2), protocol=4) made by nebula_async 0.x: pickles of
# earlier versions keep loading.
OLD_PICKLE = (
    b"\x80\x04\x95\x80\x01\x00\x00\x00\x00\x00\x00\x8c\x14nebula_async._models\x94\x8c\tJobRes"
    b"ult\x94\x93\x94)\x81\x94}\x94(\x8c\x06job_id\x94\x8c\x01j\x94\x8c\x04urls\x94]\x94\x8c\x0f"
    b"https://x/1.png\x94a\x8c\x06images\x94]\x94h\x00\x8c\x0eGeneratedImage\x94\x93\x94)\x81"
    b"\x94}\x94(\x8c\x03url\x94h\t\x8c\x08b64_json\x94Nuba\x8c\x06errors\x94]\x94\x8c\x18nebula"
    b"_async._exceptions\x94\x8c\x08_rebuild\x94\x93\x94h\x14\x8c\x0bServerError\x94\x93\x94\x8c"
    b"\x04boom\x94\x85\x94}\x94(\x8c\x0bstatus_code\x94M\xf4\x01\x8c\x04code\x94N\x8c\x03msg\x94"
    b"\x8c\x00\x94\x8c\x0bretry_after\x94Nu\x87\x94R\x94a\x8c\x0bsubmissions\x94K\x02\x8c\x08"
    b"attempts\x94K\x03\x8c\x07retries\x94K\x01\x8c\x0crate_limited\x94K\x00\x8c\telapsed_s\x94"
    b"G?\xe0\x00\x00\x00\x00\x00\x00\x8c\x10requested_images\x94K\x02ub."
)


def test_pickles_of_earlier_versions_load() -> None:
    result = pickle.loads(OLD_PICKLE)
    assert result.urls == [URL1]
    assert result.images == [na.GeneratedImage(url=URL1)]
    assert [type(e) for e in result.errors] == [na.ServerError]
    assert result.error.status_code == 500
    assert (result.submissions, result.attempts, result.retries) == (2, 3, 1)
    assert result.images is result.images


def test_copies(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, _ = pair
    shallow = copy.copy(result)
    assert shallow == result
    assert shallow.urls is result.urls  # a shallow copy shares the lists
    deep = copy.deepcopy(result)
    assert deep.urls == result.urls
    assert deep.images == result.images
    assert deep.urls is not result.urls


def test_evolve_keeps_the_other_fields(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, _ = pair
    renamed = attrs.evolve(result, job_id="other")
    assert renamed.job_id == "other"
    assert renamed.urls == result.urls
    assert renamed.images == result.images
    assert renamed.errors == result.errors
    assert renamed.images is result.images  # evolve shares what it does not replace
    new_urls = attrs.evolve(result, urls=["https://x/new.png"])
    assert new_urls.urls == ["https://x/new.png"]
    assert new_urls.images == result.images  # images stay the old ones, as given


def test_asdict_and_astuple(pair: tuple[na.JobResult, na.JobResult]) -> None:
    result, twin = pair
    twin = attrs.evolve(twin, errors=result.errors)
    assert attrs.asdict(result) == attrs.asdict(twin)
    assert attrs.astuple(result) == attrs.astuple(twin)
    assert list(attrs.asdict(result)) == [f.name for f in attrs.fields(na.JobResult)]


# -- ImageResult --------------------------------------------------------------------------


def test_decoded_image_result_behaves_like_a_hand_built_one() -> None:
    decoded = answer({"url": URL1}, {"url": URL2})
    twin = na.ImageResult(
        images=[na.GeneratedImage(url=URL1), na.GeneratedImage(url=URL2)], msg="ok"
    )
    assert_type(decoded.images, list[na.GeneratedImage])
    assert type(decoded.images) is list
    assert decoded.images is decoded.images
    assert decoded.urls == [URL1, URL2]
    assert type(decoded.urls) is list
    assert decoded == twin
    assert repr(decoded) == repr(twin)
    assert attrs.asdict(decoded) == attrs.asdict(twin)
    assert pickle.loads(pickle.dumps(decoded)) == twin
    decoded.images.pop()
    assert decoded.urls == [URL1]


def test_image_result_urls_are_a_fresh_list() -> None:
    decoded = answer({"url": URL1})
    decoded.urls.append("x")
    assert decoded.urls == [URL1]
    assert decoded.urls is not decoded.urls


# -- BatchReport --------------------------------------------------------------------------


def test_batch_report_over_client_built_results() -> None:
    error = na.ServerError("boom", status_code=500)
    report = na.BatchReport(
        results=[
            gathered(answer({"url": URL1}), job_id="a"),
            gathered(answer({"url": URL2}, {"b64_json": "QUJD"}), job_id="b"),
            gathered(error, job_id="c"),
        ],
        elapsed_s=1.0,
        attempts=3,
        retries=0,
        rate_limited=0,
        latency_p50_s=0.5,
        latency_p95_s=0.5,
        latency_p99_s=0.5,
    )
    assert report.urls_by_job == {"a": [URL1], "b": [URL2], "c": []}
    assert (report.succeeded, report.failed, report.images) == (2, 1, 3)
    assert report.results[2].errors == [error]


@pytest.mark.anyio
async def test_run_batch_results_keep_the_contract() -> None:
    async with MockNebulaServer() as server:
        async with na.NebulaClient(token="mock-token", base_url=server.base_url) as client:
            requests = [
                na.Img2ImgRequest(model="m", prompt=f"p{i}", image="https://e.com/i.png", n=n)
                for i, n in enumerate([1, 2, 1])
            ]
            report = await client.run_batch(requests)
    assert (report.succeeded, report.failed, report.images) == (3, 0, 4)
    for result in report.results:
        assert type(result.urls) is list
        assert result.urls is result.urls
        assert result.errors == []
        assert result.errors is result.errors
        assert result.images == [na.GeneratedImage(url=url) for url in result.urls]
        assert report.urls_by_job[result.job_id] == result.urls
        assert pickle.loads(pickle.dumps(result)) == result
        assert str(result.urls) in repr(result)


# -- any mix of outcomes --------------------------------------------------------------------

urls = st.text(alphabet="abc/:.", min_size=1, max_size=8).map(lambda s: "https://h/" + s)
wire_images = st.one_of(
    urls.map(lambda url: {"url": url}),
    st.text(alphabet="QUJD", min_size=4, max_size=8).map(lambda b: {"b64_json": b}),
)
outcomes = st.lists(
    st.one_of(
        st.lists(wire_images, max_size=4).map(lambda images: answer(*images)),
        st.builds(lambda: na.ServerError("boom", status_code=503)),
    ),
    max_size=4,
)


def eager(outcomes: list[na.ImageResult | na.NebulaError]) -> na.JobResult:
    """What aggregate() must give: plain lists gathered by hand."""
    images = [
        image
        for outcome in outcomes
        if isinstance(outcome, na.ImageResult)
        for image in outcome.images
    ]
    errors = [outcome for outcome in outcomes if isinstance(outcome, na.NebulaError)]
    return by_hand(
        [image.url for image in images if image.url is not None],
        images,
        errors,
        len(outcomes),
    )


@settings(max_examples=200, deadline=None)
@given(outcomes, st.sampled_from(["urls", "images", "errors", "repr", "eq", "pickle"]))
def test_any_outcomes_give_what_plain_lists_would(
    outcomes: list[na.ImageResult | na.NebulaError], first: str
) -> None:
    result = gathered(*outcomes)
    twin = eager(outcomes)
    # Whatever is looked at first, the result then matches its plain-list twin.
    look: dict[str, Any] = {
        "urls": lambda: result.urls,
        "images": lambda: result.images,
        "errors": lambda: result.errors,
        "repr": lambda: repr(result),
        "eq": lambda: result == twin,
        "pickle": lambda: pickle.dumps(result),
    }
    look[first]()
    assert result == twin
    assert repr(result) == repr(twin)
    assert attrs.asdict(result) == attrs.asdict(twin)
    assert pickle.loads(pickle.dumps(result)).urls == twin.urls
    assert (result.ok, result.error) == (twin.ok, twin.error)
    assert result.urls is result.urls
    assert result.images is result.images
    assert result.errors is result.errors
