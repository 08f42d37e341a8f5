"""Peer comparison with torch.distributed.pipelining: same model, partition and M; ratios from one run.

Our 1F1B and GPipe against torch's Schedule1F1B and ScheduleGPipe (PipelineStage, shapes inferred)
on bench_runtime's setup: 16-layer MLP (width 256), batch 64, 4 stages of 4 layers, M = 16, SGD.
Two scenarios, balanced and with stage 2's layers 2x slower, in the same 4 processes: every
round runs all eight configurations in turn, and the median step wall time per configuration
over all rounds gives the ratios ours / torch (below 1: ours is faster). EMULATED kernels: every
layer is a real Linear + tanh plus a sleep of 1 ms forward and 2.4 ms backward.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from experiments.bench_runtime import CONFIGS, compare
from experiments.common import pool, pyplot, save_figure, study_args, write_json

NAME = "exp_peers"
SCENARIOS = ("balanced", "stage 2 slow x2")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Both scenarios in alternating rounds on one pool of 4 ranks; print and plot the ratios."""
    ns = study_args(__doc__, argv)
    rounds, steps = (1, 1) if ns.quick else (4, 5)
    base: dict[str, Any] = dict(
        layers=16, width=256, batch=64, stages=4, microbatches=16, fwd_ms=1.0, bwd_ms=2.4
    )
    if ns.quick:
        base.update(microbatches=4, fwd_ms=0.2, bwd_ms=0.48)
    setups = {SCENARIOS[0]: base, SCENARIOS[1]: {**base, "slow": {2: 2.0}}}
    walls: dict[str, dict[str, list[float]]] = {s: {k: [] for k in CONFIGS} for s in SCENARIOS}
    with pool(base["stages"]) as p:
        for _ in range(rounds):
            for scenario, args in setups.items():
                got, _ = compare(p, args, 1, steps)
                for kind, w in got.items():
                    walls[scenario][kind] += w
    out: dict[str, Any] = {
        "setup": base,
        "rounds": rounds,
        "steps_per_round": steps,
        "scenarios": {},
    }
    print(
        f"EMULATED kernels: {base['layers']} layers x ({base['fwd_ms']} ms fwd, {base['bwd_ms']} ms bwd), "
        f"S={base['stages']}, M={base['microbatches']}, batch {base['batch']}, width {base['width']}; "
        f"median of {rounds * steps} steps per configuration"
    )
    for scenario in SCENARIOS:
        med = {k: statistics.median(v) * 1e3 for k, v in walls[scenario].items()}
        ratios = {s: med[f"ours-{s}"] / med[f"torch-{s}"] for s in ("1f1b", "gpipe")}
        out["scenarios"][scenario] = {"median_step_ms": med, "ratio_ours_over_torch": ratios}
        for s in ("1f1b", "gpipe"):
            print(
                f"{scenario:16s} {s:6s} ours {med[f'ours-{s}']:7.1f} ms  torch {med[f'torch-{s}']:7.1f} ms  "
                f"ours/torch {ratios[s]:.3f}"
            )
    png = _plot(out["scenarios"], ns.out)
    out["figures"] = [str(png)]
    path = write_json(NAME, out, ns.out)
    print(f"wrote {path} and {png}")
    return out


def _plot(scenarios: dict[str, Any], folder: Any) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(11, 4), sharey=True)
    for ax, scenario in zip(axes, SCENARIOS, strict=True):
        data = scenarios[scenario]
        med, ratios = data["median_step_ms"], data["ratio_ours_over_torch"]
        for i, s in enumerate(("1f1b", "gpipe")):
            bars = ax.bar(
                [i - 0.2, i + 0.2],
                [med[f"ours-{s}"], med[f"torch-{s}"]],
                0.4,
                color=["tab:blue", "tab:grey"],
                label=["ours", "torch.distributed.pipelining"] if i == 0 else None,
            )
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        names = [
            f"{n}\nours/torch {ratios[s]:.3f}" for n, s in (("1F1B", "1f1b"), ("GPipe", "gpipe"))
        ]
        ax.set_xticks([0, 1], names)
        ax.set(title=scenario, ylabel="median step (ms)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Ours vs torch.distributed.pipelining, same model/partition/M (EMULATED kernels)")
    return save_figure(fig, NAME, "peers", folder)


if __name__ == "__main__":
    main()
