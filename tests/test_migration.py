"""Multi-process: live migration, M changes, the version guard and checkpoints keep the math."""

from __future__ import annotations

from pathlib import Path

import pytest
import runtime_cases as rc
import torch
from conftest import PoolFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pp.core.decisions import Decision, MoveLayers, SetMicrobatches
from adaptive_pp.core.partition import Partition
from adaptive_pp.runtime.launch import LaunchError, launch

pytestmark = pytest.mark.multiprocess


@st.composite
def runs(draw: st.DrawFn) -> tuple[rc.Case, dict[int, list[Decision]], dict[int, int]]:
    """A random model and partition, and random valid moves and M changes at random steps."""
    stages = draw(st.integers(2, 4))
    widths, bounds = rc.draw_layout(draw, stages, draw(st.integers(stages + 1, 8)), max_width=6)
    m = draw(st.sampled_from([1, 2, 4]))
    case = rc.Case(
        seed=draw(st.integers(0, 10_000)),
        widths=widths,
        bounds=bounds,
        microbatches=m,
        schedule=draw(st.sampled_from(["1f1b", "gpipe"])),
        optimizer=draw(st.sampled_from(["sgd", "adam"])),
        steps=draw(st.integers(2, 4)),
        per_microbatch=2,
    )
    part = Partition(case.bounds)
    changes: dict[int, list[Decision]] = {}
    m_from: dict[int, int] = {}
    for k in range(1, case.steps):
        for _ in range(draw(st.integers(0, 2))):
            movable = [s for s in range(stages) if part.sizes[s] > 1]
            if not movable:
                break
            src = draw(st.sampled_from(movable))
            dst = draw(st.sampled_from([d for d in (src - 1, src + 1) if 0 <= d < stages]))
            count = draw(st.integers(1, part.sizes[src] - 1))
            part = part.move(src, dst, count)
            changes.setdefault(k, []).append(MoveLayers(src, dst, count))
        if draw(st.booleans()):
            new_m = draw(st.sampled_from([d for d in (1, 2, 4, 8) if case.batch % d == 0]))
            changes.setdefault(k, []).append(SetMicrobatches(new_m))
            m_from[k] = new_m
    return case, changes, m_from


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(run=runs())
def test_migrations_and_m_changes_keep_training_exact(pools: PoolFor, run) -> None:
    case, changes, m_from = run
    ranks = pools(len(case.bounds) - 1).run(rc.train_pipelined, case, changes, timeout=120)
    rc.assert_matches_reference(case, ranks, m_from)
    moves = [d for ds in changes.values() for d in ds if isinstance(d, MoveLayers)]
    assert sum("moved layers" in e for e in ranks[0]["events"]) == len(moves)
    assert len({r["bounds"] for r in ranks}) == 1


def test_migration_step_is_marked_in_the_report(pools: PoolFor) -> None:
    case = rc.Case(1, (4,) * 7, (0, 2, 4, 6), 2, "1f1b", "adam", 3)
    ranks = pools(3).run(rc.train_pipelined, case, {2: [MoveLayers(2, 1, 1)]}, timeout=120)
    assert ranks[0]["bounds"] == (0, 2, 5, 6)
    (event,) = ranks[0]["events"]
    assert event.startswith("moved layers 4-4 from stage 2 to stage 1 (") and "bytes" in event
    assert ranks[0]["report"]["step"] == 2 and list(ranks[0]["report"]["events"]) == [event]


def test_aborted_migration_keeps_the_old_plan_and_loses_nothing(
    pools: PoolFor,
) -> None:
    case = rc.Case(2, (3, 4, 5, 4, 3), (0, 2, 4), 2, "1f1b", "adam", 3)
    ranks = pools(2).run(rc.job_aborted_move, case, timeout=120)
    for r in ranks:
        assert "aborted before commit" in r["error"] and "layers.2" in r["error"]
        assert r["bounds"] == case.bounds
    ref_losses, ref_state, _ = rc.train_reference(case)
    assert ranks[-1]["losses"] == ref_losses[1:]
    # Stage 1 still holds layer 2 with its trained weights; stage 0's broken twin was never used.
    for key, tensor in ranks[1]["state"]["layers.2"].items():
        assert torch.equal(tensor, ref_state[f"2.{key}"])


def test_version_mismatch_is_a_loud_error() -> None:
    # 2 ranks (each failure starts its own, seconds of CPU each): the check is the receiver's.
    with pytest.raises(LaunchError) as info:
        launch(rc.job_version_mismatch, 2, timeout=90)
    root = info.value.root
    # Stage 1 is first to see a message from other weights than its own.
    assert root.rank == 1 and root.kind == "VersionMismatch"
    assert "stage 1 received the activation of micro-batch 0" in root.message
    assert "layers 0-0 at weight version 0" in root.message and "at version 1" in root.message


