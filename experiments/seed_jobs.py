"""Rank jobs of experiments/seed_notebook.ipynb (importable, so spawned stage processes find them).

Every job runs on each of the 2 ranks of ``adaptive_pp.launch(job, 2, ...)`` and returns what
the notebook plots; every rank gets the same merged StepReports, the notebook reads rank 0's.

Data: synthetic regression y = W x + b + noise (N = 1024 points, seeded), global batch B = 64,
epochs of seeded shuffles. Models: ``regression_mlp`` (10 real layers, Linear + GELU, a linear
last layer) and ``emulated_model`` (10 EmulatedLayers: a real Linear + tanh plus a sleep standing
for accelerator time, for the timing plots).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import Decision, MoveLayers, SetMicrobatches
from adaptive_pp.core.report import StepReport
from adaptive_pp.emulation.kernels import emulated_mlp
from adaptive_pp.observability.logs import configure_logging
from experiments.common import Regression

SAMPLES, BATCH, MICROBATCHES, LR, NOISE = 1024, 64, 4, 1e-3, 0.1
LAYERS, WIDTH, HIDDEN = 10, 16, 64


DATA = Regression(SAMPLES, WIDTH, NOISE, 0.5)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """y = W x + b + noise, seeded (the same on every rank)."""
    return DATA.data  # type: ignore[no-any-return]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s mini-batch of BATCH samples: epochs of seeded shuffles of the data."""
    return DATA.batch(step, BATCH)  # type: ignore[no-any-return]


def regression_mlp() -> nn.Sequential:
    """10 layers: Linear + GELU (WIDTH -> HIDDEN -> ... -> HIDDEN), then a Linear to WIDTH;
    He-initialised (zero biases), so the signal survives ten layers. Seeded."""
    torch.manual_seed(0)
    dims = [WIDTH] + [HIDDEN] * (LAYERS - 1)
    blocks: list[nn.Module] = [
        nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in itertools.pairwise(dims)
    ]
    model = nn.Sequential(*blocks, nn.Linear(HIDDEN, WIDTH))
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)
    return model


def emulated_model(forward_s: float, per_sample_s: float = 0.0) -> nn.Sequential:
    """10 EmulatedLayers of width WIDTH: ``forward_s + per_sample_s * b`` seconds forward for a
    micro-batch of b samples, backward 2.4x that (EMULATED accelerator time)."""
    torch.manual_seed(0)
    return emulated_mlp(LAYERS, WIDTH, forward_s, per_sample_s=per_sample_s)


def _pipeline(model: nn.Sequential, **config: Any) -> Pipeline:
    """A Pipeline over ``model`` with MSE loss and Adam(LR) on this rank's layers."""
    configure_logging(level="warning")  # changes come back in the reports' events
    cfg = PipelineConfig(**{"microbatches": MICROBATCHES, **config})
    return Pipeline(model, nn.functional.mse_loss, lambda p: torch.optim.Adam(p, lr=LR), cfg)


def _steps(pipe: Pipeline, first: int, count: int) -> list[StepReport]:
    """``count`` training steps on batches ``first``, ``first + 1``, ...; their reports."""
    return [pipe.step(*batch(first + k)).report for k in range(count)]


def train(steps: int, schedule: str = "1f1b") -> dict[str, Any]:
    """Train the real 10-layer MLP for ``steps`` steps (B = 64, M = 4, Adam 1e-3).

    Returns every step's loss and report, and this rank's layers' state dicts ("layers.3").
    """
    with _pipeline(regression_mlp(), schedule=schedule) as pipe:
        reports = _steps(pipe, 0, steps)
        state = pipe.local_state()
    return {"losses": [r.loss for r in reports], "reports": reports, "state": state}


def assemble(states: Sequence[dict[str, dict[str, torch.Tensor]]]) -> nn.Sequential:
    """The whole trained model from every rank's ``state`` (as ``train`` returns them)."""
    model = regression_mlp()
    for state in states:
        for name, sd in state.items():
            model[int(name.removeprefix("layers."))].load_state_dict(sd)
    return model


@torch.no_grad()
def full_mse(model: nn.Module) -> float:
    """Mean squared error of ``model`` over the whole data set."""
    x, y = dataset()
    return float(nn.functional.mse_loss(model(x), y))


def compare_schedules(
    steps: int, microbatches: int, forward_s: float, bounds: Sequence[int] = (0, 4, 10)
) -> dict[str, list[StepReport]]:
    """The emulated model under GPipe, then 1F1B, on partition ``bounds`` (default 4 + 6 layers:
    stage 1 is the slower one): ``steps`` steps each, after one warm-up step left out."""
    out: dict[str, list[StepReport]] = {}
    for schedule in ("gpipe", "1f1b"):
        model = emulated_model(forward_s)
        cfg = {"schedule": schedule, "microbatches": microbatches, "partition": tuple(bounds)}
        with _pipeline(model, **cfg) as pipe:
            out[schedule] = _steps(pipe, 0, steps + 1)[1:]
    return out


def stash_sweep(ms: Sequence[int]) -> dict[str, dict[int, StepReport]]:
    """One step of the real MLP per M in ``ms`` under GPipe and 1F1B, without and with
    activation checkpointing; keys "gpipe", "1f1b", "gpipe+ckpt", "1f1b+ckpt"."""
    out: dict[str, dict[int, StepReport]] = {}
    for ckpt in (False, True):
        for schedule in ("gpipe", "1f1b"):
            name = schedule + ("+ckpt" if ckpt else "")
            with _pipeline(
                regression_mlp(), schedule=schedule, activation_checkpointing=ckpt
            ) as pipe:
                out[name] = {}
                for m in ms:
                    pipe.apply(SetMicrobatches(m))
                    out[name][m] = pipe.step(*batch(0)).report
    return out


def adapt(
    steps: int,
    forward_s: float,
    per_sample_s: float,
    bounds: Sequence[int] = (0, 8, 10),
    changes: Sequence[Decision] = (MoveLayers(src=0, dst=1, count=3), SetMicrobatches(8)),
) -> list[StepReport]:
    """The emulated model on a lopsided partition at M = 2, 1F1B; after each ``steps`` steps the
    next decision in ``changes`` is applied on every rank between two steps (the run goes on).

    Returns every step's report (the step after a change lists it in ``events``).
    """
    model = emulated_model(forward_s, per_sample_s)
    reports: list[StepReport] = []
    with _pipeline(model, microbatches=2, partition=tuple(bounds)) as pipe:
        for decision in (None, *changes):
            if decision is not None:
                pipe.apply(decision)
            reports += _steps(pipe, len(reports), steps)
    return reports
