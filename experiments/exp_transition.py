"""Live-migration transition: one of 2 stages becomes >= 10% slower; layers move without a restart.

2 stages x 16 EmulatedLayers (Linear + tanh, width 64), batch 64, 1F1B, Adam. From step SLOW_FROM
on, stage 1's device runs the emulated kernels of every layer it holds 1.12x slower (its measured
compute, which also holds unscaled framework time, rises by at least 10%; printed). The
Rebalancer (thresholds lowered to the few-percent imbalances at stake) notices, and one layer
moves to stage 0 at a step boundary through the two-phase migration, in the same processes.
Targets, in every step of the transition (from the slowdown to the end): U > 85% on every stage
and bubble < 12%, the step that carries the migration counted with its time added to the wall.

Why M = 32: until the move the fast stage waits for the slow one; on S stages with one stage
r x slower, U_fast = M / (r M + S - 1) < 1 / r, so U > 85% is out of reach for r >= 1/0.85 =
1.176 whatever M. For r = 1.12 it needs M / (1.12 M + 1) > 0.85, M >= 18: of the divisors of
the batch, M = 32 (86.9% in theory, bubble 7.8%; M = 16 gives 84.6%). With 16 layers a stage,
one layer moving turns 16 : 17.9 into 17 : 16.8. EMULATED kernels: per layer forward = launch +
per-sample x 2 samples, backward 2.4x forward.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from adaptive_pp import PipelineConfig
from adaptive_pp.core.report import StepReport
from adaptive_pp.emulation.kernels import emulated_mlp, set_slowdown
from controllers import Rebalancer, RebalancerConfig
from experiments.common import (
    kernel_note,
    pool,
    pyplot,
    save_figure,
    step_stats,
    study_args,
    train_job,
    write_json,
)

NAME = "exp_transition"
LAYERS, WIDTH, BATCH, M, FACTOR, SLOW_STAGE = 32, 64, 64, 32, 1.12, 1
U_MIN, BUBBLE_MAX = 0.85, 0.12


def model(launch: float, per_sample: float) -> torch.nn.Sequential:
    """32 emulated layers."""
    return emulated_mlp(LAYERS, WIDTH, launch, per_sample_s=per_sample)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch (seeded)."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def slow_device(start: int, pipe: Any, step: int) -> None:
    """From ``start`` on, stage SLOW_STAGE runs whatever layers it holds FACTOR x slower."""
    slow = pipe.stage == SLOW_STAGE and step >= start
    set_slowdown(pipe.local_modules().values(), FACTOR if slow else 1.0)


def controller(steps: int) -> Rebalancer:
    """A rebalancer tuned for small imbalances and short runs."""
    layer_bytes = 3 * 4 * (WIDTH * WIDTH + WIDTH)  # weights + Adam moments
    return Rebalancer(
        RebalancerConfig(
            threshold=0.03,
            release=0.01,
            patience=2,
            cooldown=3,
            min_samples=3,
            confidence=1.0,
            margin=0.005,
            horizon=steps,
            bytes_per_layer=layer_bytes,
        )
    )


def transition_row(report: StepReport) -> dict[str, Any]:
    """step_stats plus U with the step's migration time (if any) added to its wall."""
    row = step_stats(report)
    change = report.extra.get("change", 0.0)
    row["utilization_incl_change"] = [
        s.compute / (s.wall + change) if s.wall + change > 0 else 0.0 for s in report.stages
    ]
    row["bubble_incl_change"] = 1.0 - sum(s.compute for s in report.stages) / sum(
        s.wall + change for s in report.stages
    )
    return row


