"""ZB-V on the runtime: 2 chunks per rank in V placement, split backward, bit-for-bit like one
process; moves (the turn's local one included), M changes, refused switches, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import failure_cases as fc
import pytest
import runtime_cases as rc
import switch_cases as sc
from conftest import PoolFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pp import PipelineConfig
from adaptive_pp.core.decisions import MoveLayers, Plan, SetMicrobatches, SetSchedule
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import validate, zb_v
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.runtime.checkpoint import CheckpointError, read_meta
from adaptive_pp.runtime.step import undoable
from controllers import SwitchConfig, default_policy

WIDTHS = (5, 4, 6, 3, 5, 4, 3, 2, 4, 6)


def _case(stages: int, m: int, optimizer: str, seed: int = 5, steps: int = 3) -> rc.Case:
    layers = 2 * stages + 1  # virtual stage 0 holds two layers
    bounds = (0, *range(2, layers + 1))
    return rc.Case(seed, WIDTHS[: layers + 1], bounds, m, "zb-v", optimizer, steps)


# --- one process ------------------------------------------------------------------------------


def test_each_chunk_runs_its_ws_in_microbatch_order() -> None:
    """What exactness rests on: a parameter lives in one chunk and its W's (the .grad
    accumulations) go in micro-batch order, as the reference's backwards do."""
    for stages in range(1, 6):
        for m in range(1, 3 * stages + 2):
            for acts in zb_v(stages, m).stages:
                for c in (0, 1):
                    for kind in "FIW":
                        mine = [a.microbatch for a in acts if a.chunk == c and a.kind == kind]
                        assert mine == list(range(m)), (stages, m, c, kind)


def test_config() -> None:
    part = PipelineConfig(schedule="zb-v").resolve_partition(9, 2)
    assert part.num_stages == 4  # 2 ranks x 2 chunks, model order (down, then back up)
    with pytest.raises(ValueError, match="zb-v runs 2 model chunks per rank, got chunks=3"):
        PipelineConfig(schedule="zb-v", chunks=3)
    assert PipelineConfig(schedule="zb-v", stages=3, microbatches=1).chunks_per_rank() == 2


def _rank(m: int, fwd: int, last_back: int | None, chunks: int = 2) -> SimpleNamespace:
    """A stand-in LocalStage in phase "run": ``fwd`` forwards done over its chunks; the worker
    of the last virtual stage (if held) has run ``last_back`` backwards (I or B)."""
    workers = [SimpleNamespace(is_last=False, backwards_done=0) for _ in range(chunks - 1)]
    held = last_back is not None
    workers.append(SimpleNamespace(is_last=held, backwards_done=last_back or 0))
    return SimpleNamespace(
        phase="run", stream=None, workers=workers, microbatches=m, forwards_done=fwd,
        num_chunks=chunks,
    )  # fmt: skip


def test_undoable_until_the_loss_rank_sent_its_last_input_gradient() -> None:
    """ZB-V's rank 0 holds the loss and virtual stage 0: after its last I of chunk 1 every other
    rank can finish and step, while it still runs chunk 0's I's and W's: not undoable then."""
    assert undoable(_rank(3, 5, 0))  # a forward left: the loss of the last micro-batch waits
    assert undoable(_rank(3, 6, 2))  # every forward done, the last input gradient not sent
    assert not undoable(_rank(3, 6, 3))  # sent: the others may have stepped
    assert not undoable(_rank(3, 6, None))  # another rank, every forward done
    assert undoable(_rank(3, 5, None))
    assert undoable(_rank(2, 2, 1, chunks=1))  # 1F1B's last stage before its last B


