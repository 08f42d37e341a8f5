"""PipeDream-2BW: 1F1B without a flush, two weight versions, equal to its update rule."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import runtime_cases as rc
import twobw_cases as tc
from conftest import PoolFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pp.core import twobw
from adaptive_pp.core.decisions import MoveLayers, SetMicrobatches
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule, one_f_one_b
from adaptive_pp.runtime.launch import LaunchError, launch


def test_windows_and_drain_are_one_unflushed_1f1b_stream() -> None:
    """Step k's window with ids shifted by k*M, then the drain: exactly 1F1B over steps x M."""
    for s_count in range(1, 6):
        for m in range(max(1, s_count - 1), 7):
            for steps in range(1, 4):
                flat = one_f_one_b(s_count, steps * m)
                for s in range(s_count):
                    acts = []
                    for k in range(steps):
                        window = twobw.window(s_count, m, s, spill=k > 0)
                        acts += [a._replace(microbatch=a.microbatch + k * m) for a in window]
                    drain = twobw.drain(s_count, m, s)
                    acts += [a._replace(microbatch=a.microbatch + steps * m) for a in drain]
                    assert tuple(acts) == flat.stages[s]


def test_fewer_microbatches_than_stages_minus_one_are_refused() -> None:
    with pytest.raises(ValueError, match="M >= S - 1"):
        twobw.window(4, 2, 0, spill=True)


WIDTHS = (5, 4, 6, 3, 5, 4, 3, 2, 4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_2bw_equals_its_update_rule(pools: PoolFor, stages: int, optimizer: str) -> None:
    layers = 2 * stages
    case = rc.Case(7, WIDTHS[: layers + 1], tuple(range(0, layers + 1, 2)), 4, "2bw", optimizer, 4)
    ranks = pools(stages).run(tc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case))


@st.composite
def cases(draw: st.DrawFn) -> rc.Case:
    """Random small MLPs on 1-4 stages, random partitions, lead 1 or 2, M >= lead x (S - 1),
    SGD and Adam."""
    lead = draw(st.sampled_from([1, 2]))
    case = rc.draw_case(draw, ["2bw"], min_m=lambda s: max(1, lead * (s - 1)), max_m=6, max_steps=5)
    return replace(case, lead=lead)


@pytest.mark.multiprocess
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=cases(), flush_every=st.integers(0, 3))
def test_2bw_equals_its_update_rule_hypothesis(
    pools: PoolFor, case: rc.Case, flush_every: int
) -> None:
    """Any stages, partition, lead, M >= lead x (S - 1), optimizer; drained every
    ``flush_every`` steps (0: only at the end): a drain ends the stream, the rule goes on."""
    ranks = pools(len(case.bounds) - 1).run(tc.train_pipelined, case, flush_every, timeout=120)
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case))


@pytest.mark.multiprocess
def test_the_report_shows_the_window_run(pools: PoolFor) -> None:
    """The last step's timeline is the steady window: the previous step's backwards spilled
    into it by negative ids; every message checked; peak stash as 1F1B's."""
    case = rc.Case(3, (4,) * 5, (0, 1, 2, 3, 4), 4, "2bw", "sgd", 3)
    ranks = pools(4).run(tc.train_pipelined, case, timeout=120)
    report = StepReport.from_dict(ranks[0]["report"])
    assert report.schedule == "2bw" and report.step == 2
    steady = make_schedule("2bw", 4, 4)
    assert [list(a) for a in report.timeline.actions] == [list(a) for a in steady.stages]
    assert [a.microbatch for a in report.timeline.actions[0] if a.kind == "B"] == [-3, -2, -1, 0]
    assert report.peak_stash == tuple(min(4 - s, 4) for s in range(4))
    for q in report.queues:
        assert len(q.arrived) == 4


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["message", "stash"])
def test_a_wrong_version_is_refused_loudly(mode: str) -> None:
    """A message stamped with another version, or a backward whose stash claims another one:
    VersionMismatch naming the stage, the layers and the micro-batch, on every rank."""
    with pytest.raises(LaunchError) as info:
        launch(tc.job_tampered, 3, mode, timeout=90)
    root = info.value.root
    assert root.kind == "VersionMismatch", info.value
    if mode == "message":  # stage 1 receives stage 0's activation of step 2's micro-batch 0
        assert root.rank == 1
        assert "stage 1 received the activation of micro-batch 0 computed by layers 0-0" in (
            root.message
        )
        assert "weight version 2, but its weights are at version 1" in root.message
    else:  # stage 0's backward of step 1's last micro-batch (id -1 in step 2)
        assert root.rank == 0
        assert "stage 0 received the gradient of micro-batch -1 computed by layers 1-1" in (
            root.message
        )
        assert "but its stash of it ran on version 5" in root.message


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_moves_and_m_changes_between_streams(pools: PoolFor, optimizer: str) -> None:
    """A move or an M change drains the stream first; a moved layer carries both weight
    versions and its optimizer state: still the update rule, step for step."""
    case = rc.Case(11, WIDTHS[:7], (0, 2, 4, 6), 3, "2bw", optimizer, 6)
    changes = {
        2: [MoveLayers(0, 1, 1)],
        3: [MoveLayers(2, 1, 1), SetMicrobatches(6)],
        5: [MoveLayers(1, 0, 2)],
    }
    ranks = pools(3).run(tc.train_pipelined, case, 0, changes, timeout=120)
    m_from = {3: 6}
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case, m_from))
    assert ranks[0]["bounds"] == (0, 3, 5, 6) and ranks[0]["m"] == 6
    assert sum("moved layers" in e for e in ranks[0]["events"]) == 3


