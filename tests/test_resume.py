"""Surviving a lost rank: with PipelineConfig(checkpoint_dir, checkpoint_every) and torchrun's
--max-restarts, a rank killed mid-run restarts the group, which resumes by itself from the
latest complete checkpoint (on the same or another stage count) and ends torch.equal to the
run that was never interrupted."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import runtime_cases as rc
import torch
import torchrun_resume as tr

from adaptive_pp import PipelineConfig
from adaptive_pp.runtime import resume
from adaptive_pp.runtime.launch import launch

HERE = Path(__file__).parent
KILL_AT = 3  # stage 1 dies before step 3: the latest checkpoint is the one after step 2


def assert_resumed_like_uninterrupted(ranks: list[dict[str, Any]], steps: int, at: int) -> None:
    """Every rank started at step ``at`` and ends equal to one process over ``steps`` steps."""
    case = dataclasses.replace(tr.CASE, steps=steps)
    losses, state, opt = rc.train_reference(case)
    for r in ranks:
        assert (r["start"], r["resumed_from"]) == (at, f"step-{at:08d}")
        assert r["device"] == {"cpu"}
    rc.assert_matches_reference(case, ranks, reference=(losses[at:], state, opt))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """2 stages under torchrun --max-restarts 1; stage 1 SIGKILLs itself before step 3 on the
    first attempt. The folder and what each rank ended with."""
    folder = tmp_path_factory.mktemp("resume")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", "1", str(HERE / "torchrun_resume.py"), str(folder)]
    cmd += [str(tr.CASE.steps), str(KILL_AT)]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(folder / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    return folder, ranks


@pytest.mark.multiprocess
def test_a_killed_rank_restarts_and_the_job_resumes_from_the_latest_checkpoint(
    killed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    folder, ranks = killed_run
    assert [r["attempt"] for r in ranks] == [1, 1]  # torchrun restarted the group once
    assert_resumed_like_uninterrupted(ranks, tr.CASE.steps, 2)
    # Saved after steps 2, 4, 6 (the first attempt's 2, then the second's 4 and 6); kept 2.
    assert sorted(p.name for p in (folder / "ckpt").iterdir()) == ["step-00000004", "step-00000006"]


@pytest.mark.multiprocess
def test_the_checkpoints_resume_on_another_stage_count(
    killed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The same folder, relaunched on 3 stages for 2 more steps: resumes after step 6."""
    folder, _ = killed_run
    ranks = launch(tr.train, 3, str(folder), tr.CASE.steps + 2, -1, timeout=120)
    assert_resumed_like_uninterrupted(ranks, tr.CASE.steps + 2, tr.CASE.steps)


# --- the folder of checkpoints (no processes) --------------------------------------------------


def fake_checkpoint(path: Path, step: int, *, meta: bool = True) -> Path:
    """A folder that read_meta accepts (one shard, two layers) at ``step``."""
    path.mkdir(parents=True)
    if meta:
        doc = {"format": 1, "step": step, "version": step, "partition": [0, 2], "num_layers": 2}
        doc |= {"microbatches": 1, "schedule": "1f1b", "chunks": 1, "shards": ["s"], "extra": {}}
        (path / "meta.json").write_text(json.dumps(doc))
    return path


def test_latest_is_the_newest_complete_checkpoint_and_rotation_keeps_k(tmp_path: Path) -> None:
    assert resume.latest(tmp_path / "none yet") is None
    for step in (2, 4, 6):
        fake_checkpoint(resume.checkpoint_path(tmp_path, step), step)
    fake_checkpoint(tmp_path / "step-00000008.tmp", 8)  # a save cut short
    fake_checkpoint(tmp_path / "step-00000010", 10, meta=False)  # no meta.json: not complete
    fake_checkpoint(tmp_path / "step-00000012", 11)  # a name that lies about its step
    (tmp_path / "step-00000014").mkdir()
    (tmp_path / "step-00000014" / "meta.json").write_text("{truncated")
    assert resume.latest(tmp_path) == tmp_path / "step-00000006"
    gone = resume.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == ["step-00000002", "step-00000008.tmp"]
    assert [s for s, _ in resume.complete(tmp_path)] == [4, 6]


def test_checkpoint_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        PipelineConfig(checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_keep must be >= 1"):
        PipelineConfig(checkpoint_dir="ck", checkpoint_keep=0)
