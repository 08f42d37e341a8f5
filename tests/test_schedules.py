"""Tests for adaptive_pp.schedules: actions, generators, text form, validator."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pp.core.schedules import (
    KINDS,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    compile_schedule,
    gpipe,
    make_schedule,
    one_f_one_b,
    validate,
)
from adaptive_pp.core.simulator import Costs, simulate

GOLDEN = Path(__file__).parent / "golden"
GENERATORS = {"gpipe": gpipe, "1f1b": one_f_one_b}

stages_st = st.integers(min_value=1, max_value=12)
microbatches_st = st.integers(min_value=1, max_value=24)


def sched(text: str, microbatches: int | None = None) -> Schedule:
    """A hand-written schedule, one ``stage: actions`` line per stage."""
    return Schedule.from_text(text, microbatches)


# --- Action ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("1F3", Action(1, "F", 3)),
        ("0B0", Action(0, "B", 0)),
        ("12B105", Action(12, "B", 105)),
    ],
)
def test_action_text_round_trip(text: str, action: Action) -> None:
    assert str(action) == text
    assert Action.parse(text) == action
    assert Action.parse(f"  {text}\n") == action


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(KINDS),
    st.integers(min_value=0, max_value=10**6),
)
def test_action_round_trip_property(stage: int, kind: Kind, mb: int) -> None:
    action = Action(stage, kind, mb)
    assert Action.parse(str(action)) == action


@pytest.mark.parametrize(
    "junk",
    ["", " ", "F3", "13", "1X3", "1F", "1f3", "1b3", "-1F3", "1F-3", "1 F 3", "1F3x", "x1F3",
     "1F3 2B0", "1.0F3", "1FB3", "１F３", "1F\n3"],
)  # fmt: skip
def test_action_parse_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError, match="not an action"):
        Action.parse(junk)


def test_a_backward_of_the_previous_step_parses() -> None:
    """PipeDream-2BW windows name the previous step's micro-batches by negative ids."""
    assert Action.parse("1B-3") == Action(1, "B", -3) and str(Action(1, "B", -3)) == "1B-3"


@given(
    st.one_of(
        st.text(max_size=12),
        # Near misses: the right characters, plus signs, spaces and non-ASCII digits.
        st.text(alphabet="0123456789FBfb -+\n\u0661\uff11\u0663x", max_size=8),
    )
)
def test_action_parse_accepts_only_the_ascii_form(text: str) -> None:
    """Whatever parses is ``<digits>F|B<digits>`` in ASCII; anything else is a ValueError."""
    try:
        action = Action.parse(text)
    except ValueError:
        assert not re.fullmatch(r"[0-9]+[FB][0-9]+", text.strip())
    else:
        assert re.fullmatch(r"[0-9]+[FB][0-9]+", text.strip())
        assert Action.parse(str(action)) == action


# --- generators: properties -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@given(num_stages=stages_st, microbatches=microbatches_st)
def test_generated_schedules_are_valid(name: str, num_stages: int, microbatches: int) -> None:
    schedule = GENERATORS[name](num_stages, microbatches)
    assert schedule.num_stages == num_stages
    assert schedule.microbatches == microbatches
    assert schedule.name == name
    validate(schedule)

    for s, actions in enumerate(schedule):
        # Every F and every B of this stage exactly once, and nothing else.
        expected = {Action(s, k, m) for k in KINDS for m in range(microbatches)}
        counts = Counter(actions)
        assert set(counts) == expected
        assert all(c == 1 for c in counts.values())
        # Each backward after its own forward on the same stage.
        for m in range(microbatches):
            assert actions.index(Action(s, "F", m)) < actions.index(Action(s, "B", m))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@given(num_stages=stages_st, microbatches=microbatches_st)
def test_text_form_round_trips(name: str, num_stages: int, microbatches: int) -> None:
    schedule = GENERATORS[name](num_stages, microbatches)
    text = schedule.to_text()
    assert len(text.splitlines()) == num_stages
    assert Schedule.from_text(text, microbatches, name) == schedule
    # M defaults to the largest micro-batch id + 1, which a complete schedule names.
    assert Schedule.from_text(text, name=name) == schedule


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@given(num_stages=stages_st, microbatches=microbatches_st)
def test_generated_schedules_simulate(name: str, num_stages: int, microbatches: int) -> None:
    schedule = GENERATORS[name](num_stages, microbatches)
    report = simulate(schedule, Costs.build(num_stages, microbatches, 1.0, 1.0))
    # Unit costs: 2 (M + S - 1) clock ticks, every action in the timeline.
    assert report.step_time == 2 * (microbatches + num_stages - 1)
    assert len(report.timeline) == 2 * num_stages * microbatches