def test_default_policy_proposes_no_move_or_switch_on_zb_v() -> None:
    """The rebalancer and the switcher leave a chunked plan alone (the tuner may change M,
    which zb-v runs for any M): on uneven zb-v stages, 30 steps of the default policy."""
    policy = default_policy()
    plan = Plan(Partition((0, 2, 3, 5, 6, 8, 9)), 5, "zb-v")
    costs = Costs.build(3, 5, [3.0, 1.0, 1.0], [6.0, 2.0, 2.0], tau_w=[3.0, 1.0, 1.0])
    report = simulate(zb_v(3, 5), costs)
    for _ in range(30):
        decision = policy.decide(report, plan)
        assert not isinstance(decision, MoveLayers | SetSchedule), decision
    with pytest.raises(ValueError, match="allowed schedule 'zb-v'"):
        SwitchConfig(allowed=("1f1b", "zb-v"))  # the switcher picks among one-chunk schedules


# --- several processes ------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize(("stages", "m", "optimizer"), [(2, 3, "adam"), (3, 5, "sgd")])
def test_zb_v_training_equals_single_process(
    pools: PoolFor, stages: int, m: int, optimizer: str
) -> None:
    case = _case(stages, m, optimizer)
    ranks = pools(stages).run(rc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks)
    report = StepReport.from_dict(ranks[0]["report"])
    expected = zb_v(stages, m)
    assert report.schedule == "zb-v" and report.loss == ranks[0]["losses"][-1]
    assert [list(report.timeline.actions[s]) for s in range(stages)] == [
        list(a) for a in expected.stages
    ]
    assert [s.peak_stash for s in report.stages] == list(validate(expected).peak)
    for s in report.stages:  # rank r holds virtual stages r and 2S - 1 - r
        vs = (s.stage, 2 * stages - 1 - s.stage)
        want = [i for v in vs for i in range(*case.bounds[v : v + 2])]
        assert list(s.layers) == want and all(t > 0 for t in s.layer_backward)
    # One queue per link and kind, as simulated: none for the turn on rank S-1.
    sim = simulate(expected, Costs.build(stages, m, 1.0, 2.0))
    queues = {(q.src, q.dst, q.kind) for q in report.queues}
    assert queues == {(q.src, q.dst, q.kind) for q in sim.queues}
    assert all(q.src != q.dst for q in report.queues)


@pytest.mark.multiprocess
def test_a_nan_loss_on_rank_0_is_undone_on_every_rank(pools: PoolFor) -> None:
    """The last micro-batch's loss (rank 0, chunk 1: virtual stage 2S-1) is NaN at step AT:
    rank 0 has not sent that micro-batch's input gradient, so no rank can have stepped; all
    undo it and the loop that goes on stays exact."""
    case = rc.Case(4, WIDTHS[:6], (0, 2, 3, 4, 5), 3, "zb-v", "adam", fc.AT + 2)
    ranks = pools(2).run(fc.job_catch_and_continue, "nan", case, timeout=120)
    for out in ranks:
        assert [(e["step"], e["kind"], e["undone"]) for e in out["errors"]] == [
            (fc.AT, "NonFiniteLoss", True)
        ]
    rc.assert_matches_reference(case, ranks, skip=frozenset({fc.AT}))


@st.composite
def zbv_cases(draw: st.DrawFn) -> rc.Case:
    """2-3 ranks (4-6 virtual stages), a random partition of 2S-8 layers, M in 1..6, SGD or
    Adam, 1-2 steps."""
    stages = draw(st.integers(2, 3))
    vstages = 2 * stages
    widths, bounds = rc.draw_layout(draw, vstages, draw(st.integers(vstages, 8)))
    return rc.Case(
        seed=draw(st.integers(0, 10_000)),
        widths=widths,
        bounds=bounds,
        microbatches=draw(st.integers(1, 6)),
        schedule="zb-v",
        optimizer=draw(st.sampled_from(["sgd", "adam"])),
        steps=draw(st.integers(1, 2)),
        per_microbatch=draw(st.integers(1, 2)),
    )


