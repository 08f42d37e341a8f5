"""Interleaved 1F1B on the runtime: V model chunks per rank train bit-for-bit like one process."""

from __future__ import annotations

from pathlib import Path

import failure_cases as fc
import interleaved_cases as ic
import pytest
import runtime_cases as rc
from conftest import PoolFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pp import PipelineConfig
from adaptive_pp.core.decisions import MoveLayers, SetMicrobatches
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import ScheduleError, interleaved_1f1b, validate
from adaptive_pp.core.simulator import Costs, simulate

WIDTHS = (5, 4, 6, 3, 5, 4, 3, 2, 4, 6, 5, 3, 4, 5)


def _case(stages: int, chunks: int, m: int, optimizer: str, seed: int = 5) -> rc.Case:
    layers = stages * chunks + 1  # one virtual stage holds two layers
    bounds = (0, *range(2, layers + 1))
    return rc.Case(
        seed, WIDTHS[: layers + 1], bounds, m, "interleaved-1f1b", optimizer, 3, chunks=chunks
    )


# --- one process ------------------------------------------------------------------------------


def test_each_chunk_runs_its_backwards_in_microbatch_order() -> None:
    """What exactness rests on: a parameter lives in one chunk, and each chunk's B's (its .grad
    accumulations) go in micro-batch order, as the reference's backwards do."""
    for stages in range(1, 6):
        for chunks in range(1, 5):
            for m in range(stages, 4 * stages + 1, stages):
                for acts in interleaved_1f1b(stages, m, chunks).stages:
                    for c in range(chunks):
                        mine = [a.microbatch for a in acts if a.chunk == c]
                        backs = [a.microbatch for a in acts if a.chunk == c and a.kind == "B"]
                        assert backs == list(range(m)), (stages, chunks, m, c)
                        assert len(mine) == 2 * m


