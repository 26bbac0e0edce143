"""Matching a jobs file against a results file (pure logic: no server, no client)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nebula_async._models import Img2ImgRequest, Job
from nebula_async.cli._jobfile import JobLine
from nebula_async.cli._plan import Action, Move, decide, plan_jobs
from nebula_async.cli._results import Kind, Recorded, ResumeState


def line(line_no: int, fingerprint: str, job_id: str | None = None) -> JobLine:
    job = Job(Img2ImgRequest(model="m", prompt=fingerprint), id=job_id or str(line_no))
    return JobLine(line_no, job, fingerprint)


def entry(fingerprint: str | None, kind: Kind = Kind.OK, *, default_id: bool = True) -> Recorded:
    return Recorded(fingerprint, kind, offset=0, results_line=1, default_id=default_id,
                    downloaded=False)  # fmt: skip


def state_of(entries: dict[str, Recorded]) -> ResumeState:
    return ResumeState(entries=dict(entries))


def test_decide_follows_the_kind_only_for_the_same_job() -> None:
    assert decide(None, "f", download=False) is Action.SEND
    assert decide(entry("g"), "f", download=False) is Action.SEND  # edited
    assert decide(entry("f"), "f", download=False) is Action.DONE
    assert decide(entry(None), "f", download=False) is Action.DONE  # an old line: by id
    assert decide(entry("f"), "f", download=True) is Action.FETCH  # ok, never downloaded
    assert decide(entry("f", Kind.REPAIR), "f", download=False) is Action.NOT_DOWNLOADED
    assert decide(entry("f", Kind.REPAIR), "f", download=True) is Action.FETCH
    assert decide(entry("f", Kind.PARTIAL), "f", download=False) is Action.RESUME
    assert decide(entry("f", Kind.FAILED), "f", download=False) is Action.SEND


def test_identical_default_id_jobs_that_moved_take_distinct_lines() -> None:
    # Recorded: 1..8, lines 3 and 7 alike ("F"). A job was inserted at the top.
    recorded = {str(i): entry(f"f{i}") for i in range(1, 9)} | {"3": entry("F"), "7": entry("F")}
    shifted = [line(int(job_id) + 1, str(e.fingerprint)) for job_id, e in recorded.items()]
    jobs = [line(1, "new"), *shifted]
    plan = plan_jobs(jobs, state_of(recorded), download=False)
    assert plan.to_send == 1
    assert plan.done == 8
    assert sorted((m.job_id, m.source) for m in plan.moves if m.job_id in ("4", "8")) == [
        ("4", "3"),
        ("8", "7"),
    ]
    assert not plan.refused


def test_an_exact_match_is_never_taken_by_a_moved_job() -> None:
    recorded = {"3": entry("F"), "7": entry("F")}
    jobs = [line(3, "F"), line(4, "F")]  # 3 is where it was; 4 is a copy, moved or new
    plan = plan_jobs(jobs, state_of(recorded), download=False)
    assert plan.moves == [Move(4, "4", "7")]
    assert plan.done == 2


def test_named_ids_failed_lines_and_other_files() -> None:
    recorded = {"a": entry("F", default_id=False), "1": entry("G", Kind.FAILED)}
    # A job named "x" never takes over another id's line, nor does anyone take a failure.
    plan = plan_jobs([line(1, "G", "x"), line(2, "F", "y")], state_of(recorded), download=False)
    assert (plan.to_send, plan.moves, plan.mismatch) == (2, [], None)
    # Every id recorded for another job, none matching: another jobs file.
    plan = plan_jobs([line(1, "H")], state_of({"1": entry("F")}), download=False)
    assert plan.refused
    assert plan.mismatch is not None
    assert plan.mismatch.line_no == 1
    plan = plan_jobs([line(1, "H"), line(2, "F2")], state_of({"1": entry("F"), "2": entry("F2")}),
                     download=False)  # fmt: skip
    assert not plan.refused  # one job matches: an edit, not another file


def test_a_moved_job_keeps_what_its_line_says() -> None:
    recorded = {"1": entry("P", Kind.PARTIAL), "2": entry("R", Kind.REPAIR)}
    plan = plan_jobs([line(1, "new"), line(2, "P"), line(3, "R")], state_of(recorded),
                     download=True)  # fmt: skip
    assert [(m.job_id, m.source) for m in plan.moves] == [("2", "1"), ("3", "2")]
    assert plan.fetches == [("3", 3)]  # generated: its images are fetched, not generated
    assert plan.to_send == 2  # "new", and "P" for the images it lacks


@given(
    recorded=st.lists(st.sampled_from("ABCD"), max_size=12),
    jobs=st.lists(st.sampled_from("ABCDE"), max_size=12),
)
def test_no_recorded_line_is_reused_twice(recorded: list[str], jobs: list[str]) -> None:
    state = state_of({str(i): entry(fp) for i, fp in enumerate(recorded, start=1)})
    lines = [line(i, fp) for i, fp in enumerate(jobs, start=1)]
    plan = plan_jobs(lines, state, download=False)
    exact = {
        item.job_id
        for item in lines
        if item.job_id in state.entries
        and state.entries[item.job_id].fingerprint == item.fingerprint
    }
    sources = [move.source for move in plan.moves]
    assert len(sources) == len(set(sources))
    assert not set(sources) & exact
    for move in plan.moves:
        assert state.entries[move.source].fingerprint == jobs[move.line_no - 1]
    assert plan.done + plan.to_send == len(lines)
    # Every recorded fingerprint is reused as often as it can be, and no more.
    for fp in "ABCD":
        reused = sum(1 for i in exact if state.entries[i].fingerprint == fp)
        reused += sum(1 for s in sources if state.entries[s].fingerprint == fp)
        assert reused == min(recorded.count(fp), jobs.count(fp))
