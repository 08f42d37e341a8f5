"""Multi-process: a failed step fails on every rank and never desynchronises the pipeline;
a frozen stage is named in seconds; a slow one is not; a Pipeline can be made again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import failure_cases as fc
import pytest
import runtime_cases as rc
from conftest import PoolFor

from adaptive_pp.runtime.launch import LaunchError, free_port, launch

pytestmark = pytest.mark.multiprocess
STAGES = len(fc.CASE.bounds) - 1


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("bad_batch", "BatchError"), ("no_targets", "BatchError"), ("nan", "NonFiniteLoss")],
)
def test_catch_and_continue_equals_the_reference_that_skips_the_batch(
    pools: PoolFor, fault: str, kind: str
) -> None:
    """Every rank raises the same error at the failing step, nobody advances, and the loop
    that goes on ends torch.equal to one process that skipped that batch."""
    ranks = pools(STAGES).run(fc.job_catch_and_continue, fault, timeout=120)
    origin = {"bad_batch": 0, "no_targets": STAGES - 1, "nan": STAGES - 1}[fault]
    for r, out in enumerate(ranks):
        assert [e["step"] for e in out["errors"]] == [fc.AT], r
        err = out["errors"][0]
        assert err["kind"] == kind and err["undone"] is True
        assert err["remote"] is (r != origin)
        assert err["message"] == ranks[origin]["errors"][0]["message"]
        assert err["value_error"] is (kind == "BatchError")
    rc.assert_matches_reference(fc.CASE, ranks, skip=frozenset({fc.AT}))


def test_a_failure_after_the_forward_pass_poisons_until_a_checkpoint_is_loaded(
    pools: PoolFor, tmp_path: Path
) -> None:
    path = str(tmp_path / "ckpt")
    ranks = pools(STAGES).run(fc.job_poisoned_then_reload, path, timeout=120)
    for r, out in enumerate(ranks):
        first, second = out["errors"]
        assert (first["step"], first["kind"], first["undone"]) == (fc.AT, "StageFailure", False)
        assert "stage 1, layers.3, micro-batch 3, backward" in first["message"], r
        assert first["remote"] is (r != 1)
        assert (second["step"], second["kind"]) == (fc.AT + 1, "PipelinePoisoned")
        assert "Reload a checkpoint" in second["message"]
        assert "stage 1" in second["message"]
    rc.assert_matches_reference(fc.CASE, ranks, skip=frozenset({fc.AT, fc.AT + 1}))


def _frozen_named_in_time(folder: Path, ended: float) -> None:
    """Every rank but 2 raised StageFrozen naming stage 2 within 15 s of its freezing, and the
    job was over within 15 s of the last of them."""
    frozen_at = float((folder / "frozen").read_text())
    detected = []
    for r in (0, 1, 3):
        out = json.loads((folder / f"rank-{r}").read_text())
        assert out["kind"] == "StageFrozen", (r, out)
        assert out["message"].startswith("stage 2 (rank 2)"), out["message"]
        assert out["at"] - frozen_at < 15, r
        detected.append(out["at"])
    assert ended - max(detected) < 15


@pytest.mark.parametrize("recv_timeout", [300.0, 5.0])
def test_a_frozen_stage_is_named_on_every_rank_within_15_s(
    tmp_path: Path, recv_timeout: float
) -> None:
    """SIGSTOP on stage 2 mid-step, under launch: defaults (heartbeats find it), and a receive
    timeout shorter than the heartbeat's (the neighbour's timeout must still blame stage 2)."""
    with pytest.raises(LaunchError) as info:
        launch(fc.job_frozen, STAGES, str(tmp_path), recv_timeout, timeout=120)
    # A peer on the same host killed the frozen rank, so the job ended at once.
    assert [f.rank for f in info.value.failures] == [2]
    assert "died (signal SIGKILL)" in info.value.root.message
    _frozen_named_in_time(tmp_path, time.time())


def test_under_torchrun_a_frozen_stage_ends_the_job_within_15_s(tmp_path: Path) -> None:
    """The same under torchrun (which alone would wait 30 s for the stopped rank)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    here = Path(__file__).parent
    cmd = [str(torchrun), "--nproc-per-node", str(STAGES), "--master-port", str(free_port())]
    cmd += ["--max-restarts", "0", str(here / "torchrun_frozen.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(here)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode != 0, proc.stderr[-2000:]
    _frozen_named_in_time(tmp_path, time.time())


def test_a_slow_stage_is_not_called_frozen(pools: PoolFor) -> None:
    """One forward computes for 4x the heartbeat timeout: the step completes, exactly."""
    ranks = pools(STAGES).run(fc.job_slow, 1.5, 6.0, timeout=120)
    case = rc.Case(**{**fc.CASE.__dict__, "steps": 3})
    rc.assert_matches_reference(case, ranks)


def test_a_pipeline_can_be_closed_and_made_again() -> None:
    # Each rank closes then re-makes its group as soon as it is done: a quick rank used to
    # read the first group's store keys and hang (almost every run).
    ranks = launch(fc.job_twice, STAGES, timeout=120)
    for losses in ranks:
        assert losses[:2] == losses[2:] == ranks[-1][:2]


def test_ranks_asked_for_different_decisions_all_refuse(pools: PoolFor) -> None:
    ranks = pools(STAGES).run(fc.job_disagree, timeout=120)
    for r, out in enumerate(ranks):
        assert out["kind"] == "DecisionMismatch" and out["value_error"], r
        assert out["stage"] == r and "disagree" in out["message"]
        assert out["bounds"] == fc.CASE.bounds
    assert len({out["loss"] for out in ranks}) == 1