def _compute_ms(rows: Sequence[dict[str, Any]], stage: int) -> float:
    """Median compute (U x step time) of ``stage`` over ``rows``."""
    return float(statistics.median(r["utilization"][stage] * r["step_ms"] for r in rows))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run once on 2 ranks; print per-step U and bubble through the transition; plot and save."""
    ns = study_args(__doc__, argv)
    steps, start, m = (8, 3, 8) if ns.quick else (30, 6, M)
    kernel = (1e-5, 1e-5) if ns.quick else (4e-4, 1e-4)
    with pool(2) as p:
        res = p.run(
            train_job,
            functools.partial(model, *kernel),
            PipelineConfig(microbatches=m, partition=(0, LAYERS // 2, LAYERS)),
            data,
            steps,
            1e-3,
            functools.partial(controller, steps),
            functools.partial(slow_device, start),
            timeout=900,
        )[0]
    rows = [transition_row(StepReport.from_dict(r)) for r in res["reports"]]
    window = rows[start:]
    u_min = min(min(r["utilization_incl_change"]) for r in window)
    b_max = max(r["bubble_incl_change"] for r in window)
    moves = [(r["step"], e) for r in rows for e in r["events"]]
    moved = max(moves[0][0], start + 1) if moves else steps
    effective = _compute_ms(rows[start:moved], SLOW_STAGE) / _compute_ms(rows[1:start], SLOW_STAGE)
    note = kernel_note(kernel[0], kernel[1], BATCH // m)
    print(
        f"{note}; 2 stages x {LAYERS // 2} layers, M={m}; stage {SLOW_STAGE} {FACTOR}x slower from step {start}"
    )
    print(
        f"{'step':>4s} {'ms':>7s} {'bubble':>7s} {'U0':>6s} {'U1':>6s} {'migr ms':>8s}  partition"
    )
    for r in rows:
        u = r["utilization_incl_change"]
        flag = " <- slowdown" if r["step"] == start else ""
        print(
            f"{r['step']:4d} {r['step_ms']:7.1f} {r['bubble_incl_change']:7.1%} {u[0]:6.1%} {u[1]:6.1%} "
            f"{r['change_ms']:8.1f}  {r['partition']}{flag}"
        )
    for step, event in moves:
        print(f"  reported at step {step}: {event[:120]}")
    print(f"stage {SLOW_STAGE}'s measured compute after the slowdown / before: {effective:.3f}")
    met_u, met_b = u_min > U_MIN, b_max < BUBBLE_MAX
    print(
        f"transition (steps {start}-{steps - 1}): min U over stages and steps {u_min:.1%} "
        f"(target > {U_MIN:.0%}: {'met' if met_u else 'NOT met'}), max bubble {b_max:.1%} "
        f"(target < {BUBBLE_MAX:.0%}: {'met' if met_b else 'NOT met'}); {len(moves)} move(s), no restart"
    )
    png = _plot(rows, start, ns.out)
    result = {
        "setup": {
            "layers": LAYERS,
            "width": WIDTH,
            "batch": BATCH,
            "microbatches": m,
            "slow_stage": SLOW_STAGE,
            "factor": FACTOR,
            "slow_from": start,
            "steps": steps,
            "launch_s": kernel[0],
            "per_sample_s": kernel[1],
            "kernels": note,
        },
        "per_step": rows,
        "moves": moves,
        "measured_slowdown": effective,
        "transition_min_utilization": u_min,
        "transition_max_bubble": b_max,
        "targets": {"utilization_above": U_MIN, "bubble_below": BUBBLE_MAX},
        "targets_met": {"utilization": met_u, "bubble": met_b},
        "figures": [str(png)],
    }
    path = write_json(NAME, result, ns.out)
    print(f"wrote {path} and {png}")
    return result


def _plot(rows: list[dict[str, Any]], start: int, folder: Any) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    steps = [r["step"] for r in rows]
    for s in range(2):
        axes[0].plot(
            steps,
            [100 * r["utilization_incl_change"][s] for r in rows],
            "o-",
            ms=3,
            label=f"stage {s}",
        )
    axes[0].axhline(100 * U_MIN, color="grey", lw=0.8, ls="--", label=f"target {U_MIN:.0%}")
    axes[1].plot(steps, [100 * r["bubble_incl_change"] for r in rows], "o-", ms=3, label="bubble")
    axes[1].axhline(
        100 * BUBBLE_MAX, color="grey", lw=0.8, ls="--", label=f"target {BUBBLE_MAX:.0%}"
    )
    axes[2].plot(
        steps, [r["step_ms"] + r["change_ms"] for r in rows], "o-", ms=3, label="step + migration"
    )
    for ax in axes:
        ax.axvline(start, color="tab:red", lw=0.8, label="slowdown")
        for r in rows:
            if r["events"]:
                ax.axvline(r["step"], color="tab:green", lw=0.8, ls=":")
        ax.set_xlabel("step (dotted: step carrying a migration)")
        ax.legend(fontsize=7)
    axes[0].set(ylabel="U (%)", title="Utilization per stage (incl. migration time)")
    axes[1].set(ylabel="%", title="Bubble (incl. migration time)")
    axes[2].set(ylabel="ms", title="Step time")
    fig.suptitle(
        f"Live migration, 2 stages, stage {SLOW_STAGE} {FACTOR}x slower (EMULATED kernels)"
    )
    return save_figure(fig, NAME, "transition", folder)


if __name__ == "__main__":
    main()