@given(num_stages=stages_st, microbatches=microbatches_st)
def test_1f1b_follows_its_rule(num_stages: int, microbatches: int) -> None:
    """Stage s: min(S-s-1, M) warm-up forwards, then F/B pairs, then the remaining Bs."""
    schedule = one_f_one_b(num_stages, microbatches)
    for s, actions in enumerate(schedule):
        warmup = min(num_stages - s - 1, microbatches)
        kinds = "".join(a.kind for a in actions)
        assert kinds == "F" * warmup + "FB" * (microbatches - warmup) + "B" * warmup
        # Forwards and backwards each run in micro-batch order.
        assert [a.microbatch for a in actions if a.kind == "F"] == list(range(microbatches))
        assert [a.microbatch for a in actions if a.kind == "B"] == list(range(microbatches))


@given(num_stages=stages_st, microbatches=microbatches_st)
def test_peak_stash_from_compile(num_stages: int, microbatches: int) -> None:
    assert compile_schedule(gpipe(num_stages, microbatches)).peak == (microbatches,) * num_stages
    assert compile_schedule(one_f_one_b(num_stages, microbatches)).peak == tuple(
        min(num_stages - s, microbatches) for s in range(num_stages)
    )


# --- generators: golden text ------------------------------------------------------------------
#
# Written by hand from the rules, not dumped from the generator.
#
# 1f1b S=3 M=4: warm-ups are min(2,4)=2, min(1,4)=1, min(0,4)=0.
#   stage 0: F0 F1 | F2 B0, F3 B1 | B2 B3
#   stage 1: F0 | F1 B0, F2 B1, F3 B2 | B3
#   stage 2: F0 B0, F1 B1, F2 B2, F3 B3
#   (the order of the clock table in the module docstring).
# 1f1b S=4 M=2 (M < S): warm-ups min(3,2)=2, min(2,2)=2, min(1,2)=1, 0.
#   stages 0 and 1: F0 F1 | (no pairs) | B0 B1;  stage 2: F0 | F1 B0 | B1;  stage 3: F0 B0 F1 B1.
# gpipe S=2 M=3: every stage F0 F1 F2 B0 B1 B2.
# 1f1b S=1 M=3: warm-up min(0,3)=0, so F0 B0 F1 B1 F2 B2.


@pytest.mark.parametrize(
    ("golden", "name", "num_stages", "microbatches"),
    [
        ("1f1b_s3_m4", "1f1b", 3, 4),
        ("1f1b_s4_m2", "1f1b", 4, 2),
        ("gpipe_s2_m3", "gpipe", 2, 3),
        ("1f1b_s1_m3", "1f1b", 1, 3),
    ],
)
def test_golden_schedules(golden: str, name: str, num_stages: int, microbatches: int) -> None:
    expected = (GOLDEN / f"{golden}.txt").read_text(encoding="utf-8")
    schedule = make_schedule(name, num_stages, microbatches)
    assert schedule.to_text() + "\n" == expected
    assert Schedule.from_text(expected, microbatches, name) == schedule


# --- make_schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("1f1b", "1f1b"),
        ("1F1B", "1f1b"),
        ("1-f-1-b", "1f1b"),
        ("GPipe", "gpipe"),
        ("g_pipe", "gpipe"),
    ],
)
def test_make_schedule_names(alias: str, name: str) -> None:
    assert make_schedule(alias, 3, 5) == GENERATORS[name](3, 5)


