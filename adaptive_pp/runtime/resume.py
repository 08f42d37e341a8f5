"""Checkpoints kept in one folder while training, and resuming from the latest on start-up.

With ``PipelineConfig(checkpoint_dir=D, checkpoint_every=N)`` a pipeline saves ``D/step-S``
(S = steps completed, eight digits) after every N-th step, through the atomic
``checkpoint.save``, then deletes all but the ``checkpoint_keep`` newest complete ones. On
start-up it loads the newest complete checkpoint in D, if any: so a job that torchrun
restarts (``--max-restarts``) after a lost rank continues from there by itself, on the same
or another stage count. A checkpoint is complete when its folder has its final name and a
readable meta.json; a save cut short leaves ``step-S.tmp`` (or ``.old``), never a folder of
the final name, and is ignored, then removed by the next rotation.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .checkpoint import CheckpointError, read_meta
from .config import PipelineConfig
from .local import LocalStage

_NAME = re.compile(r"step-(\d+)")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint taken after ``step`` steps lives in ``directory``."""
    return Path(directory) / f"step-{step:08d}"


def complete(directory: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``directory`` as (step, path), oldest first."""
    found = []
    root = Path(directory)
    for path in root.iterdir() if root.is_dir() else ():
        match = _NAME.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        try:
            meta = read_meta(path)
        except CheckpointError:
            continue  # not ours, or damaged: never resume from it
        if meta["step"] == int(match.group(1)):
            found.append((meta["step"], path))
    return sorted(found)


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (None: none yet)."""
    found = complete(directory)
    return found[-1][1] if found else None


def rotate(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints, and what unfinished saves
    left (``*.tmp``, ``*.old``); return what was deleted. One rank calls it, after a save."""
    root = Path(directory)
    gone = [path for _, path in complete(root)[:-keep]]
    gone += [p for p in root.glob("step-*") if p.suffix in (".tmp", ".old") and p.is_dir()]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def find(local: LocalStage, directory: str | Path) -> Path | None:
    """The checkpoint every rank resumes from: the newest complete one as stage 0 sees it,
    broadcast, so that all ranks load the same (every rank calls it)."""
    local.begin()
    mine = str(latest(directory) or "") if local.stage == 0 else None
    path: str = local.control.broadcast(mine, what="the checkpoint to resume from")
    return Path(path) if path else None


def after_step(
    local: LocalStage, config: PipelineConfig, save: Callable[[Path], Path]
) -> Path | None:
    """Every ``checkpoint_every`` steps: ``save`` (all ranks), then stage 0 rotates."""
    every, directory = config.checkpoint_every, config.checkpoint_dir
    if not every or directory is None or local.step_count % every:
        return None
    path = save(checkpoint_path(directory, local.step_count))
    if local.stage == 0:
        rotate(directory, config.checkpoint_keep)
    return path
