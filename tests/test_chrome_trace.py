"""adaptive_pp.chrome_trace and the rules it draws with (adaptive_pp.analysis): structure, the
wait rule, flows, markers, several runs, the replay of a measured step."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pp.core.analysis import hop_latencies, messages, replay_measured, waits
from adaptive_pp.core.report import QueueTrace, StageStats, StepReport, Timeline, append_jsonl
from adaptive_pp.core.schedules import Action, Schedule, gpipe, make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.observability.chrome_trace import (
    RunDirError,
    chrome_trace,
    event_kind,
    load_run,
    merge,
    side_by_side,
    step_offsets,
    write_chrome_trace,
)

MS = 1e-3


def sim(s: int = 3, m: int = 4, name: str = "1f1b", step: int = 0, hop: float = 0.1) -> StepReport:
    costs = Costs.build(s, m, 1.0 * MS, 2.0 * MS, hop * MS, slowdown={s - 1: 1.5})
    return simulate(make_schedule(name, s, m), costs, step=step)


def hand_report(queues: bool = True) -> StepReport:
    """Two stages, two micro-batches, times in ms chosen so the waits can be read off by hand.

    stage 0: F0 [0,1]  F1 [1,2]  B0 [4.7,6.7]  B1 [7.2,9.2]
    stage 1: F0 [1.2,2.2]  B0 [2.2,4.4]  F1 [4.5,5.5]  B1 [5.5,7.0]
    activations 0->1 arrive at 1.1 and 2.1; gradients 1->0 at 4.6 and 7.1.
    Expected waits: stage 1 before F0 [0, 1.2] (input at 1.1 > 0); stage 0 before B0
    [2, 4.7] (input at 4.6 > 2) and before B1 [6.7, 7.2] (input at 7.1 > 6.7). Stage 1's gap
    before F1 (4.4 -> 4.5) is no wait: that activation was queued since 2.1.
    """
    acts = (
        tuple(Action.parse(a) for a in ["0F0", "0F1", "0B0", "0B1"]),
        tuple(Action.parse(a) for a in ["1F0", "1B0", "1F1", "1B1"]),
    )
    start = ((0.0, 1.0, 4.7, 7.2), (1.2, 2.2, 4.5, 5.5))
    end = ((1.0, 2.0, 6.7, 9.2), (2.2, 4.4, 5.5, 7.0))
    ms = lambda rows: tuple(tuple(x * MS for x in row) for row in rows)  # noqa: E731
    traces = (
        QueueTrace(0, 1, "act", (1.1 * MS, 2.1 * MS), (1.15 * MS, 4.45 * MS)),
        QueueTrace(1, 0, "grad", (4.6 * MS, 7.1 * MS), (4.65 * MS, 7.15 * MS)),
    )
    return StepReport(
        step=7,
        schedule="custom",
        microbatches=2,
        step_time=9.2 * MS,
        stages=(
            StageStats(0, compute=6.0 * MS, wait=3.2 * MS, wall=9.2 * MS, peak_stash=2),
            StageStats(1, compute=5.9 * MS, wait=1.2 * MS, wall=9.2 * MS, peak_stash=1),
        ),
        queues=traces if queues else (),
        timeline=Timeline(acts, ms(start), ms(end)),
        partition=(0, 3, 6),
        source="runtime",
    )


def events_of(trace: dict[str, Any], ph: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in trace["traceEvents"]
        if e["ph"] == ph and all(e.get(k) == v for k, v in match.items())
    ]


def stage_pids(trace: dict[str, Any]) -> dict[str, int]:
    return {e["args"]["name"]: e["pid"] for e in events_of(trace, "M", name="process_name")}


def check_structure(trace: dict[str, Any], reports: list[StepReport]) -> None:
    """Invariants every trace must hold; raises AssertionError naming the broken one."""
    evs = trace["traceEvents"]
    for e in evs:
        assert {"ph", "ts", "pid", "tid", "name"} <= e.keys(), e
        assert e["pid"] >= 1 and e["tid"] in (10 * e["pid"] + 1, 10 * e["pid"] + 2), e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
        assert math.isfinite(e["ts"]), e
    s_count = max(r.num_stages for r in reports)
    names = stage_pids(trace)
    assert sorted(n for n in names if "stage" in n) == sorted(f"stage {s}" for s in range(s_count))
    # F/B slices: S*M per step, F and B once per (stage, micro-batch)
    for r in reports:
        fb = [e for e in events_of(trace, "X") if e.get("cat") in ("forward", "backward")]
        fb = [e for e in fb if e["args"]["step"] == r.step]
        assert len(fb) == 2 * r.num_stages * r.microbatches
        assert Counter(e["name"][0] for e in fb) == {
            "F": r.num_stages * r.microbatches,
            "B": r.num_stages * r.microbatches,
        }
    # the compute thread of each stage holds disjoint slices (viewers need proper nesting)
    for pid in {names[f"stage {s}"] for s in range(s_count)}:
        xs = sorted((e["ts"], e["dur"]) for e in events_of(trace, "X", pid=pid, tid=10 * pid + 1))
        for (t0, d0), (t1, _) in zip(xs, xs[1:]):
            assert t0 + d0 <= t1 + 2e-3, (pid, t0, d0, t1)
    # flows: each id starts once and finishes once, finish after start, inside its slices
    starts = {e["id"]: e for e in events_of(trace, "s")}
    finishes = {e["id"]: e for e in events_of(trace, "f")}
    assert len(starts) == len(events_of(trace, "s"))
    assert starts.keys() == finishes.keys()
    assert len(starts) == sum(2 * (r.num_stages - 1) * r.microbatches for r in reports)
    for fid, s_ev in starts.items():
        f_ev = finishes[fid]
        assert f_ev["bp"] == "e" and f_ev["name"] == s_ev["name"]
        assert f_ev["ts"] >= s_ev["ts"]
        assert abs(f_ev["pid"] - s_ev["pid"]) == 1
        for ev in (s_ev, f_ev):
            assert any(
                x["ts"] <= ev["ts"] <= x["ts"] + x["dur"] and x.get("cat") != "wait"
                for x in events_of(trace, "X", pid=ev["pid"], tid=10 * ev["pid"] + 1)
            ), ev


def test_hand_derived_waits() -> None:
    r = hand_report()
    got = sorted(
        (
            w.stage,
            f"{w.action.kind}{w.action.microbatch}",
            round(w.start / MS, 6),
            round(w.end / MS, 6),
        )
        for w in waits(r)
    )
    assert got == [(0, "B0", 2.0, 4.7), (0, "B1", 6.7, 7.2), (1, "F0", 0.0, 1.2)]
    trace = chrome_trace([r])
    pids = stage_pids(trace)
    slices = sorted(
        (e["pid"], e["args"]["for"], e["ts"], e["dur"]) for e in events_of(trace, "X", name="wait")
    )
    assert slices == [
        (pids["stage 0"], "B0", 2000.0, 2700.0),
        (pids["stage 0"], "B1", 6700.0, 500.0),
        (pids["stage 1"], "F0", 0.0, 1200.0),
    ]
    check_structure(trace, [r])


def test_messages_match_consumers_and_producers() -> None:
    msgs = {(m.kind, m.microbatch): m for m in messages(hand_report())}
    assert set(msgs) == {("act", 0), ("act", 1), ("grad", 0), ("grad", 1)}
    act1 = msgs[("act", 1)]
    assert act1.producer is not None and str(act1.producer.action) == "0F1"
    assert str(act1.consumer.action) == "1F1"
    assert (act1.arrived, act1.consumed) == (2.1 * MS, 4.45 * MS)
    assert str(msgs[("grad", 0)].consumer.action) == "0B0"


def test_without_queue_traces_inputs_arrive_when_produced() -> None:
    r = hand_report(queues=False)
    got = sorted((w.stage, w.action.microbatch, round(w.start / MS, 6)) for w in waits(r))
    # arrival = producer end: act 0 at 1.0, grad 0 at 4.4 (> 2), grad 1 at 7.0 (> 6.7)
    assert got == [(0, 0, 2.0), (0, 1, 6.7), (1, 0, 0.0)]
    assert len(events_of(chrome_trace([r]), "s")) == 4


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_simulated_waits_add_up_to_stage_wait(name: str) -> None:
    r = sim(4, 6, name)
    for st_ in r.stages:
        total = sum(w.end - w.start for w in waits(r) if w.stage == st_.stage)
        assert total == pytest.approx(st_.wait, abs=1e-12)
    assert any(w.stage == 3 for w in waits(r))


def test_structure_of_several_steps_and_json_round_trip(tmp_path: Path) -> None:
    reports = [sim(3, 4, step=i) for i in range(3)]
    trace = chrome_trace(reports)
    check_structure(trace, reports)
    path = write_chrome_trace(tmp_path / "sub" / "trace.json", reports)
    assert json.loads(path.read_text()) == trace
    # steps laid end to end: step slices start at 0, T, 2T
    steps = events_of(trace, "X", cat="step")
    t = reports[0].step_time * 1e6
    assert [e["ts"] for e in steps] == pytest.approx([0.0, t, 2 * t])
    assert [e["name"] for e in steps] == ["step 0", "step 1", "step 2"]


def test_offsets_use_wall_change_or_recorded_offsets() -> None:
    base = sim()
    a = replace(base, extra={"wall": 0.05})
    b = replace(base, step=1, extra={"wall": 0.04, "change": 0.01})
    assert step_offsets([a, b]) == pytest.approx([0.0, 0.06])
    c = replace(base, extra={"offset": 10.0})
    d = replace(base, step=1, extra={"offset": 12.5})
    assert step_offsets([c, d]) == pytest.approx([0.0, 2.5])
    assert step_offsets([]) == []


def test_decision_markers_at_the_step_boundary() -> None:
    texts = (
        "moved layers 4-4 from stage 2 to stage 1 (1088 bytes, 3.1 ms); partition 0-3 | 4-5",
        "set micro-batches 4 -> 8",
        "refused move 9 layer(s) 0->1: would leave stage 0 empty",
    )
    r0 = replace(sim(), extra={"wall": 0.05})
    r1 = replace(sim(step=1), events=texts, extra={"wall": 0.05, "change": 0.004})
    trace = chrome_trace([r0, r1])
    marks = [e for e in events_of(trace, "i") if e.get("cat") != "message"]
    assert [e["name"] for e in marks] == list(texts)
    assert [e["cat"] for e in marks] == ["migration", "microbatches", "refused"]
    assert {e["s"] for e in marks} == {"g"}
    assert all(e["ts"] == pytest.approx(50000.0) for e in marks)  # after step 0, before step 1
    (apply,) = events_of(trace, "X", name="apply decisions")
    assert apply["ts"] == pytest.approx(50000.0) and apply["dur"] == pytest.approx(4000.0)
    assert events_of(trace, "X", name="step 1")[0]["ts"] == pytest.approx(54000.0)
    assert [
        event_kind(t)
        for t in ("moved x", "set micro-batches 2 -> 4", "refused move 1 layer(s) 0->1: x", "z")
    ] == [
        "migration",
        "microbatches",
        "refused",
        "other",
    ]


def test_queue_depth_counters_follow_the_queue_trace() -> None:
    r = sim(2, 6, "gpipe")
    trace = chrome_trace([r])
    pids = stage_pids(trace)
    depth = [
        e["args"]["depth"]
        for e in events_of(trace, "C", name="queue act from stage 0", pid=pids["stage 1"])
    ]
    assert depth[0] == 0
    assert max(depth) == r.queue(0, 1).max_depth
    assert len(depth) == 1 + 2 * r.microbatches


def test_side_by_side_keeps_runs_apart() -> None:
    measured = [replace(sim(step=i), source="runtime") for i in range(2)]
    simulated = [sim(step=i, hop=0.0) for i in range(2)]
    trace = side_by_side({"measured": measured, "simulated": simulated})
    names = stage_pids(trace)
    assert {"measured: stage 0", "simulated: stage 2", "measured: steps"} <= names.keys()
    assert len(set(names.values())) == len(names) == 2 * 4
    ids = [e["id"] for e in events_of(trace, "s")]
    assert len(ids) == len(set(ids)) == 2 * 2 * 2 * 2 * 4
    assert sorted(ids) == sorted(e["id"] for e in events_of(trace, "f"))
    with pytest.raises(ValueError, match="share pids"):
        merge(chrome_trace(measured), chrome_trace(simulated))


def test_load_run_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match=str(tmp_path / "reports.jsonl")):
        load_run(tmp_path)
    (tmp_path / "reports.jsonl").write_text("")
    with pytest.raises(RunDirError, match="no step reports"):
        load_run(tmp_path)
    (tmp_path / "reports.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="malformed"):
        load_run(tmp_path)
    (tmp_path / "reports.jsonl").unlink()
    append_jsonl(tmp_path / "reports.jsonl", sim())
    assert load_run(tmp_path) == load_run(tmp_path / "reports.jsonl")
    assert load_run(tmp_path)[0].microbatches == 4


def permuted_gpipe(s: int, m: int, f_order: list[int], b_order: list[int]) -> Schedule:
    """All forwards then all backwards, in the same (permuted) micro-batch order on each stage."""
    stages = tuple(
        tuple(Action(i, "F", k) for k in f_order) + tuple(Action(i, "B", k) for k in b_order)
        for i in range(s)
    )
    return Schedule(stages, m, "permuted")


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    s = draw(st.integers(1, 5))
    m = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["1f1b", "gpipe", "permuted"]))
    if kind != "permuted":
        return make_schedule(kind, s, m)
    f_order = draw(st.permutations(range(m)))
    b_order = draw(st.permutations(range(m)))
    return permuted_gpipe(s, m, list(f_order), list(b_order))


@given(
    sched=schedules(),
    data=st.data(),
    steps=st.integers(1, 3),
)
def test_property_structure_waits_and_flows(
    sched: Schedule, data: st.DataObject, steps: int
) -> None:
    s, m = sched.num_stages, sched.microbatches
    cost = st.floats(0.1, 5.0)
    reports = []
    for i in range(steps):
        tf = data.draw(st.lists(cost, min_size=s, max_size=s))
        tb = data.draw(st.lists(cost, min_size=s, max_size=s))
        hop = data.draw(st.floats(0.0, 1.0))
        reports.append(simulate(sched, Costs.build(s, m, tf, tb, hop), step=i))
    trace = chrome_trace(reports)
    check_structure(trace, reports)
    for r in reports:
        for st_ in r.stages:
            total = sum(w.end - w.start for w in waits(r) if w.stage == st_.stage)
            assert total == pytest.approx(st_.wait, rel=1e-9, abs=1e-9)
        # every message consumed no earlier than it arrived, produced no later than it arrived
        for msg in messages(r):
            assert msg.consumer.start >= msg.arrived - 1e-12
            assert msg.producer is not None and msg.producer.end <= msg.arrived + 1e-12
            assert msg.producer.microbatch == msg.consumer.microbatch
    assert json.loads(json.dumps(trace, allow_nan=False)) == trace


def test_gpipe_single_stage_has_no_flows_or_waits() -> None:
    r = simulate(gpipe(1, 3), Costs.build(1, 3, 1.0, 2.0))
    trace = chrome_trace([r])
    assert waits(r) == [] and events_of(trace, "s") == []
    check_structure(trace, [r])


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "zb-h1"])
def test_replay_of_a_simulated_step_reproduces_it(name: str) -> None:
    costs = Costs.build(3, 5, [[1.0, 2.0, 0.5, 1.5, 1.0], 1.2, 0.8], 2.0, [0.3, 0.1])
    r = replace(
        simulate(make_schedule(name, 3, 5), costs, step=4),
        events=("set micro-batches 4 -> 5",),
        extra={"wall": 30.0},
    )
    again = replay_measured(r)
    assert again.step == 4 and again.events == r.events and again.extra == r.extra
    assert again.step_time == pytest.approx(r.step_time)
    for a, b in zip(again.timeline, r.timeline, strict=True):
        assert a.action == b.action
        assert (a.start, a.end) == pytest.approx((b.start, b.end))
    assert [st_.wait for st_ in again.stages] == pytest.approx([st_.wait for st_ in r.stages])


def test_replay_hop_is_the_delay_waiting_consumers_saw() -> None:
    """hand_report's waited-for messages: 1F0 starts 0.2 ms after 0F0 ends, 0B0 0.3 ms after
    1B0, 0B1 0.2 ms after 1B1 (1F1's activation was queued): median 0.2 ms, where arrivals
    alone would say 0.1 ms."""
    first = replay_measured(hand_report()).timeline.stage(1)[0]
    assert first.action == Action.parse("1F0")
    assert first.start == pytest.approx(1.2 * MS)


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "zb-h1"])
def test_hop_latencies_of_a_simulated_step_are_its_hop_costs(name: str) -> None:
    costs = Costs.build(3, 5, 1.0 * MS, 2.0 * MS, [0.3 * MS, 0.1 * MS], slowdown={1: 1.7})
    r = simulate(make_schedule(name, 3, 5), costs)
    assert hop_latencies(r) == pytest.approx([0.3 * MS, 0.1 * MS])


def test_replay_with_given_hops_is_the_step_with_those_hops() -> None:
    """Zero hops: what the same action durations give with free communication."""
    tau_f = [[1.0, 1.3, 0.9, 1.1], 1.2, 0.8]
    with_hops = simulate(make_schedule("1f1b", 3, 4), Costs.build(3, 4, tau_f, 2.0, 0.4))
    free = simulate(make_schedule("1f1b", 3, 4), Costs.build(3, 4, tau_f, 2.0, 0.0))
    again = replay_measured(with_hops, [0.0, 0.0])
    assert again.step_time == pytest.approx(free.step_time)
    assert free.step_time < with_hops.step_time
    assert replay_measured(with_hops).step_time == pytest.approx(with_hops.step_time)
