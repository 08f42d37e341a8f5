"""Run under torchrun by test_resume (argv: FOLDER STEPS KILL_AT): train CASE for STEPS steps
with checkpoints every 2 steps in FOLDER/ckpt; on torchrun's first attempt stage 1 kills
itself (SIGKILL) before step KILL_AT. Each rank saves what it ended with to FOLDER/rank-R.pt."""

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

import runtime_cases as rc
import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig

CASE = rc.Case(
    seed=5,
    widths=(6, 8, 8, 5, 7),
    bounds=(0, 2, 4),
    microbatches=4,
    schedule="1f1b",
    optimizer="adam",
    steps=6,
)
EVERY, KEEP = 2, 2


def train(folder: str, steps: int, kill_at: int) -> dict[str, Any]:
    """The user's loop: build the pipeline (it resumes by itself), train from its step on."""
    case = dataclasses.replace(CASE, steps=steps)
    cfg = PipelineConfig(
        microbatches=case.microbatches,
        checkpoint_dir=str(Path(folder) / "ckpt"),
        checkpoint_every=EVERY,
        checkpoint_keep=KEEP,
    )
    model = rc.build_model(case)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    with Pipeline(model, nn.functional.mse_loss, lambda p: rc.make_optimizer(case, p), cfg) as pipe:
        start, data, losses = pipe.step_count, rc.batches(case), []
        for k in range(pipe.step_count, case.steps):
            if k == kill_at and pipe.stage == 1 and attempt == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            losses.append(pipe.step(*data[k]).loss)
        return {
            "losses": losses,
            "start": start,
            "resumed_from": pipe.resumed_from and pipe.resumed_from.name,
            "attempt": attempt,
            "device": {
                str(p.device) for m in pipe.local_modules().values() for p in m.parameters()
            },
            **rc.snapshot(pipe),
        }


if __name__ == "__main__":
    torch.set_num_threads(1)
    folder, steps, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = train(folder, steps, kill_at)
    torch.save(out, os.path.join(folder, f"rank-{os.environ['RANK']}.pt"))
