"""Chunked and split-backward schedules: text form, validator, closed forms in the simulator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pp.core.schedules import (
    ALL_KINDS,
    SCHEDULE_NAMES,
    SIMULATED_SCHEDULE_NAMES,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    peak_stash,
    validate,
    zb_h1,
)
from adaptive_pp.core.simulator import W_SHARE, Costs, simulate

TOL = 1e-9
tau_st = st.floats(min_value=0.1, max_value=10.0, allow_nan=False, allow_infinity=False)


# --- text form -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("1F3", Action(1, "F", 3)),
        ("1I3c1", Action(1, "I", 3, 1)),
        ("0W12c3", Action(0, "W", 12, 3)),
    ],
)
def test_action_text(text: str, action: Action) -> None:
    assert str(action) == text
    assert Action.parse(text) == action


@given(st.integers(0, 10**6), st.sampled_from(ALL_KINDS), st.integers(0, 10**6), st.integers(0, 99))
def test_action_round_trip(stage: int, kind: Kind, mb: int, chunk: int) -> None:
    action = Action(stage, kind, mb, chunk)
    assert Action.parse(str(action)) == action
    assert str(action).endswith(f"c{chunk}") == (chunk > 0)


@pytest.mark.parametrize("junk", ["1F3c", "1F3C1", "1Fc1", "1X3c1", "1F3c-1", "1F3.1"])
def test_action_parse_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError, match="not an action"):
        Action.parse(junk)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3))
def test_schedule_text_round_trips(num_stages: int, rounds: int, chunks: int) -> None:
    m_count = num_stages * rounds
    for schedule in (interleaved_1f1b(num_stages, m_count, chunks), zb_h1(num_stages, m_count)):
        assert Schedule.from_text(schedule.to_text(), name=schedule.name) == schedule
    v_shaped = Schedule(zb_h1(2, 2).stages, 2, "x", 1, "v")
    assert Schedule.from_text(v_shaped.to_text(), name="x") == v_shaped


# --- generators ------------------------------------------------------------------------------


@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 4))
def test_interleaved_is_valid_and_every_action_once(
    num_stages: int, rounds: int, chunks: int
) -> None:
    m_count = num_stages * rounds
    schedule = interleaved_1f1b(num_stages, m_count, chunks)
    assert (schedule.chunks, schedule.placement, schedule.split_backward) == (chunks, "loop", False)
    validate(schedule)
    for s, acts in enumerate(schedule):
        assert sorted(acts) == sorted(
            Action(s, k, m, c) for k in "FB" for m in range(m_count) for c in range(chunks)
        )


def test_interleaved_needs_whole_rounds() -> None:
    with pytest.raises(ScheduleError, match=r"micro-batches \(6\) to be a multiple of the stages"):
        interleaved_1f1b(4, 6, 2)


@given(st.integers(1, 8), st.integers(1, 20))
def test_zb_h1_is_valid(num_stages: int, m_count: int) -> None:
    schedule = zb_h1(num_stages, m_count)
    assert schedule.split_backward and schedule.chunks == 1
    validate(schedule)
    for s, acts in enumerate(schedule):
        assert sorted(acts) == sorted(Action(s, k, m) for k in "FIW" for m in range(m_count))


def test_names() -> None:
    assert make_schedule("zb-h1", 3, 4) == zb_h1(3, 4)
    assert make_schedule("interleaved-1f1b", 2, 4) == interleaved_1f1b(2, 4, 2)
    assert make_schedule("interleaved_1f1b", 2, 4, chunks=3) == interleaved_1f1b(2, 4, 3)
    # The runtime runs these (zb-h1 with split backward, interleaved with chunks per rank).
    assert SCHEDULE_NAMES == ("1f1b", "gpipe", "zb-h1", "interleaved-1f1b", "zb-v")
    assert set(SIMULATED_SCHEDULE_NAMES) == {
        *("1f1b", "gpipe", "interleaved-1f1b", "zb-h1", "zb-v", "2bw")
    }
    assert not make_schedule("1f1b", 3, 4).split_backward


# --- closed forms (equal stages, no hop cost) ------------------------------------------------


@given(
    num_stages=st.integers(1, 8),
    rounds=st.integers(1, 4),
    chunks=st.integers(1, 4),
    tau_f=tau_st,
    tau_b=tau_st,
)
def test_interleaved_closed_form(
    num_stages: int, rounds: int, chunks: int, tau_f: float, tau_b: float
) -> None:
    """Each chunk's F and B take tau/V: step = M (f + b) + (S - 1)(f + b) / V, so the bubble
    is (S - 1) / (V M + S - 1); V = 1 is 1F1B's (S - 1) / (M + S - 1). Needs M % S == 0."""
    s_, m_, v_ = num_stages, num_stages * rounds, chunks
    report = simulate(interleaved_1f1b(s_, m_, v_), Costs.build(s_, m_, tau_f, tau_b))
    step = m_ * (tau_f + tau_b) + (s_ - 1) * (tau_f + tau_b) / v_
    assert report.step_time == pytest.approx(step, rel=TOL)
    assert report.bubble_fraction == pytest.approx((s_ - 1) / (v_ * m_ + s_ - 1), abs=TOL)
    for stats in report.stages:
        assert stats.compute == pytest.approx(m_ * (tau_f + tau_b), rel=TOL)