def test_make_schedule_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'zero-bubble'"):
        make_schedule("zero-bubble", 2, 2)


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize(
    ("num_stages", "microbatches", "what"),
    [(0, 4, "stage"), (-1, 4, "stage"), (4, 0, "micro-batch"), (4, -3, "micro-batch")],
)
def test_make_schedule_bad_sizes(name: str, num_stages: int, microbatches: int, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        make_schedule(name, num_stages, microbatches)


# --- from_text errors -------------------------------------------------------------------------


def test_from_text_wrong_line_number() -> None:
    with pytest.raises(ValueError, match="line 2"):
        Schedule.from_text("0: 0F0 0B0\n2: 1F0 1B0")


def test_from_text_missing_colon() -> None:
    with pytest.raises(ValueError, match="line 1"):
        Schedule.from_text("0F0 0B0")


def test_from_text_bad_token() -> None:
    with pytest.raises(ValueError, match="'0Q0'"):
        Schedule.from_text("0: 0F0 0Q0")


# --- validate errors --------------------------------------------------------------------------


def assert_schedule_error(
    schedule: Schedule, stage: int, action: str, *fragments: str
) -> ScheduleError:
    """validate() raises a ScheduleError naming ``stage`` and ``action`` (text and attributes)."""
    with pytest.raises(ScheduleError) as info:
        validate(schedule)
    err = info.value
    message = str(err)
    assert f"stage {stage}" in message
    assert action in message
    for fragment in fragments:
        assert fragment in message
    assert err.stage == stage
    assert err.action == Action.parse(action)
    assert isinstance(err, ValueError)
    return err


def test_validate_missing_forward() -> None:
    # Stage 1 never runs micro-batch 1 at all; the forward is reported first.
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0", microbatches=2)
    assert_schedule_error(schedule, 1, "1F1", "missing")


def test_validate_missing_backward() -> None:
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0 1F1", microbatches=2)
    assert_schedule_error(schedule, 1, "1B1", "missing")


def test_validate_duplicated_forward() -> None:
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0 1F1 1F1 1B1")
    assert_schedule_error(schedule, 1, "1F1", "twice")


def test_validate_duplicated_backward() -> None:
    schedule = sched("0: 0F0 0B0 0B0")
    assert_schedule_error(schedule, 0, "0B0", "twice")


def test_validate_backward_before_forward() -> None:
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B1 1F1 1B0")
    err = assert_schedule_error(schedule, 1, "1B1", "before its forward")
    assert "1F1" in str(err)


def test_validate_action_on_wrong_stage() -> None:
    # Stage 1's list holds stage 0's forward of micro-batch 1.
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0 0F1 1B1")
    err = assert_schedule_error(schedule, 1, "0F1", "belongs to stage 0")
    assert err.action == Action(0, "F", 1)


def test_validate_microbatch_out_of_range() -> None:
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0 1F5 1B1", microbatches=2)
    assert_schedule_error(schedule, 1, "1F5", "micro-batch 5", "0..1")


def test_validate_deadlock() -> None:
    # Stage 0 runs F0 and then wants B0's gradient from stage 1 before it sends F1; stage 1
    # runs F0 and then wants F1's activation before it runs B0. Each waits for the other.
    schedule = sched("0: 0F0 0B0 0F1 0B1\n1: 1F0 1F1 1B0 1B1")
    compile_schedule(schedule)  # each list on its own is fine: the fault is between stages
    err = assert_schedule_error(schedule, 0, "0B0", "deadlock")
    message = str(err)
    assert "stage 0 waits at 0B0 for 1B0" in message
    assert "stage 1 waits at 1F1 for 0F1" in message


def test_validate_deadlock_three_stages() -> None:
    # Stages 0 and 1 are fine with each other; stage 2 wants micro-batch 1 first, which stage 1
    # only sends after stage 2 returns micro-batch 0's gradient.
    schedule = sched("0: 0F0 0F1 0B0 0B1\n1: 1F0 1B0 1F1 1B1\n2: 2F1 2B1 2F0 2B0")
    # Every stuck stage is listed; the error's stage/action are the first of them.
    err = assert_schedule_error(schedule, 0, "0B0", "deadlock")
    message = str(err)
    assert "stage 0 waits at 0B0 for 1B0" in message
    assert "stage 1 waits at 1B0 for 2B0" in message
    assert "stage 2 waits at 2F1 for 1F1" in message


def test_deadlock_also_raised_by_simulate() -> None:
    schedule = sched("0: 0F0 0B0 0F1 0B1\n1: 1F0 1F1 1B0 1B1")
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(schedule, Costs.build(2, 2, 1.0, 2.0, 0.5))


def test_validate_accepts_unusual_but_live_order() -> None:
    # Backwards in reverse order on both stages: unusual, yet nothing waits forever.
    schedule = sched("0: 0F0 0F1 0B1 0B0\n1: 1F0 1F1 1B1 1B0")
    code = validate(schedule)
    assert code.peak == (2, 2)
    # Unit costs by hand: 0F0 0-1, 0F1 1-2; 1F0 1-2, 1F1 2-3, 1B1 3-4, 1B0 4-5;
    # 0B1 needs 1B1 (ends 4): 4-5; 0B0 needs 1B0 (ends 5): 5-6.
    report = simulate(schedule, Costs.build(2, 2, 1.0, 1.0))
    assert report.step_time == 6.0
    assert report.timeline.start[0] == [0.0, 1.0, 4.0, 5.0]
    assert report.timeline.start[1] == [1.0, 2.0, 3.0, 4.0]


def test_validate_empty_pipeline() -> None:
    with pytest.raises(ValueError, match="at least 1 stage"):
        validate(Schedule((), 1))