@pytest.mark.multiprocess
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=zbv_cases())
def test_zb_v_random_partitions_equal_single_process(pools: PoolFor, case: rc.Case) -> None:
    ranks = pools((len(case.bounds) - 1) // 2).run(rc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks)


@pytest.mark.multiprocess
def test_zb_v_moves_the_turns_local_move_and_m_changes(pools: PoolFor) -> None:
    """3 ranks: virtual stage 2 (rank 2, chunk 0) gives a layer to 3 (rank 2, chunk 1): the
    turn, nothing travels; then 4 (rank 1, chunk 1) one to 5 (rank 0) and M goes 3 -> 2."""
    case = rc.Case(8, WIDTHS[:10], (0, 2, 3, 5, 6, 8, 9), 3, "zb-v", "adam", 4)
    changes = {1: [MoveLayers(2, 3, 1)], 2: [MoveLayers(4, 5, 1), SetMicrobatches(2)]}
    ranks = pools(3).run(rc.train_pipelined, case, changes, timeout=120)
    rc.assert_matches_reference(case, ranks, {2: 2})
    assert ranks[0]["bounds"] == (0, 2, 3, 4, 6, 7, 9) and ranks[0]["m"] == 2
    moved = [e for e in ranks[0]["events"] if "moved layers" in e]
    assert len(moved) == 2 and "(0 bytes" in moved[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("schedule", "to"), [("zb-v", "1f1b"), ("1f1b", "zb-v")])
def test_switching_to_or_from_zb_v_is_refused(pools: PoolFor, schedule: str, to: str) -> None:
    bounds = (0, 2, 3, 4, 5) if schedule == "zb-v" else (0, 3, 5)
    case = rc.Case(6, WIDTHS[:6], bounds, 2, schedule, "sgd", 2)
    ranks = pools(2).run(sc.refused_switch, case, to, timeout=120)
    rc.assert_matches_reference(case, ranks)
    for r in ranks:
        assert f"cannot switch schedule {schedule} -> {to}" in r["refused"]
        assert "one model chunk per rank" in r["refused"] and r["after"] == schedule


@pytest.mark.multiprocess
def test_checkpoint_of_zb_v_resumes_under_zb_v_and_other_plans(
    pools: PoolFor, tmp_path: Path
) -> None:
    """Saved under zb-v on 2 ranks (V placement: rank 0 holds virtual stages 0 and 3); resumed
    under zb-v, under interleaved 1F1B (looping placement) and under 1F1B."""
    saved = rc.Case(3, WIDTHS[:7], (0, 2, 3, 5, 6), 2, "zb-v", "adam", 4)
    path = str(tmp_path / "ck")
    pools(2).run(rc.job_checkpoint_then_resume, saved, 2, path, "save", timeout=90)
    assert read_meta(path)["placement"] == "v" and read_meta(path)["schedule"] == "zb-v"
    ref_losses, ref_state, _ = rc.train_reference(saved)
    resumes = [
        saved,
        rc.Case(**{**saved.__dict__, "schedule": "interleaved-1f1b"}),
        rc.Case(**{**saved.__dict__, "schedule": "1f1b", "bounds": (0, 2, 6)}),
    ]
    for resumed in resumes:
        ranks = pools(2).run(rc.job_checkpoint_then_resume, resumed, 2, path, "resume", timeout=90)
        rc.assert_held_equal(ranks, ref_state, resumed)
        last = [r for r in ranks if r["losses"]]
        assert last and all(r["losses"] == ref_losses[2:] for r in last)


def test_a_checkpoint_naming_an_unknown_placement_is_refused(tmp_path: Path) -> None:
    doc = {"format": 1, "step": 1, "version": 1, "partition": [0, 1, 2], "num_layers": 2}
    doc |= {"microbatches": 1, "schedule": "zb-v", "chunks": 2, "shards": ["s"], "extra": {}}
    for placement, ok in (("v", True), ("loop", True), ("w", False)):
        (tmp_path / "meta.json").write_text(json.dumps({**doc, "placement": placement}))
        if ok:
            assert read_meta(tmp_path)["placement"] == placement
        else:
            with pytest.raises(CheckpointError, match="inconsistent"):
                read_meta(tmp_path)
