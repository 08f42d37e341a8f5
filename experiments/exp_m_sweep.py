"""Micro-batch sweep M = 1..32: bubble and activation stash per stage, without and with checkpointing.

4 stages x 4 EmulatedFFN blocks (residual width 64 -> hidden 256 -> 64, GELU), batch 64, Adam,
both schedules. For each M: the measured bubble (median over steps) next to (S-1)/(M+S-1), the
step time, and each stage's peak activation stash in bytes (StageStats.peak_stash_bytes:
distinct bytes autograd saves for backward plus the boundaries the stage holds, peak over the
step), first without, then with activation checkpointing (each layer under
torch.utils.checkpoint, non-reentrant). Checkpointing keeps only each layer's input and
recomputes the rest in backward, so its backward pays one extra forward (emulated too).
EMULATED kernels: per layer forward = launch + per-sample x micro-batch size, backward 2.4x.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from adaptive_pp import PipelineConfig
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule, validate
from adaptive_pp.core.simulator import bubble_exact
from adaptive_pp.emulation.kernels import EmulatedFFN
from experiments.common import (
    kernel_note,
    median_stats,
    pool,
    pyplot,
    save_figure,
    step_stats,
    study_args,
    train_job,
    write_json,
)

NAME = "exp_m_sweep"
STAGES, LAYERS, WIDTH, HIDDEN, BATCH = 4, 16, 64, 256, 64
SCHEDULES = ("1f1b", "gpipe")


def model(launch: float, per_sample: float) -> torch.nn.Sequential:
    """16 residual FFN blocks with emulated kernel time."""
    return torch.nn.Sequential(
        *(EmulatedFFN(WIDTH, HIDDEN, launch, per_sample_s=per_sample) for _ in range(LAYERS))
    )


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch (seeded)."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def predicted_bytes(schedule: str, m: int, checkpointing: bool) -> list[int]:
    """Per stage: micro-batches in flight x (boundaries [+ 2 hidden per layer]) x 4 bytes."""
    b, per = BATCH // m, LAYERS // STAGES
    per_mb = (per + 1) * b * WIDTH * 4 + (0 if checkpointing else per * 2 * b * HIDDEN * 4)
    return [n * per_mb for n in validate(make_schedule(schedule, STAGES, m)).peak]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Sweep M for both schedules, checkpointing off and on; print, plot and save."""
    ns = study_args(__doc__, argv)
    sweep, steps = ((1, 4, 16), 1) if ns.quick else ((1, 2, 4, 8, 16, 32), 6)
    kernel = (1e-5, 1e-6) if ns.quick else (1e-4, 5e-5)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    with pool(STAGES) as p:
        for schedule in SCHEDULES:
            for ckpt in (False, True):
                key = f"{schedule}{'-ckpt' if ckpt else ''}"
                rows[key] = {}
                for m in sweep:
                    cfg = PipelineConfig(
                        microbatches=m, schedule=schedule, activation_checkpointing=ckpt
                    )
                    res = p.run(
                        train_job,
                        functools.partial(model, *kernel),
                        cfg,
                        data,
                        steps + 1,
                        timeout=900,
                    )[0]
                    reps = [StepReport.from_dict(r) for r in res["reports"][1:]]
                    rows[key][str(m)] = {
                        **median_stats([step_stats(r) for r in reps]),
                        "stash_bytes": list(reps[-1].peak_stash_bytes),
                        "predicted_bytes": predicted_bytes(schedule, m, ckpt),
                        "exact_bubble": bubble_exact(STAGES, m),
                    }
    note = kernel_note(*kernel, BATCH)
    print(f"{note} (x 1/M of the batch per micro-batch); {STAGES} stages x 4 FFN blocks, B={BATCH}")
    print(
        f"{'config':12s} {'M':>3s} {'bubble':>7s} {'exact':>7s} {'step ms':>8s}  stash KiB per stage"
    )
    for key, by_m in rows.items():
        for m_text, r in by_m.items():
            stash = " ".join(f"{x / 1024:8.1f}" for x in r["stash_bytes"])
            print(
                f"{key:12s} {m_text:>3s} {r['bubble']:7.1%} {r['exact_bubble']:7.1%} "
                f"{r['step_ms']:8.1f}  {stash}"
            )
    exact = all(
        r["stash_bytes"] == r["predicted_bytes"] for by_m in rows.values() for r in by_m.values()
    )
    print(
        f"measured stash bytes equal the closed form (boundaries [+ 2 hidden/layer]) x peak: {exact}"
    )
    png = _plot(rows, sweep, ns.out)
    result = {
        "setup": {
            "stages": STAGES,
            "layers": LAYERS,
            "width": WIDTH,
            "hidden": HIDDEN,
            "batch": BATCH,
            "launch_s": kernel[0],
            "per_sample_s": kernel[1],
            "measured_steps": steps,
            "kernels": note,
        },
        "sweep": rows,
        "stash_matches_prediction": exact,
        "figures": [str(png)],
    }
    path = write_json(NAME, result, ns.out)
    print(f"wrote {path} and {png}")
    return result


def _plot(rows: dict[str, dict[str, dict[str, Any]]], sweep: Sequence[int], folder: Any) -> Any:
    plt = pyplot()
    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    axes = [ax for row in grid for ax in row]
    ms = [str(m) for m in sweep]
    ax = axes[0]
    ax.plot(sweep, [100 * bubble_exact(STAGES, m) for m in sweep], "k--", label="(S-1)/(M+S-1)")
    for key, by_m in rows.items():
        style = "--" if key.endswith("ckpt") else "-"
        ax.plot(sweep, [100 * by_m[m]["bubble"] for m in ms], style, marker="o", label=key)
    ax.set(xlabel="M", ylabel="bubble (%)", title="Bubble vs M")
    ax = axes[1]
    for key, by_m in rows.items():
        style = "--" if key.endswith("ckpt") else "-"
        ax.plot(sweep, [by_m[m]["step_ms"] for m in ms], style, marker="o", label=key)
    ax.set(xlabel="M", ylabel="step (ms)", title="Step time vs M")
    for ax, schedule in zip(axes[2:], SCHEDULES, strict=True):
        for ckpt, style in ((False, "-"), (True, "--")):
            by_m = rows[f"{schedule}{'-ckpt' if ckpt else ''}"]
            for s in range(STAGES):
                ax.plot(
                    sweep,
                    [by_m[m]["stash_bytes"][s] / 1024 for m in ms],
                    style,
                    marker="o",
                    color=f"C{s}",
                    label=f"stage {s}{' ckpt' if ckpt else ''}",
                )
        ax.set_yscale("log")
        ax.set(
            xlabel="M",
            ylabel="peak stash (KiB)",
            title=f"{schedule}: peak stash per stage\n(solid: before, dashed: with checkpointing)",
        )
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    fig.suptitle("M sweep, 4 stages (EMULATED kernels)")
    return save_figure(fig, NAME, "m_sweep", folder)


if __name__ == "__main__":
    main()
