"""ZB-V (core.zbv): shape, validity, peak stash, the zero-bubble closed form in the simulator."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pp.core.schedules import (
    CHUNKED_SCHEDULES,
    SIMULATED_SCHEDULE_NAMES,
    SPLIT_BACKWARD_SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    interleaved_1f1b,
    make_schedule,
    peak_stash,
    validate,
    zb_h1,
    zb_v,
)
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.core.zbv import min_microbatches, zero_bubble_units

stages_st = st.integers(min_value=1, max_value=8)
mbs_st = st.integers(min_value=1, max_value=24)


def _units(s: int, m: int) -> Costs:
    """F = I = W = 1 unit per chunk: per rank (2 chunks) F = 2, B = I + W = 4, W = 2."""
    return Costs.build(s, m, 2.0, 4.0, tau_w=2.0)


def test_registered() -> None:
    assert make_schedule("zb-v", 3, 5) == zb_v(3, 5)
    assert make_schedule("ZB_V", 3, 5, chunks=4) == zb_v(3, 5)  # always 2 chunks
    assert "zb-v" in SIMULATED_SCHEDULE_NAMES
    assert "zb-v" in CHUNKED_SCHEDULES and "zb-v" in SPLIT_BACKWARD_SCHEDULES
    sched = zb_v(2, 3)
    assert (sched.chunks, sched.placement, sched.name) == (2, "v", "zb-v")
    assert sched.split_backward


def test_text_s2_m3() -> None:
    # Rank 0 holds virtual stages 0 and 3 (inputs and loss), rank 1 stages 1 and 2 (the turn).
    assert zb_v(2, 3).to_text() == (
        "# chunks=2 placement=v\n"
        "0: 0F0 0F1 0F2 0F0c1 0I0c1 0W0c1 0F1c1 0I1c1 0W1c1 0I0 0W0 0F2c1 0I2c1 0W2c1 0I1 0W1 "
        "0I2 0W2\n"
        "1: 1F0 1F0c1 1F1 1F1c1 1I0c1 1W0c1 1F2 1I0 1W0 1F2c1 1I1c1 1W1c1 1I1 1I2c1 1I2 1W1 "
        "1W2c1 1W2"
    )
    text = zb_v(4, 9).to_text()
    assert Schedule.from_text(text, name="zb-v") == zb_v(4, 9)


def test_placement() -> None:
    sched = zb_v(4, 7)
    assert [sched.locate(v) for v in range(8)] == [
        *((r, 0) for r in range(4)),
        *((r, 1) for r in (3, 2, 1, 0)),
    ]
    assert sched.virtual_stage(0, 1) == 7 and sched.virtual_stage(3, 1) == 4


@settings(max_examples=60, deadline=None)
@given(stages_st, mbs_st)
def test_valid_and_complete(s: int, m: int) -> None:
    sched = zb_v(s, m)
    code = validate(sched)
    for r, acts in enumerate(sched.stages):
        # every (chunk, micro-batch) of this rank has exactly one F, one I and one W
        assert Counter(acts) == Counter(
            Action(r, k, mb, c) for k in "FIW" for mb in range(m) for c in range(2)
        )
    # peak stash: at most 2 min(M, S) chunk activations per rank (S stages' worth, 1F1B's peak
    # on rank 0), reached on every rank once M >= 2S - 1
    assert list(code.peak) == peak_stash(sched)
    assert max(code.peak) == 2 * min(m, s)
    if m >= min_microbatches(s):
        assert list(code.peak) == [2 * s] * s
    validate(sched, max_stash=2 * min(m, s))
    if m > 1:
        with pytest.raises(ScheduleError):
            validate(sched, max_stash=2 * min(m, s) - 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=12))
def test_zero_bubble_closed_form(s: int, extra: int) -> None:
    m = min_microbatches(s) + extra
    rep = simulate(zb_v(s, m), _units(s, m))
    assert rep.step_time == pytest.approx(zero_bubble_units(s, m)) == 6 * m + s - 1
    # every rank computes 6M units and idles S - 1: r before its first action
    for st_ in rep.stages:
        assert st_.compute == pytest.approx(6 * m)
        assert rep.timeline.start[st_.stage][0] == pytest.approx(st_.stage)
    # half ZB-H1's bubble at the same costs, and below interleaved 1F1B's (V = 2, M % S == 0)
    h1 = simulate(zb_h1(s, m), _units(s, m)).step_time
    assert h1 == pytest.approx(6 * m + 2 * (s - 1))
    if s > 1:
        assert rep.step_time < h1
        mi = m * s  # a multiple of S for interleaved
        inter = simulate(interleaved_1f1b(s, mi, 2), Costs.build(s, mi, 2.0, 4.0, tau_w=2.0))
        assert simulate(zb_v(s, mi), _units(s, mi)).step_time < inter.step_time


def test_closed_form_needs_full_steady_state() -> None:
    assert min_microbatches(4) == 7
    with pytest.raises(ValueError, match="2S - 1"):
        zero_bubble_units(4, 6)
    # below 2S - 1 the schedule still runs, with more idle than the closed form
    assert simulate(zb_v(4, 5), _units(4, 5)).step_time > 6 * 5 + 4 - 1


def test_sizes() -> None:
    with pytest.raises(ValueError, match="micro-batch"):
        zb_v(3, 0)
    with pytest.raises(ValueError, match="stage"):
        zb_v(0, 3)


def test_cli_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    from adaptive_pp.cli import main

    args = ["simulate", "--schedule", "zb-v", "-S", "3", "-M", "5", "--tau-w", "2"]
    assert main([*args, "--tau-f", "2", "--tau-b", "4"]) == 0
    out = capsys.readouterr().out
    assert "schedule zb-v" in out and "32.000 ms" in out  # 6M + S - 1 units of 1 ms
