"""Run under torchrun by test_multihost: train CASE on every rank and save what each rank
ended with to FOLDER/rank-R.pt (argv: FOLDER [INIT_TIMEOUT]); a failure is saved as its text."""

import os
import sys

import runtime_cases as rc
import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig

CASE = rc.Case(
    seed=3,
    widths=(6, 8, 8, 5, 7),
    bounds=(0, 2, 4),
    microbatches=4,
    schedule="1f1b",
    optimizer="adam",
    steps=3,
)


def train(init_timeout: float) -> dict[str, object]:
    """CASE pipelined over the ranks: losses and this stage's snapshot."""
    cfg = PipelineConfig(
        microbatches=CASE.microbatches, partition=CASE.bounds, init_timeout=init_timeout
    )
    model = rc.build_model(CASE)
    with Pipeline(model, nn.functional.mse_loss, lambda p: rc.make_optimizer(CASE, p), cfg) as pipe:
        losses = [pipe.step(x, y).loss for x, y in rc.batches(CASE)]
        return {"losses": losses, **rc.snapshot(pipe)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    where = os.path.join(sys.argv[1], f"rank-{os.environ['RANK']}.pt")
    try:
        out = train(float(sys.argv[2]) if len(sys.argv) > 2 else 120.0)
    except Exception as exc:
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, where)
        raise
    torch.save(out, where)
