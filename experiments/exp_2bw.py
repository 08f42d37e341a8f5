"""Convergence of PipeDream-2BW vs flushed 1F1B: same seeds, same data, Adam and SGD.

Task: regression y = W x + b + noise (width 32, 1024 samples, noise sd 0.1, so the best
possible MSE is 0.01), mini-batches of 64 from seeded per-epoch shuffles, M = 4 micro-batches.
Model: 4 blocks Linear + tanh (32 -> 64 -> 64 -> 64 -> 32, no tanh on the last), one block per
stage on 4 stage processes (``--quick``: 2 stages of 2 blocks, 20 steps), real math (no emulated
kernels). Each optimizer (Adam lr 1e-3; SGD
lr 0.05 momentum 0.9) trains from the same initial weights and batches under both schedules.
Flushed 1F1B: step t's gradients are taken at W(t) and W(t+1) = W(t) - update. 2BW: step t's
micro-batches run forward and backward on W(t-1), W(t+1) = W(t) - update(those gradients) (one
step of gradient delay). Reported per optimizer: loss curves (each step's training loss, as
``pipe.step`` returns it), the mean of the last 20 steps' losses of 2BW against 1F1B (ratio and
difference) and the final model's MSE on the whole dataset (2BW after ``pipe.flush()``).
"""

from __future__ import annotations

import functools
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from experiments.common import Regression, pool, pyplot, save_figure, study_args, write_json

NAME = "exp_2bw"
STAGES, WIDTH, HIDDEN, SAMPLES, BATCH, M, NOISE = 4, 32, 64, 1024, 64, 4, 0.1
STEPS, QUICK_STEPS, LAST = 300, 20, 20
SCHEDULES = ("1f1b", "2bw")
OPTIMIZERS = {"adam": "Adam lr 1e-3", "sgd": "SGD lr 0.05 momentum 0.9"}


DATA = Regression(SAMPLES, WIDTH, NOISE, 0.1)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """y = W x + b + noise, seeded (the same on every rank)."""
    return DATA.data  # type: ignore[no-any-return]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s mini-batch of BATCH samples: epochs of seeded shuffles of the data."""
    return DATA.batch(step, BATCH)  # type: ignore[no-any-return]


def model() -> nn.Sequential:
    """The 4-block MLP, seeded: identical initial weights for every run."""
    torch.manual_seed(0)
    dims = [WIDTH, HIDDEN, HIDDEN, HIDDEN, WIDTH]
    blocks = [
        nn.Sequential(nn.Linear(dims[i], dims[i + 1]), *([nn.Tanh()] if i < 3 else []))
        for i in range(4)
    ]
    return nn.Sequential(*blocks)


def optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of OPTIMIZERS) over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def train_run(schedule: str, opt: str, steps: int) -> dict[str, Any]:
    """Rank job: ``steps`` steps of ``schedule`` with ``opt``, then a flush; every step's
    loss and this rank's final parameters (layer name -> state dict)."""
    cfg = PipelineConfig(microbatches=M, schedule=schedule)
    with Pipeline(model(), nn.functional.mse_loss, functools.partial(optimizer, opt), cfg) as pipe:
        losses = [pipe.step(*batch(k)).loss for k in range(steps)]
        pipe.flush()  # 2BW: the last step's update lands (no-op for 1F1B)
        state = {k: {n: t.clone() for n, t in sd.items()} for k, sd in pipe.local_state().items()}
    return {"losses": losses, "state": state}


def full_loss(states: Sequence[dict[str, dict[str, torch.Tensor]]]) -> float:
    """MSE on the whole dataset of the model put together from every rank's final state."""
    net = model()
    for state in states:
        for name, sd in state.items():
            net.get_submodule(name.removeprefix("layers.")).load_state_dict(sd)
    x, y = dataset()
    with torch.no_grad():
        return float(nn.functional.mse_loss(net(x), y))