def test_config_checks_chunks_partition_and_microbatches() -> None:
    cfg = PipelineConfig(schedule="interleaved-1f1b", chunks=3, partition=(0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"4 stages, but .* the run 6 stages \(2 ranks x 3 chunks"):
        cfg.resolve_partition(4, 2)
    part = PipelineConfig(schedule="interleaved-1f1b").resolve_partition(9, 2)
    assert part.num_stages == 4 and part.bounds == (0, 3, 5, 7, 9)  # S*V ranges, model order
    assert PipelineConfig(schedule="1f1b", chunks=3).resolve_partition(9, 2).num_stages == 2
    with pytest.raises(ValueError, match=r"6 virtual stages .* the model has 5 layers"):
        PipelineConfig(schedule="interleaved-1f1b", chunks=3).resolve_partition(5, 2)
    with pytest.raises(ScheduleError, match=r"micro-batches \(3\) to be a multiple of the stages"):
        PipelineConfig(schedule="interleaved-1f1b", stages=2, microbatches=3)
    with pytest.raises(ValueError, match="chunks must be an int >= 1"):
        PipelineConfig(schedule="interleaved-1f1b", chunks=0)


# --- several processes ------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize(("stages", "chunks"), [(2, 2), (3, 2), (2, 3)])
def test_interleaved_training_equals_single_process(
    pools: PoolFor, stages: int, chunks: int
) -> None:
    case = _case(stages, chunks, 2 * stages, "adam")
    ranks = pools(stages).run(rc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks)
    report = StepReport.from_dict(ranks[0]["report"])
    expected = interleaved_1f1b(stages, case.microbatches, chunks)
    assert report.schedule == "interleaved-1f1b"
    assert [list(report.timeline.actions[s]) for s in range(stages)] == [
        list(a) for a in expected.stages
    ]
    # Per rank, over its chunks: the validator's peak stash; layers of all its chunks.
    assert [s.peak_stash for s in report.stages] == list(validate(expected).peak)
    for s in report.stages:
        want = [i for c in range(chunks) for i in range(*case.bounds[c * stages + s.stage :][:2])]
        assert list(s.layers) == want and all(t > 0 for t in s.layer_backward)
    # One queue per link and kind, the wrap-around link's included, as simulated.
    sim = simulate(expected, Costs.build(stages, case.microbatches, 1.0, 2.0))
    assert {(q.src, q.dst, q.kind) for q in report.queues} == {
        (q.src, q.dst, q.kind) for q in sim.queues
    }


@pytest.mark.multiprocess
def test_m_not_a_multiple_of_s_is_refused_then_a_new_m_trains(pools: PoolFor) -> None:
    case = rc.Case(**{**_case(2, 2, 2, "sgd", seed=9).__dict__, "per_microbatch": 6})
    ranks = pools(2).run(ic.job_refusals, case, 4, timeout=120)
    rc.assert_matches_reference(case, ranks, {1: 4})
    for r in ranks:
        assert "micro-batches (3) to be a multiple of the stages (2)" in r["refused"]
        assert r["m"] == 4 and r["bounds"] == case.bounds


@pytest.mark.multiprocess
def test_moves_between_virtual_stages_across_the_wrap_and_m_changes(pools: PoolFor) -> None:
    """Virtual stage 2 (rank 2, chunk 0) gives a layer to 3 (rank 0, chunk 1) over the wrap
    link, then 4 (rank 1, chunk 1) one to 3; and M goes 3 -> 6."""
    case = rc.Case(8, WIDTHS[:10], (0, 2, 3, 5, 6, 8, 9), 3, "interleaved-1f1b", "adam", 4)
    changes = {1: [MoveLayers(2, 3, 1)], 2: [MoveLayers(4, 3, 1), SetMicrobatches(6)]}
    ranks = pools(3).run(rc.train_pipelined, case, changes, timeout=120)
    rc.assert_matches_reference(case, ranks, {2: 6})
    assert ranks[0]["bounds"] == (0, 2, 3, 4, 7, 8, 9) and ranks[0]["m"] == 6
    assert sum("moved layers" in e for e in ranks[0]["events"]) == 2


@pytest.mark.multiprocess
def test_checkpoint_of_chunks_resumes_interleaved_and_on_other_plans(
    pools: PoolFor, tmp_path: Path
) -> None:
    """Saved with 2 chunks on 2 ranks; resumed the same way, with 3 chunks, and under 1F1B."""
    saved = rc.Case(3, WIDTHS[:7], (0, 2, 3, 5, 6), 2, "interleaved-1f1b", "adam", 4, chunks=2)
    path = str(tmp_path / "ck")
    pools(2).run(rc.job_checkpoint_then_resume, saved, 2, path, "save", timeout=90)
    ref_losses, ref_state, _ = rc.train_reference(saved)
    resumes = [
        saved,
        rc.Case(**{**saved.__dict__, "chunks": 3, "bounds": (0, 1, 2, 3, 4, 5, 6)}),
        rc.Case(**{**saved.__dict__, "schedule": "1f1b", "bounds": (0, 2, 4, 6)}),
    ]
    for resumed in resumes:
        ranks = pools(len(resumed.bounds) - 1 if resumed.schedule == "1f1b" else 2).run(
            rc.job_checkpoint_then_resume,
            resumed,
            2,
            path,
            "resume",
            timeout=90,
        )
        rc.assert_held_equal(ranks, ref_state, resumed)
        last = [r for r in ranks if r["losses"]]
        assert all(r["losses"] == ref_losses[2:] for r in last)


@pytest.mark.multiprocess
def test_a_nan_loss_is_undone_on_every_rank_and_training_goes_on(pools: PoolFor) -> None:
    """The last micro-batch's loss (rank 1, chunk 1) is NaN at step AT: every rank has run all
    its forwards, none has stepped, so all undo it; the loop that goes on stays exact."""
    case = rc.Case(**{**_case(2, 2, 2, "adam", seed=4).__dict__, "steps": fc.AT + 2})
    ranks = pools(2).run(fc.job_catch_and_continue, "nan", case, timeout=120)
    for out in ranks:
        assert [(e["step"], e["kind"], e["undone"]) for e in out["errors"]] == [
            (fc.AT, "NonFiniteLoss", True)
        ]
    rc.assert_matches_reference(case, ranks, skip=frozenset({fc.AT}))


@pytest.mark.multiprocess
def test_a_failing_forward_after_a_chunks_forwards_is_undone(pools: PoolFor) -> None:
    """Rank 0 fails in its last forward (3 of its M * V = 4 done, more than M): no rank can
    have stepped (the loss needs that forward), so every rank undoes the step."""
    ranks = pools(2).run(ic.job_late_forward_failure, timeout=120)
    for out in ranks:
        assert out["errors"] == [(0, "StageFailure", True)] and len(out["losses"]) == 1


@st.composite
def interleaved_cases(draw: st.DrawFn) -> rc.Case:
    """Random small MLPs on 2-3 ranks x 2-3 chunks, random partitions, M a multiple of S."""
    stages, chunks = draw(st.integers(2, 3)), draw(st.integers(2, 3))
    vstages = stages * chunks
    widths, bounds = rc.draw_layout(draw, vstages, draw(st.integers(vstages, vstages + 3)))
    return rc.Case(
        seed=draw(st.integers(0, 10_000)),
        widths=widths,
        bounds=bounds,
        microbatches=stages * draw(st.integers(1, 2)),
        schedule="interleaved-1f1b",
        optimizer=draw(st.sampled_from(["sgd", "adam"])),
        steps=draw(st.integers(2, 3)),
        per_microbatch=draw(st.integers(1, 2)),
        chunks=chunks,
    )


@pytest.mark.multiprocess
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=interleaved_cases())
def test_interleaved_random_partitions_equal_single_process(pools: PoolFor, case: rc.Case) -> None:
    stages = (len(case.bounds) - 1) // case.chunks
    ranks = pools(stages).run(rc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks)
