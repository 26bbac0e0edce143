"""The benchmark's pairing logic, which decides PASS/MISS: run order and paired ratios."""

from __future__ import annotations

import math

from benchmarks.closed_loop import ClosedLoopResult, Sample, _schedule, paired_ratio


def _sample(position: int, round_index: int, cpu_s: float) -> Sample:
    return Sample(
        requests=1000,
        wall_s=1.0,
        cpu_s=cpu_s,
        server_cpu_s=0.0,
        machine_busy_s=0.0,
        round_index=round_index,
        position=position,
    )


def test_schedule_sandwiches_every_sample_between_two_baselines() -> None:
    order = _schedule(["raw", "a", "b"], rounds=2, baseline="raw")
    names = [name for _, name in order]
    # The second round runs backwards, so "b" does not always follow "a"'s state.
    assert names == ["raw", "a", "raw", "b", "raw", "b", "raw", "a", "raw"]
    assert [r for r, _ in order] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    for position, name in enumerate(names):
        if name != "raw":
            assert names[position - 1] == names[position + 1] == "raw"


def test_schedule_without_baseline_alternates_rounds() -> None:
    order = _schedule(["a", "b"], rounds=2, baseline=None)
    assert order == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]
    assert _schedule(["a", "b"], rounds=1, baseline="missing") == [(0, "a"), (0, "b")]


def test_paired_ratio_uses_the_mean_of_the_neighbouring_baselines() -> None:
    # The machine slows down through the run: the baseline goes 1.0 -> 2.0 -> 3.0 s of
    # CPU; the contender always costs 1.1x the baseline around it.
    baseline = ClosedLoopResult(
        "raw", (_sample(0, 0, 1.0), _sample(2, 0, 2.0), _sample(4, 1, 3.0)), ()
    )
    ours = ClosedLoopResult("ours", (_sample(1, 0, 1.65), _sample(3, 1, 2.75)), ())
    assert math.isclose(paired_ratio(ours, baseline, "cpu_s"), 1.1)
    # Against whole-round medians the drift would read as a different ratio.
    assert not math.isclose(ours.samples[0].cpu_s / baseline.samples[-1].cpu_s, 1.1)


def test_paired_ratio_falls_back_to_the_same_round_and_to_one_for_itself() -> None:
    baseline = ClosedLoopResult("raw", (_sample(0, 0, 2.0), _sample(5, 1, 4.0)), ())
    ours = ClosedLoopResult("ours", (_sample(2, 0, 3.0), _sample(3, 1, 2.0)), ())
    assert math.isclose(paired_ratio(ours, baseline, "cpu_s"), (1.5 + 0.5) / 2)
    assert paired_ratio(baseline, baseline, "cpu_s") == 1.0
    empty = ClosedLoopResult("none", (), ())
    assert math.isnan(paired_ratio(empty, baseline, "cpu_s"))