def test_invalid_move_is_refused_on_every_rank() -> None:
    with pytest.raises(LaunchError) as info:
        launch(rc.job_invalid_move, 3, timeout=90)
    assert len(info.value.failures) == 3
    assert all(f.kind == "ValueError" and "empty" in f.message for f in info.value.failures)


SAVED = rc.Case(3, (4, 5, 6, 5, 4, 5, 6, 5, 4), (0, 2, 4, 6, 8), 2, "1f1b", "adam", 4)


@pytest.fixture(scope="module")
def saved_checkpoint(pools: PoolFor, tmp_path_factory: pytest.TempPathFactory) -> str:
    """SAVED trained 2 steps on 4 stages and checkpointed (once for the resume cases)."""
    path = str(tmp_path_factory.mktemp("saved") / "ck")
    pools(4).run(rc.job_checkpoint_then_resume, SAVED, 2, path, "save", timeout=90)
    return path


@pytest.mark.parametrize("resume_bounds", [(0, 3, 8), (0, 1, 5, 8), (0, 2, 4, 6, 8)])
def test_checkpoint_resumes_on_other_stage_counts_exactly(
    pools: PoolFor, saved_checkpoint: str, resume_bounds: tuple[int, ...]
) -> None:
    resumed = rc.Case(**{**SAVED.__dict__, "bounds": resume_bounds})
    ranks = pools(len(resume_bounds) - 1).run(
        rc.job_checkpoint_then_resume, resumed, 2, saved_checkpoint, "resume", timeout=90
    )
    ref_losses, ref_state, _ = rc.train_reference(SAVED)
    assert ranks[-1]["losses"] == ref_losses[2:]
    rc.assert_held_equal(ranks, ref_state)


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(pools: PoolFor, tmp_path: Path) -> None:
    case = rc.Case(3, (4, 4, 4, 4), (0, 1, 3), 2, "1f1b", "sgd", 2)
    ck = tmp_path / "ck"
    pools(2).run(rc.job_checkpoint_then_resume, case, 1, str(ck), "save", timeout=90)
    shard = ck / "stage-1-of-2.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(LaunchError) as info:
        launch(rc.job_checkpoint_then_resume, 2, case, 1, str(ck), "resume", timeout=90)
    assert info.value.root.kind == "CheckpointError"
    assert "stage-1-of-2.pt is corrupt or truncated" in info.value.root.message
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(LaunchError) as info:
        launch(rc.job_checkpoint_then_resume, 2, case, 1, str(ck), "resume", timeout=90)
    assert "meta.json is corrupt" in info.value.root.message


def test_receiver_killed_mid_migration_then_resume_has_every_layer(
    pools: PoolFor, tmp_path: Path
) -> None:
    case = rc.Case(4, (4,) * 7, (0, 2, 4, 6), 2, "1f1b", "adam", 3)
    ck = str(tmp_path / "ck")
    with pytest.raises(LaunchError) as info:
        launch(rc.job_receiver_killed, 3, case, ck, timeout=90)
    assert info.value.root.rank == 1 and "died (signal SIGKILL)" in info.value.root.message
    assert all(f.secondary for f in info.value.failures[1:])
    resumed = rc.Case(**{**case.__dict__, "bounds": (0, 3, 6)})
    ranks = pools(2).run(rc.job_checkpoint_then_resume, resumed, 1, ck, "resume", timeout=90)
    ref_losses, ref_state, _ = rc.train_reference(case)
    assert ranks[-1]["losses"] == ref_losses[1:]
    held = {
        f"{n.split('.')[1]}.{k}": t
        for r in ranks
        for n, sd in r["state"].items()
        for k, t in sd.items()
    }
    assert set(held) == set(ref_state)
    assert all(torch.equal(t, ref_state[k]) for k, t in held.items())


def test_controller_decisions_are_applied_live(pools: PoolFor) -> None:
    """Rank 0's controller decides after a step; every rank applies it before the next one."""
    case = rc.Case(6, (4,) * 7, (0, 2, 4, 6), 2, "1f1b", "adam", 4)
    script = {0: MoveLayers(0, 1, 1), 1: SetMicrobatches(4), 2: MoveLayers(1, 2, 5)}
    ranks = pools(3).run(rc.train_pipelined, case, None, script, timeout=120)
    # step 0 -> move; step 1 -> M=4 from step 2 on; step 2 -> an invalid move, refused.
    assert all(r["bounds"] == (0, 1, 4, 6) and r["m"] == 4 for r in ranks)
    events = ranks[0]["events"]
    assert events[0].startswith("moved layers 1-1 from stage 0 to stage 1")
    assert events[1] == "set micro-batches 2 -> 4"
    assert events[2].startswith("refused move 5 layer(s) 1->2")
    rc.assert_matches_reference(case, ranks, {2: 4})
