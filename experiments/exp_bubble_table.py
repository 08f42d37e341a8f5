"""Bubble table, 4 stages x 16 micro-batches: GPipe and 1F1B, analytical vs simulated vs measured.

Analytical: the exact (S-1)/(M+S-1) = 15.79% and the common approximation (S-1)/M = 18.75% (an
upper bound). Simulated: the event simulator with the nominal emulated kernel times (equal
stages, no hop cost), and again with the run's measured action durations and hop latencies.
Measured: our runtime, median bubble over the measured steps. EMULATED kernels: 16 EmulatedLayers
(Linear + tanh, width 64), 4 per stage, batch 64; per layer forward = launch + per-sample x 4
samples, backward 2.4x forward (see kernel_note in the output).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from adaptive_pp import PipelineConfig
from adaptive_pp.core.analysis import replay_measured
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import BACKWARD_RATIO, Costs, bubble_approx, bubble_exact, simulate
from adaptive_pp.emulation.kernels import emulated_mlp
from experiments.common import (
    kernel_note,
    pool,
    pyplot,
    save_figure,
    study_args,
    train_job,
    write_json,
)

NAME = "exp_bubble_table"
STAGES, MICROBATCHES, LAYERS, WIDTH, BATCH = 4, 16, 16, 64, 64
SCHEDULES = ("gpipe", "1f1b")


def model(launch_s: float, per_sample_s: float) -> torch.nn.Sequential:
    """The 16-layer emulated MLP."""
    return emulated_mlp(LAYERS, WIDTH, launch_s, per_sample_s=per_sample_s)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch (seeded)."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both schedules on 4 ranks; print and save the table and its figure."""
    ns = study_args(__doc__, argv)
    launch, per_sample, steps = (2e-5, 2e-5, 2) if ns.quick else (2e-4, 2e-4, 12)
    b = BATCH // MICROBATCHES
    fwd = LAYERS // STAGES * (launch + per_sample * b)  # one stage, one micro-batch
    nominal = Costs.build(STAGES, MICROBATCHES, fwd, BACKWARD_RATIO * fwd)
    table: dict[str, dict[str, float]] = {}
    with pool(STAGES) as p:
        for name in SCHEDULES:
            cfg = PipelineConfig(microbatches=MICROBATCHES, schedule=name)
            res = p.run(
                train_job,
                functools.partial(model, launch, per_sample),
                cfg,
                data,
                steps + 1,
                timeout=600,
            )[0]
            reps = [StepReport.from_dict(r) for r in res["reports"][1:]]  # first step warms up
            sched = make_schedule(name, STAGES, MICROBATCHES)
            replayed = [replay_measured(r) for r in reps]
            table[name] = {
                "approx": bubble_approx(STAGES, MICROBATCHES),
                "exact": bubble_exact(STAGES, MICROBATCHES),
                "simulated": simulate(sched, nominal).bubble_fraction,
                "simulated_measured": statistics.median(r.bubble_fraction for r in replayed),
                "measured": statistics.median(r.bubble_fraction for r in reps),
                "measured_step_ms": statistics.median(r.step_time for r in reps) * 1e3,
                "simulated_step_ms": simulate(sched, nominal).step_time * 1e3,
            }
    note = kernel_note(launch, per_sample, b)
    print(f"{note}; {STAGES} stages x {LAYERS // STAGES} layers, M={MICROBATCHES}, batch {BATCH}")
    cols = ("approx", "exact", "simulated", "simulated_measured", "measured")
    heads = ("(S-1)/M", "(S-1)/(M+S-1)", "sim nominal", "sim measured", "measured")
    print(f"{'':8s}" + "".join(f"{h:>16s}" for h in heads) + f"{'step ms':>10s}")
    for name, row in table.items():
        cells = "".join(f"{row[c]:16.2%}" for c in cols)
        print(f"{name:8s}{cells}{row['measured_step_ms']:10.1f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.16
    for i, (col, head) in enumerate(zip(cols, heads, strict=True)):
        xs = [j + (i - 2) * width for j in range(len(SCHEDULES))]
        bars = ax.bar(xs, [100 * table[s][col] for s in SCHEDULES], width, label=head)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(SCHEDULES)), [s.upper() for s in SCHEDULES])
    ax.set_ylabel("bubble (%)")
    ax.set_title(f"Bubble, S={STAGES}, M={MICROBATCHES} (EMULATED kernels)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    png = save_figure(fig, NAME, "bubble_table", ns.out)
    result = {
        "setup": {
            "stages": STAGES,
            "microbatches": MICROBATCHES,
            "layers": LAYERS,
            "width": WIDTH,
            "batch": BATCH,
            "launch_s": launch,
            "per_sample_s": per_sample,
            "backward_ratio": BACKWARD_RATIO,
            "measured_steps": steps,
            "kernels": note,
        },
        "table": table,
        "figures": [str(png)],
    }
    path = write_json(NAME, result, ns.out)
    print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()