@given(
    num_stages=st.integers(1, 8),
    extra=st.integers(0, 12),
    tau_f=tau_st,
    tau_i=tau_st,
    w_frac=st.floats(0.0, 1.0),
)
def test_zb_h1_closed_form(
    num_stages: int, extra: int, tau_f: float, tau_i: float, w_frac: float
) -> None:
    """The paper (Qi et al. 2023, section 2.1, Table 2) writes B for the input-gradient pass
    (our I) and gives ZB-H1 a bubble of (p - 1)(T_F + T_B - T_W) per stage; (p - 1)(T_F + T_B
    - 2 T_W) is ZB-H2's, which needs more memory. We check ZB-H1's for M >= S and W <= min(F, I)
    (the paper's analysis takes F = B = W); every rank then idles (S - 1)(F + I - W)."""
    s_, m_ = num_stages, num_stages + extra
    tau_w = w_frac * min(tau_f, tau_i)
    costs = Costs.build(s_, m_, tau_f, tau_i + tau_w, tau_w=tau_w)
    report = simulate(zb_h1(s_, m_), costs)
    for stats in report.stages:
        assert stats.idle == pytest.approx((s_ - 1) * (tau_f + tau_i - tau_w), rel=TOL, abs=TOL)
        assert stats.compute == pytest.approx(m_ * (tau_f + tau_i + tau_w), rel=TOL)
    one_f = simulate(one_f_one_b(s_, m_), costs)  # same costs, backward unsplit
    assert one_f.stages[0].idle == pytest.approx((s_ - 1) * (tau_f + tau_i + tau_w), rel=TOL)


@given(st.integers(1, 10), st.integers(1, 24))
def test_zb_h1_peak_stash_is_1f1b_rank_0_peak(num_stages: int, m_count: int) -> None:
    """Held from F until W: every rank keeps min(S, M) in flight, 1F1B's rank-0 peak (the
    paper's "no greater than 1F1B": the largest per-rank peak is 1F1B's; later ranks hold more
    than under 1F1B, as in the paper, where a pending W holds less than a whole activation)."""
    zb = peak_stash(zb_h1(num_stages, m_count))
    assert zb == [min(num_stages, m_count)] * num_stages
    assert max(zb) == max(peak_stash(one_f_one_b(num_stages, m_count)))


def test_default_split_and_chunk_hops() -> None:
    costs = Costs.build(2, 2, 1.0, 2.5)
    assert costs.w_table() == ((2.5 * W_SHARE,) * 2,) * 2
    assert Costs.build(2, 2, 1.0, 2.0, w_share=0.25).w_table() == ((0.5, 0.5),) * 2
    with pytest.raises(ValueError, match="exceeds its backward"):
        Costs.build(2, 2, 1.0, 2.0, tau_w=3.0)
    # S = 1, V = 2: both chunks on rank 0, no hop paid even with tau_wrap set.
    one = interleaved_1f1b(1, 2, 2)
    rep = simulate(one, Costs.build(1, 2, 1.0, 1.0, tau_wrap=5.0))
    assert rep.step_time == pytest.approx(4.0)
    assert rep.queues == ()
    # S = 2: chunk 0 of rank 1 feeds chunk 1 of rank 0 over the wrap link (1 -> 0 "act").
    two = simulate(interleaved_1f1b(2, 2, 2), Costs.build(2, 2, 1.0, 1.0, 0.5, tau_wrap=0.25))
    assert {(q.src, q.dst, q.kind) for q in two.queues} == {
        (0, 1, "act"),
        (1, 0, "grad"),
        (1, 0, "act"),
        (0, 1, "grad"),
    }


