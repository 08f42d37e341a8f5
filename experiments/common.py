"""Helpers shared by the experiments: result folders and run metadata."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def results_dir(name: str) -> Path:
    """``results/NAME`` under the repo (or $ADAPTIVE_PP_RESULTS), created if missing."""
    root = Path(
        os.environ.get("ADAPTIVE_PP_RESULTS", Path(__file__).resolve().parent.parent / "results")
    )
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every result."""
    import numpy
    import torch

    import adaptive_pp

    return {
        "adaptive_pp": adaptive_pp.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` plus the environment to ``results/NAME/NAME.json``; return the path."""
    path = results_dir(name) / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path


def torch_pipeline_walls(
    sub: Any,
    schedule: str,
    microbatches: int,
    optimizer: Any,
    x: Any,
    y: Any,
    steps: int,
    before_step: Any = None,
) -> list[float]:
    """Rank job body: ``steps`` timed steps of torch.distributed.pipelining on this rank's ``sub``.

    The peer we compare against: PipelineStage + Schedule1F1B/ScheduleGPipe with shapes
    inferred on the first step, MSE loss, then ``optimizer``. ``before_step(k)`` runs untimed.
    """
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank, stages = dist.get_rank(), dist.get_world_size()
    stage = PipelineStage(sub, rank, stages, torch.device("cpu"))
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    sched = cls(stage, microbatches, loss_fn=nn.functional.mse_loss)
    walls = []
    for k in range(steps):
        if before_step is not None:
            before_step(k)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            sched.step(x)
        elif rank == stages - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
    return walls