def gap(losses: dict[str, list[float]], final: dict[str, float], last: int) -> dict[str, Any]:
    """2BW against 1F1B: mean of the last ``last`` steps' losses, and the full-data loss."""
    tail = {s: statistics.fmean(losses[s][-last:]) for s in SCHEDULES}
    return {
        "last_mean": tail,
        "last_ratio": tail["2bw"] / tail["1f1b"],
        "last_diff": tail["2bw"] - tail["1f1b"],
        "full_loss": final,
        "full_ratio": final["2bw"] / final["1f1b"],
        "first_step_equal": losses["2bw"][0] == losses["1f1b"][0],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the four runs, print the gaps, plot and save."""

    def extra(p: Any) -> None:
        p.add_argument("--steps", type=int, default=None, help=f"steps per run (default {STEPS})")
        p.add_argument("--figures", default=None, help="also copy the PNG here (docs/figures)")
        p.add_argument("--stages", type=int, choices=(2, 4), default=None, help="default 4")

    ns = study_args(__doc__, argv, extra)
    steps = ns.steps or (QUICK_STEPS if ns.quick else STEPS)
    stages = ns.stages or (2 if ns.quick else STAGES)
    last = min(LAST, max(1, steps // 4))
    curves: dict[str, dict[str, list[float]]] = {o: {} for o in OPTIMIZERS}
    finals: dict[str, dict[str, float]] = {o: {} for o in OPTIMIZERS}
    with pool(stages) as p:
        for opt in OPTIMIZERS:
            for schedule in SCHEDULES:
                ranks = p.run(train_run, schedule, opt, steps, timeout=900)
                curves[opt][schedule] = ranks[0]["losses"]
                finals[opt][schedule] = full_loss([r["state"] for r in ranks])
    gaps = {o: gap(curves[o], finals[o], last) for o in OPTIMIZERS}
    print(
        f"{stages} stages x {4 // stages} block(s) (Linear+tanh, real math), regression width {WIDTH}, "
        f"B={BATCH}, M={M}, {steps} steps, same seeds and batches for every run; "
        f"noise floor MSE {NOISE**2:.3g}"
    )
    for opt, g in gaps.items():
        tail = g["last_mean"]
        print(
            f"{OPTIMIZERS[opt]:26s} mean loss of the last {last} steps: 2bw {tail['2bw']:.4f} vs "
            f"1f1b {tail['1f1b']:.4f} (ratio {g['last_ratio']:.3f}, diff {g['last_diff']:+.4f}); "
            f"final full-data MSE 2bw {g['full_loss']['2bw']:.4f} vs 1f1b "
            f"{g['full_loss']['1f1b']:.4f} (ratio {g['full_ratio']:.3f})"
        )
    png = _plot(curves, stages, last, ns.out)
    figures = [str(png)]
    if ns.figures is not None:
        Path(ns.figures).mkdir(parents=True, exist_ok=True)
        figures.append(str(shutil.copy(png, Path(ns.figures) / png.name)))
    result = {
        "setup": {
            "stages": stages,
            "width": WIDTH,
            "hidden": HIDDEN,
            "samples": SAMPLES,
            "batch": BATCH,
            "microbatches": M,
            "noise": NOISE,
            "steps": steps,
            "last": last,
            "optimizers": OPTIMIZERS,
            "kernels": "real (nn.Linear + tanh), not emulated",
        },
        "curves": curves,
        "gaps": gaps,
        "figures": figures[:1],
        "copies": figures[1:],
    }
    path = write_json(NAME, result, ns.out)
    print(f"wrote {path} and {png}" + (f" (copied to {figures[1]})" if len(figures) > 1 else ""))
    return result


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    """Trailing mean over ``k`` steps (fewer at the start)."""
    return [statistics.fmean(xs[max(0, i + 1 - k) : i + 1]) for i in range(len(xs))]


def _plot(curves: dict[str, dict[str, list[float]]], stages: int, last: int, folder: Any) -> Path:
    plt = pyplot()
    fig, grid = plt.subplots(2, len(OPTIMIZERS), figsize=(12, 7), sharex=True)
    for col, (opt, runs) in enumerate(curves.items()):
        ax = grid[0][col]
        for schedule, style in zip(SCHEDULES, ("-", "--"), strict=True):
            ax.plot(runs[schedule], style, lw=1, label=schedule)
        ax.axhline(NOISE**2, color="k", ls=":", lw=1, label="noise floor")
        ax.set_yscale("log")
        ax.set(ylabel="training loss (MSE)", title=OPTIMIZERS[opt])
        ax.legend(fontsize=8)
        ax = grid[1][col]
        ratio = [
            a / b
            for a, b in zip(_smooth(runs["2bw"], last), _smooth(runs["1f1b"], last), strict=True)
        ]
        ax.plot(ratio, color="C2")
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set(xlabel="step", ylabel=f"2bw / 1f1b ({last}-step means)")
    fig.suptitle(f"PipeDream-2BW vs flushed 1F1B, {stages} stages, M={M}: same seeds and batches")
    path: Path = save_figure(fig, NAME, "2bw_convergence", folder)
    return path


if __name__ == "__main__":
    main()