# --- validator -------------------------------------------------------------------------------


def error_of(text: str, m_count: int | None = None, **kw: int) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        validate(Schedule.from_text(text, m_count), **kw)
    return info.value


def test_rejects_w_before_its_i() -> None:
    err = error_of("0: 0F0 0W0 0I0")
    assert (err.stage, err.action) == (0, Action(0, "W", 0))
    assert "weight gradient 0W0 comes before its input gradient 0I0" in str(err)


def test_rejects_missing_w() -> None:
    err = error_of("0: 0F0 0I0 0F1 0I1 0W1\n1: 1F0 1I0 1W0 1F1 1I1 1W1")
    assert (err.stage, err.action) == (0, Action(0, "W", 0))
    assert "stage 0: action 0W0 is missing" in str(err)


def test_rejects_b_and_i_for_one_microbatch() -> None:
    err = error_of("0: 0F0 0B0 0I0 0W0")
    assert err.action == Action(0, "I", 0) and "either B or both I and W" in str(err)


def test_rejects_w_after_b() -> None:
    err = error_of("0: 0F0 0B0 0W0")
    assert err.action == Action(0, "W", 0) and "instead of B" in str(err)


def test_rejects_chunk_out_of_range() -> None:
    err = error_of("# chunks=1 placement=loop\n0: 0F0 0F0c1 0B0c1 0B0")
    assert (err.stage, err.action) == (0, Action(0, "F", 0, 1))
    assert "names chunk 1, but ranks hold chunks 0..0" in str(err)


def test_rejects_chunk_routed_wrongly() -> None:
    # Interleaved's lists read as V-shaped: rank 1 chunk 1 is now virtual stage 2 and waits
    # for rank 1 chunk 0's forward, which itself needs a gradient from later: deadlock.
    good = interleaved_1f1b(2, 2, 2)
    validate(good)
    wrong = Schedule(good.stages, 2, "wrong", 2, "v")
    with pytest.raises(ScheduleError, match="deadlock") as info:
        validate(wrong)
    assert info.value.stage is not None and info.value.action is not None
    assert f"stage {info.value.stage} waits at {info.value.action}" in str(info.value)


def test_same_rank_order_deadlock_is_named() -> None:
    # Chunk 1 of rank 0 (virtual stage 1) before chunk 0 (virtual stage 0) on one rank.
    err = error_of("# chunks=2 placement=loop\n0: 0F0c1 0F0 0B0c1 0B0")
    assert "stage 0 waits at 0F0c1 for 0F0" in str(err)


def test_max_stash_bound() -> None:
    schedule = zb_h1(3, 6)
    validate(schedule, max_stash=3)
    with pytest.raises(
        ScheduleError, match="stage 0: stashes 3 activations at 0F2, over the bound 2"
    ):
        validate(schedule, max_stash=2)
    with pytest.raises(ScheduleError, match="stage 2: stashes 3"):
        validate(schedule, max_stash=[3, 3, 2])


@given(st.integers(1, 6), st.integers(1, 3), st.integers(2, 4))
def test_interleaved_follows_megatrons_rule(num_stages: int, rounds: int, chunks: int) -> None:
    """Warm-up (V-1) S + 2 (S-1-r) forwards (capped at M V), then F/B in turn; forwards take
    chunks 0..V-1 for each round of S micro-batches, backwards the chunks in reverse."""
    s_, m_, v_ = num_stages, num_stages * rounds, chunks
    schedule = interleaved_1f1b(s_, m_, v_)
    for r, acts in enumerate(schedule):
        warmup = min((v_ - 1) * s_ + 2 * (s_ - 1 - r), m_ * v_)
        kinds = "".join(a.kind for a in acts)
        pairs = m_ * v_ - warmup
        assert kinds == "F" * warmup + "FB" * pairs + "B" * warmup
        fwd = [(a.chunk, a.microbatch) for a in acts if a.kind == "F"]
        assert fwd[: v_ * s_] == [(c, m) for c in range(v_) for m in range(s_)]
        bwd = [(a.chunk, a.microbatch) for a in acts if a.kind == "B"]
        assert bwd[:s_] == [(v_ - 1, m) for m in range(s_)]
