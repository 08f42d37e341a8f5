"""The demo: a small emulated-kernel MLP trained on 4 local stage processes, reported live."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..observability.display import stage_table
from ..observability.logs import configure_logging
from ..observability.otel import setup_otlp
from ..observability.progress import Progress
from ..runtime.config import PipelineConfig
from ..runtime.pipeline import Pipeline
from .kernels import emulated_mlp


@dataclass(frozen=True)
class Observe:
    """How each demo rank reports beyond stdout: logs, OTLP export, a run directory."""

    log_format: str = "console"
    log_level: str = "info"
    otlp_endpoint: str | None = None
    run_dir: str | None = None


def train_rank(
    steps: int, microbatches: int, schedule: str, observe: Observe | None = None
) -> float:
    """Rank job: regression y = Wx + b on an 8-layer emulated MLP; rank 0 prints each step.

    With an OTLP endpoint, what was recorded is exported on the way out, error or not (the
    rank's process may leave by ``os._exit``, which skips the SDK's own flush at exit).
    """
    observe = observe or Observe()
    configure_logging(observe.log_format, observe.log_level)
    rank = int(os.environ.get("RANK", 0))
    otel = setup_otlp(observe.otlp_endpoint, attributes={"adaptive_pp.rank": rank})
    with otel if otel is not None else contextlib.nullcontext():
        loss = _train(steps, microbatches, schedule, observe, telemetry=otel is not None)
    if otel is not None and rank == 0:
        print(f"exported spans and metrics to {otel.endpoint}", flush=True)
    return loss


def _train(
    steps: int, microbatches: int, schedule: str, observe: Observe, *, telemetry: bool
) -> float:
    torch.manual_seed(0)
    width, batch = 32, 32
    model = emulated_mlp(8, width, forward_s=2e-3)
    true_w = torch.randn(width, width) / width**0.5
    cfg = PipelineConfig(
        microbatches=microbatches,
        schedule=schedule,
        telemetry=telemetry,
        run_dir=observe.run_dir,
    )
    g = torch.Generator().manual_seed(1)
    with Pipeline(
        model, nn.functional.mse_loss, lambda p: torch.optim.Adam(p, lr=1e-2), cfg
    ) as pipe:
        if pipe.stage == 0:
            print(
                f"training on {pipe.num_stages} stages, partition {pipe.partition}, "
                f"M={microbatches}, {schedule}; EMULATED kernels (2 ms forward, 4.8 ms backward "
                "per layer, a sleep standing for accelerator time)",
                flush=True,
            )
        progress = Progress(steps, sys.stdout) if pipe.stage == 0 else None
        out = None
        for _ in range(steps):
            x = torch.randn(batch, width, generator=g)
            out = pipe.step(x, torch.tanh(x @ true_w))
            if progress is not None:
                progress.update(out)
        if progress is not None and out is not None:
            progress.close()
            print("\nlast step, per stage:")
            print("\n".join(stage_table(out.report)), flush=True)
    return out.loss if out is not None else float("nan")