@pytest.mark.multiprocess
def test_a_checkpoint_keeps_both_versions_and_resumes_on_another_stage_count(
    pools: PoolFor, tmp_path: Path
) -> None:
    """Saved on 3 stages after 3 steps (drained, both versions), resumed on 2 with another
    partition: the last 3 steps and the final state are the update rule's."""
    widths = WIDTHS[:7]
    three = rc.Case(5, widths, (0, 2, 4, 6), 3, "2bw", "adam", 6)
    two = rc.Case(5, widths, (0, 4, 6), 3, "2bw", "adam", 6)
    path = str(tmp_path / "ckpt")
    first = pools(3).run(tc.train_through_checkpoint, three, 3, path, False, timeout=120)
    ranks = pools(2).run(tc.train_through_checkpoint, two, 3, path, True, timeout=120)
    losses, _, _ = reference = tc.train_reference(three)
    assert first[-1]["losses"] == losses[:3]
    for r in ranks:
        r["losses"] = first[-1]["losses"] + r["losses"]
    rc.assert_matches_reference(two, ranks, reference=reference)


@pytest.mark.multiprocess
def test_memory_is_two_weight_versions_plus_1f1b_activations(pools: PoolFor) -> None:
    """Per stage: weights x 2 versions, and at most S - s micro-batches' activations in flight
    (1F1B's closed form), each as many bytes as under flushed 1F1B."""
    case = rc.Case(3, (4, 6, 5, 3, 4), (0, 1, 2, 3, 4), 4, "2bw", "sgd", 3)
    flushed = replace(case, schedule="1f1b")
    ranks = pools(4).run(tc.train_pipelined, case, timeout=120)
    ref = pools(4).run(rc.train_pipelined, flushed, timeout=120)
    async_r, sync_r = (StepReport.from_dict(r[0]["report"]) for r in (ranks, ref))
    model = rc.build_model(case)
    for s, (a, b) in enumerate(zip(async_r.stages, sync_r.stages, strict=True)):
        params = sum(p.nbytes for p in model[s].parameters())
        assert (a.weight_bytes, b.weight_bytes) == (2 * params, params)
        assert a.peak_stash == b.peak_stash == 4 - s
        assert a.peak_stash_bytes == b.peak_stash_bytes > 0


@pytest.mark.multiprocess
def test_a_controllers_decisions_land_between_streams(pools: PoolFor) -> None:
    """Decisions a controller makes after a step (a move, an M change) drain the stream
    first, as ``apply`` does: the update rule holds across them."""
    case = rc.Case(13, WIDTHS[:7], (0, 2, 4, 6), 4, "2bw", "adam", 5)
    script = {1: MoveLayers(1, 2, 1), 2: SetMicrobatches(2)}
    ranks = pools(3).run(tc.train_pipelined, case, 0, None, script, timeout=120)
    reference = tc.train_reference(case, {3: 2})
    rc.assert_matches_reference(case, ranks, reference=reference)
    assert ranks[0]["bounds"] == (0, 2, 3, 6) and ranks[0]["m"] == 2


def test_2bw_refuses_activation_checkpointing() -> None:
    """Recomputation in a spilled backward would run on the next step's weights: refused."""
    from adaptive_pp import PipelineConfig

    with pytest.raises(ValueError, match="2bw with activation_checkpointing"):
        PipelineConfig(schedule="2bw", activation_checkpointing=True)
