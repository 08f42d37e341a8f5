"""Decisions and plans as plain data: validation in apply, JSON round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pp.core.decisions import (
    Decision,
    Keep,
    MoveLayers,
    Plan,
    SetMicrobatches,
    SetSchedule,
    apply,
    describe,
    from_dict,
    to_dict,
)
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.schedules import SCHEDULE_NAMES

reasons = st.text(max_size=20)
decisions: st.SearchStrategy[Decision] = st.one_of(
    st.builds(Keep, reasons),
    st.builds(SetMicrobatches, st.integers(-3, 64), reasons),
    st.builds(MoveLayers, st.integers(-1, 5), st.integers(-1, 5), st.integers(-2, 6), reasons),
    st.builds(
        SetSchedule,
        st.sampled_from(["1f1b", "gpipe", "zb-h1", "interleaved-1f1b", "1F1B"]),
        reasons,
    ),
)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    m = draw(st.integers(1, 16))
    schedule = draw(st.sampled_from(["1f1b", "gpipe", "zb-h1", "2bw"]))
    lead = draw(st.integers(1, 3)) if schedule == "2bw" else 1
    return Plan(Partition.from_sizes(sizes), m, schedule, lead)


@given(decisions)
def test_decision_dict_round_trip_through_json(d: Decision) -> None:
    assert from_dict(json.loads(json.dumps(to_dict(d)))) == d


@given(plans())
def test_plan_dict_round_trip_through_json(plan: Plan) -> None:
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@given(plans(), decisions)
def test_apply_gives_a_valid_plan_or_a_clear_error(plan: Plan, d: Decision) -> None:
    try:
        new = apply(plan, d)
    except ValueError as exc:
        assert str(exc)
        assert not isinstance(d, Keep)
        return
    assert new.partition.num_layers == plan.partition.num_layers
    assert new.num_stages == plan.num_stages
    assert min(new.partition.sizes) >= 1 and new.microbatches >= 1
    if isinstance(d, MoveLayers):
        assert abs(d.src - d.dst) == 1 and d.count >= 1
        assert new.partition.sizes[d.src] == plan.partition.sizes[d.src] - d.count
        assert new.partition.sizes[d.dst] == plan.partition.sizes[d.dst] + d.count
        assert new.microbatches == plan.microbatches
    elif isinstance(d, SetMicrobatches):
        assert new.microbatches == d.microbatches and new.partition == plan.partition
    elif isinstance(d, SetSchedule):
        assert new == Plan(plan.partition, plan.microbatches, d.schedule)
        assert d.schedule in SCHEDULE_NAMES and plan.schedule != "2bw"  # set at the start
    else:
        assert new == plan
    assert new.lead == plan.lead  # a move or an M change keeps 2BW's lead


def test_a_plan_carries_2bws_lead_and_no_other_schedule_has_one() -> None:
    plan = Plan(Partition((0, 3, 6, 9)), 4, "2bw", 2)
    assert str(plan) == "[0-2 | 3-5 | 6-8] M=4 2bw lead 2"
    assert plan.to_dict()["lead"] == 2 and "lead" not in Plan(plan.partition, 4).to_dict()
    assert apply(plan, MoveLayers(1, 0, 1)).lead == apply(plan, SetMicrobatches(8)).lead == 2
    for bad in (Plan(plan.partition, 4, "1f1b"), Plan(plan.partition, 4, "2bw")):
        with pytest.raises(ValueError, match="lead must be 1, or an int >= 1 under 2bw"):
            Plan(bad.partition, 4, bad.schedule, 2 if bad.schedule == "1f1b" else 0)
    for lead in (1, 2):  # from 2bw: refused, by name, whatever its lead
        with pytest.raises(ValueError, match="cannot switch schedule 2bw -> 1f1b: 2bw"):
            apply(Plan(plan.partition, 4, "2bw", lead), SetSchedule("1f1b"))


@pytest.mark.parametrize(
    ("decision", "message"),
    [
        (MoveLayers(0, 2, 1), "neighbouring"),
        (MoveLayers(1, 0, 0), "at least one"),
        (MoveLayers(0, 1, 3), "empty"),
        (MoveLayers(2, 3, 1), "neighbouring"),
        (SetMicrobatches(0), "at least 1 micro-batch"),
        (SetSchedule("zb-h9"), r"unknown schedule 'zb-h9'; choose one of 1f1b, gpipe, zb-h1"),
        (SetSchedule("ZB-H1"), "unknown schedule 'ZB-H1'"),
    ],
)
def test_apply_refuses_with_a_message(decision: Decision, message: str) -> None:
    plan = Plan(Partition((0, 3, 6, 9)), 4)
    with pytest.raises(ValueError, match=message):
        apply(plan, decision)


def test_apply_moves_boundary_layers() -> None:
    plan = Plan(Partition((0, 3, 6, 9)), 4)
    assert apply(plan, MoveLayers(1, 0, 2)).partition.bounds == (0, 5, 6, 9)
    assert apply(plan, MoveLayers(1, 2, 2)).partition.bounds == (0, 3, 4, 9)
    assert apply(plan, SetMicrobatches(8)).microbatches == 8
    assert apply(plan, SetSchedule("zb-h1")) == Plan(plan.partition, 4, "zb-h1")
    assert apply(Plan(plan.partition, 4, "zb-h1"), SetSchedule("gpipe")).schedule == "gpipe"
    assert apply(plan, Keep("fine")) is plan


def test_from_dict_rejects_unknown_or_incomplete() -> None:
    with pytest.raises(ValueError, match="unknown decision kind"):
        from_dict({"kind": "explode"})
    with pytest.raises(ValueError, match="missing field 'count'"):
        from_dict({"kind": "move_layers", "src": 0, "dst": 1})
    with pytest.raises(ValueError, match="missing field 'schedule'"):
        from_dict({"kind": "set_schedule"})
    assert to_dict(SetSchedule("zb-h1", "faster")) == {
        "kind": "set_schedule",
        "schedule": "zb-h1",
        "reason": "faster",
    }


def test_plan_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="micro-batch"):
        Plan(Partition((0, 2)), 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        Plan(Partition((0, 2)), 2, "zigzag")


def test_describe_is_short() -> None:
    assert describe(MoveLayers(1, 2, 3, "why")) == "move 3 layer(s) 1->2 (why)"
    assert describe(SetMicrobatches(8)) == "set M=8"
    assert describe(SetSchedule("zb-h1", "faster")) == "set schedule zb-h1 (faster)"
    assert describe(Keep()) == "keep"


# Load adaptive_pp's submodules without running the package __init__ (which brings in the
# torch runtime), to check what the decision code itself imports.
NO_PACKAGE_INIT = """
import importlib.util, sys, types
spec = importlib.util.find_spec("adaptive_pp")
pkg = types.ModuleType("adaptive_pp")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["adaptive_pp"] = pkg
"""


def test_decisions_module_needs_no_torch() -> None:
    code = NO_PACKAGE_INIT + "import adaptive_pp.core.decisions\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
