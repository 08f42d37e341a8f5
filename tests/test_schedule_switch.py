"""Switching the schedule between steps (SetSchedule): every rank switches at the same step
boundary, and training stays bit-for-bit equal to one process (each rank's gradients accumulate
in micro-batch order under 1F1B, ZB-H1 and GPipe alike)."""

from __future__ import annotations

from pathlib import Path

import pytest
import runtime_cases as rc
import switch_cases as sc
from conftest import PoolFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pp.core.decisions import Decision, SetMicrobatches, SetSchedule
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule

ONE_CHUNK = ("1f1b", "gpipe", "zb-h1")
WIDTHS = (5, 4, 6, 3, 5, 4, 3)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("stages", "optimizer"), [(2, "sgd"), (3, "adam")])
def test_switches_mid_training_equal_single_process(
    pools: PoolFor, tmp_path: Path, stages: int, optimizer: str
) -> None:
    """1f1b, then zb-h1, then gpipe (decided by a controller after steps 0 and 1): same bits as
    one process; a chunked or unknown schedule is refused on every rank, the plan kept; the
    checkpoint records the schedule in use."""
    layers = 2 * stages
    case = rc.Case(
        3, WIDTHS[: layers + 1], tuple(range(0, layers + 1, 2)), stages, "1f1b", optimizer, 4
    )
    script: dict[int, Decision] = {0: SetSchedule("zb-h1", "try"), 1: SetSchedule("gpipe")}
    ranks = pools(stages).run(sc.switch_refuse_checkpoint, case, script, str(tmp_path / "ck"))
    rc.assert_matches_reference(case, ranks)
    for r in ranks:
        assert r["schedules"] == ["1f1b", "zb-h1", "gpipe", "gpipe"]
        assert r["events"][:2] == [
            "set schedule 1f1b -> zb-h1 (try)",
            "set schedule zb-h1 -> gpipe",
        ]
        chunked, unknown = r["refusals"]
        assert "cannot switch schedule gpipe -> interleaved-1f1b" in chunked
        assert "one model chunk per rank" in chunked
        assert "unknown schedule 'zb-h9'" in unknown
        assert r["after"] == r["saved"] == "gpipe"


@st.composite
def switch_cases(draw: st.DrawFn) -> tuple[rc.Case, dict[int, list[Decision]]]:
    """2-3 stages, random partition and M, SGD or Adam; before each step, maybe a new schedule
    (and sometimes a new M as well)."""
    stages = draw(st.integers(2, 3))
    widths, bounds = rc.draw_layout(draw, stages, draw(st.integers(stages, 6)), max_width=7)
    steps = draw(st.integers(2, 4))
    case = rc.Case(
        seed=draw(st.integers(0, 10_000)),
        widths=widths,
        bounds=bounds,
        microbatches=2,
        schedule=draw(st.sampled_from(ONE_CHUNK)),
        optimizer=draw(st.sampled_from(["sgd", "adam"])),
        steps=steps,
        per_microbatch=2,
    )
    changes: dict[int, list[Decision]] = {}
    for k in range(1, steps):
        todo: list[Decision] = [SetSchedule(draw(st.sampled_from(ONE_CHUNK)))]
        if draw(st.booleans()):
            todo.append(SetMicrobatches(draw(st.sampled_from([1, 2, 4]))))
        changes[k] = draw(st.permutations(todo))
    return case, changes


@pytest.mark.multiprocess
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(switch_cases())
def test_random_switches_equal_single_process(
    pools: PoolFor, drawn: tuple[rc.Case, dict[int, list[Decision]]]
) -> None:
    case, changes = drawn
    ranks = pools(len(case.bounds) - 1).run(rc.train_pipelined, case, changes, timeout=120)
    m_from = {
        k: d.microbatches for k, ds in changes.items() for d in ds if isinstance(d, SetMicrobatches)
    }
    rc.assert_matches_reference(case, ranks, m_from)
    switched = [e for e in ranks[0]["events"] if e.startswith("set schedule")]
    assert len(switched) == len(changes)
    # The last step ran the last schedule set, action for action.
    last = [d for k in sorted(changes) for d in changes[k] if isinstance(d, SetSchedule)][-1]
    report = StepReport.from_dict(ranks[0]["report"])
    expected = make_schedule(last.schedule, report.num_stages, report.microbatches)
    assert report.schedule == last.schedule
    assert [list(acts) for acts in report.timeline.actions] == [list(a) for a in expected.stages]


@pytest.mark.multiprocess
def test_an_interleaved_pipeline_refuses_to_switch_and_trains_on(pools: PoolFor) -> None:
    """Two chunks per rank: a switch to 1F1B would re-cut the model; refused on every rank,
    the next steps run interleaved as before, equal to one process."""
    case = rc.Case(5, WIDTHS, (0, 2, 3, 5, 6), 2, "interleaved-1f1b", "adam", 3, chunks=2)
    ranks = pools(2).run(sc.refused_switch, case, "1f1b", timeout=120)
    rc.assert_matches_reference(case, ranks)
    for r in ranks:
        assert "cannot switch schedule interleaved-1f1b -> 1f1b" in r["refused"]
        assert r["after"] == "interleaved-1f1b"


@pytest.mark.multiprocess
def test_the_default_policy_tries_zb_h1_on_the_runtime(pools: PoolFor) -> None:
    """Emulated layers, 2 stages, M = 2 (ZB-H1 predicted ~20% faster): the policy switches
    after its first window on a steady plan (a step later if a step's time looked like a
    transient and was held for the next to confirm), runs the trial, and keeps the switch or
    rolls it back once the trial is measured, depending on what this machine's steps took.
    The window counts from the last move before it: where this machine's steps make the
    stages look uneven (a loaded CPU), the rebalancer may move a layer first."""
    ranks = pools(2).run(sc.adaptive_emulated, 12, timeout=120)
    schedules = ranks[0]["schedules"]
    full = [e for e in ranks[0]["events"] if e.startswith("set schedule")]  # not moves
    assert all(e.endswith(")") for e in full)  # each says why, from the controller
    events = [e.split(" (", 1)[0] for e in full]
    assert events[0] == "set schedule 1f1b -> zb-h1"
    first = schedules.index("zb-h1")
    partitions = ranks[0]["partitions"]
    steady = first  # the first step on the partition the switch happened on
    while steady > 0 and partitions[steady - 1] == partitions[first]:
        steady -= 1
    assert 4 <= first - steady <= 6 and schedules[:first] == ["1f1b"] * first
    tried = first
    while tried < len(schedules) and schedules[tried] == "zb-h1":
        tried += 1
    rolled_back = events[1:] == ["set schedule zb-h1 -> 1f1b"]
    assert rolled_back or events[1:] == []
    if rolled_back:  # measured over settle + window = 4 steps, unless voided by a skew
        assert tried - first == 4 or ("void" in full[1] and tried - first < 4)
        assert schedules[tried:] == ["1f1b"] * (len(schedules) - tried)
    else:
        assert tried == len(schedules)
