"""Jobs that stage processes run in tests/test_interleaved.py (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any

import runtime_cases as rc
import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import SetMicrobatches


def job_refusals(case: rc.Case, new_m: int) -> dict[str, Any]:
    """Step 0; an M that is no multiple of S is refused (training goes on with the old plan);
    M = ``new_m`` is taken; the remaining steps run under it."""
    pipe = rc.case_pipeline(case)
    data = rc.batches(case)
    losses = [pipe.step(*data[0]).loss]
    refused = ""
    try:
        pipe.apply(SetMicrobatches(pipe.num_stages + 1))
    except ValueError as exc:
        refused = str(exc)
    pipe.apply(SetMicrobatches(new_m))
    losses += [pipe.step(x, y).loss for x, y in data[1:]]
    out = {"losses": losses, "refused": refused, **rc.snapshot(pipe)}
    pipe.close()
    return out


def job_late_forward_failure() -> dict[str, Any]:
    """Layer 2 (virtual stage 2: rank 0, chunk 1) raises on its 2nd call, rank 0's last forward
    of step 0 (its 4th: F0 F1 of chunk 0, F0 of chunk 1 done); then step 1 runs."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), rc._Fault(2), nn.Linear(4, 4)]
    cfg = PipelineConfig(microbatches=2, schedule="interleaved-1f1b", partition=(0, 1, 2, 3, 4))
    pipe = Pipeline(
        nn.Sequential(*layers), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.1), cfg
    )
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    losses, errors = [], []
    for k in range(2):
        try:
            losses.append(pipe.step(x, y).loss)
        except Exception as exc:
            errors.append((k, type(exc).__name__, getattr(exc, "undone", None)))
    pipe.close()
    return {"losses": losses, "errors": errors}
