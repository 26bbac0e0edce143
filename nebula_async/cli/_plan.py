"""Which jobs of a jobs file a run sends, reuses or repairs, given the results file.

A recorded line is reused only by the job it answers: same id and same
fingerprint (:func:`nebula_async._jobs.job_fingerprint`). An edited job (same id,
another fingerprint) is sent again and its new line supersedes the old one. Jobs
known by their line number (default ids) are also found when they moved: insert
a line at the top and every later job's id shifts by one, but its fingerprint
does not, so it is matched to the recorded line of the same fingerprint that no
other job claims (:class:`Move`), and that line is recorded again under its new
id before anything is sent. Lines written before fingerprints existed match by
id alone.

A results file that shares ids with the jobs file but not a single job is taken
for one written from another jobs file and refused (:attr:`Plan.mismatch`),
unless ``--replace-mismatched`` is given.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._jobfile import BadLine, JobLine
from ._results import Kind, Recorded, ResumeState

__all__ = ["Action", "Mismatch", "Move", "Plan", "decide", "plan_jobs"]


class Action(enum.Enum):
    """What a run does with one job of the jobs file."""

    SEND = "send"  #: generate it (new, edited, or failed with nothing kept)
    RESUME = "resume"  #: generate only the images its failed line lacks
    DONE = "done"  #: reuse its ok line
    FETCH = "fetch"  #: generated already: save the images its line records (--download)
    NOT_DOWNLOADED = "not_downloaded"  #: generated, images pending, no --download: left alone


def decide(entry: Recorded | None, fingerprint: str, *, download: bool) -> Action:
    """The :class:`Action` for a job whose id's current line is ``entry`` (None: no line)."""
    if entry is None or entry.fingerprint not in (None, fingerprint):
        return Action.SEND
    if entry.kind is Kind.OK:
        return Action.FETCH if download and not entry.downloaded else Action.DONE
    if entry.kind is Kind.REPAIR:
        return Action.FETCH if download else Action.NOT_DOWNLOADED
    return Action.RESUME if entry.kind is Kind.PARTIAL else Action.SEND


@dataclass(frozen=True, slots=True)
class Move:
    """A default-id job found under another id: ``source``'s line is recorded again
    as ``job_id``'s (input line ``line_no``)."""

    line_no: int
    job_id: str
    source: str


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The first input line whose id is recorded for a different job."""

    line_no: int
    job_id: str
    results_line: int


@dataclass(slots=True)
class Plan:
    """What the checking pass found: counts, bad lines, moves, repairs, mismatch."""

    good: int = 0
    bad: list[BadLine] = field(default_factory=list)
    done: int = 0
    to_send: int = 0
    not_downloaded: int = 0
    matched: int = 0  #: jobs reusing a recorded line (exact, moved or by id alone)
    unfingerprinted: int = 0  #: of them, matched by id alone (an older results file)
    #: Jobs whose recorded images are to be saved: (job id, input line).
    fetches: list[tuple[str, int]] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    mismatch: Mismatch | None = None

    def count(self, action: Action, job_id: str, line_no: int) -> None:
        """Count one job's action."""
        if action is Action.DONE:
            self.done += 1
        elif action is Action.FETCH:
            self.fetches.append((job_id, line_no))
        elif action is Action.NOT_DOWNLOADED:
            self.not_downloaded += 1
        else:
            self.to_send += 1

    @property
    def refused(self) -> bool:
        """Whether the results file looks written from another jobs file."""
        return self.mismatch is not None and self.matched == 0


def _movable(state: ResumeState) -> dict[str, list[str]]:
    """Fingerprint -> ids of the lines a moved default-id job may take over (their
    ids were line numbers, and they hold something: ok, generated, or partly)."""
    movable: dict[str, list[str]] = {}
    for job_id, entry in state.entries.items():
        if entry.fingerprint is not None and entry.default_id and entry.kind is not Kind.FAILED:
            movable.setdefault(entry.fingerprint, []).append(job_id)
    return movable


def plan_jobs(lines: Iterable[JobLine | BadLine], state: ResumeState, *, download: bool) -> Plan:
    """Match every line of the jobs file against ``state`` (one streaming pass;
    the moves are settled after it, once every exact match has claimed its line)."""
    plan = Plan()
    movable = _movable(state)
    claimed: set[str] = set()  # recorded ids some job reuses
    may_have_moved: list[JobLine] = []
    for item in lines:
        if isinstance(item, BadLine):
            plan.bad.append(item)
            continue
        plan.good += 1
        entry = state.entries.get(item.job_id)
        if entry is not None and entry.fingerprint in (None, item.fingerprint):
            claimed.add(item.job_id)
            plan.matched += 1
            plan.unfingerprinted += entry.fingerprint is None
            plan.count(decide(entry, item.fingerprint, download=download), *_where(item))
            continue
        if entry is not None and plan.mismatch is None:
            plan.mismatch = Mismatch(item.line_no, item.job_id, entry.results_line)
        if item.fingerprint in movable and item.job_id == str(item.line_no):
            may_have_moved.append(item)  # few: only jobs of a recorded fingerprint
        else:
            plan.to_send += 1
    for item in may_have_moved:
        source = next((i for i in movable[item.fingerprint] if i not in claimed), None)
        if source is None:
            plan.to_send += 1
            continue
        claimed.add(source)
        plan.matched += 1
        plan.moves.append(Move(item.line_no, item.job_id, source))
        action = decide(state.entries[source], item.fingerprint, download=download)
        plan.count(action, *_where(item))
    return plan


def _where(item: JobLine) -> tuple[str, int]:
    return item.job_id, item.line_no
