"""Adaptive rebalancing vs static pipelines when one stage slows down (EMULATED kernels).

4 stages, 16-layer MLP (width 256), batch 64, M=16, each layer an emulated kernel of 1 ms
forward / 2 ms backward. From step 5 on, stage 2 runs 2x slower (a slow device: whatever layers
it holds). No setting is tuned for this: the adaptive 1F1B run is ``AdaptivePolicy(schedule=None)``
(the rebalancer with its defaults; M and the schedule stay), the other ``PipelineConfig(adaptive=
True)``, the default policy (rebalancer, micro-batch tuner and schedule switch 1F1B <-> ZB-H1, all
defaults; each trial kept only if measured faster); layer bytes and the batch size come from the
step reports. Printed from one run: adaptive 1F1B steady step / torch.distributed.pipelining static
step on the same initial partition (target <= 0.75), adaptive 1F1B / our static run on the best
partition found offline with the simulator (target <= 1.05), the default policy's steady step
against torch's static 1F1B and the adaptive 1F1B run, the schedule and M it ended on, and for
every adaptive run the steps from the slowdown until it converged (the issue's target: 5).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.emulation.kernels import EmulatedLayer, emulated_mlp
from adaptive_pp.runtime.launch import WorkerPool
from controllers import AdaptivePolicy
from experiments.common import timed_steps, write_json
from experiments.peer import torch_pipeline_walls

LAYERS, WIDTH, BATCH, STAGES = 16, 256, 64, 4
SLOW_STAGE, SLOW_FROM, FACTOR = 2, 5, 2.0


def _slow_device(modules: list[nn.Module], stage: int, step: int) -> None:
    """Stage SLOW_STAGE runs every layer it holds FACTOR x slower from step SLOW_FROM on."""
    factor = FACTOR if stage == SLOW_STAGE and step >= SLOW_FROM else 1.0
    for mod in modules:
        if isinstance(mod, EmulatedLayer):
            mod.slowdown = factor


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def run_ours(
    bounds: tuple[int, ...],
    steps: int,
    m: int,
    fwd_ms: float,
    adaptive: bool,
    switch: bool = False,
) -> dict[str, Any]:
    """Rank job: our runtime, static, adaptive on 1F1B (the rebalancer alone, defaults) or, with
    ``switch``, the default policy (``PipelineConfig(adaptive=True)``); returns walls, events,
    partitions, schedules and micro-batch counts."""
    torch.manual_seed(0)
    model = emulated_mlp(LAYERS, WIDTH, fwd_ms * 1e-3, 2 * fwd_ms * 1e-3)
    policy = AdaptivePolicy(schedule=None) if adaptive and not switch else None
    cfg = PipelineConfig(microbatches=m, partition=bounds, adaptive=adaptive and switch)
    x, y = _data()
    parts: list[list[int]] = []
    scheds: list[str] = []
    ms: list[int] = []

    def record() -> None:
        parts.append(list(pipe.partition.bounds))
        scheds.append(pipe.plan.schedule)
        ms.append(pipe.plan.microbatches)

    with Pipeline(
        model,
        nn.functional.mse_loss,
        lambda p: torch.optim.Adam(p, lr=1e-4),
        cfg,
        controller=policy,
    ) as pipe:
        timed = timed_steps(
            lambda _: pipe.step(x, y).report,
            steps,
            before_step=lambda k: _slow_device(list(pipe.local_modules().values()), pipe.stage, k),
            after_step=lambda k, _: record(),
        )
    events = [list(report.events) for report in timed.outputs]
    return {
        "walls": timed.walls,
        "events": events,
        # Per step: each stage's compute and its layers' (forward, backward) times, as measured.
        "layer_times": [
            [
                [st.compute, list(st.layers), list(st.layer_forward), list(st.layer_backward)]
                for st in report.stages
            ]
            for report in timed.outputs
        ],
        "partitions": parts,
        "schedules": scheds,
        "microbatches": ms,
    }


def run_torch(bounds: tuple[int, ...], steps: int, m: int, fwd_ms: float) -> dict[str, Any]:
    """Rank job: torch's Schedule1F1B on a fixed partition with the same slow stage."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = emulated_mlp(LAYERS, WIDTH, fwd_ms * 1e-3, 2 * fwd_ms * 1e-3)
    sub = nn.Sequential(*list(model)[bounds[rank] : bounds[rank + 1]])
    opt = torch.optim.Adam(sub.parameters(), lr=1e-4)
    x, y = _data()
    walls = torch_pipeline_walls(
        sub, "1f1b", m, opt, x, y, steps, lambda k: _slow_device(list(sub), rank, k)
    )
    return {"walls": walls}


def simulated(part: Partition, m: int, schedule: str = "1f1b") -> float:
    """The simulator's step time for ``part`` with stage 2 at FACTOR x (the emulated costs)."""
    sizes = [n * (FACTOR if s == SLOW_STAGE else 1.0) for s, n in enumerate(part.sizes)]
    costs = Costs.build(STAGES, m, [1.0 * n for n in sizes], [2.0 * n for n in sizes])
    return simulate(make_schedule(schedule, STAGES, m), costs).step_time


@functools.cache  # within_best_after asks for every recorded step's M and schedule
def best_offline(m: int, schedule: str = "1f1b") -> Partition:
    """The partition the simulator rates fastest with stage 2 at FACTOR x (exhaustive)."""
    return min(
        (
            Partition((0, *cuts, LAYERS))
            for cuts in itertools.combinations(range(1, LAYERS), STAGES - 1)
        ),
        key=lambda p: (simulated(p, m, schedule), p.bounds),
    )


def within_best_after(run: dict[str, Any]) -> int:
    """The issue's measure: steps from the slowdown until every later step's plan is within 5%
    of the best partition for its M and schedule (rated by the simulator on the emulated costs,
    so wall-clock noise does not enter; the plan of step k is what was recorded after k - 1)."""
    plans = list(zip(run["partitions"], run["microbatches"], run["schedules"], strict=True))
    ok = [
        simulated(Partition(tuple(b)), m, sc) <= 1.05 * simulated(best_offline(m, sc), m, sc)
        for b, m, sc in plans
    ]
    # ok[k] rates the plan of step k + 1; before the slowdown every plan counts as fine.
    last_bad = max((k + 1 for k in range(len(ok)) if not ok[k] and k + 1 >= SLOW_FROM), default=0)
    return max(last_bad + 1, SLOW_FROM) - SLOW_FROM


def _job(kind: str, bounds: tuple[int, ...], steps: int, m: int, fwd_ms: float) -> dict[str, Any]:
    if kind == "torch":
        return run_torch(bounds, steps, m, fwd_ms)
    adaptive = kind in ("adaptive", "adaptive-switch")
    return run_ours(bounds, steps, m, fwd_ms, adaptive, switch=kind == "adaptive-switch")


def converged_after(walls: list[float], events: list[list[str]], steady: float) -> int:
    """Steps from the slowdown to the first step on the final plan within 5% of ``steady``."""
    changes = [k for k, es in enumerate(events) if es and k >= SLOW_FROM]
    first = changes[-1] if changes else SLOW_FROM  # events of step k: its plan is new
    k = next((k for k in range(first, len(walls)) if walls[k] <= 1.05 * steady), len(walls))
    return k - SLOW_FROM


def moved_into_place(events: list[list[str]]) -> int:
    """Steps from the slowdown to the first step on the final partition (later changes of M or
    schedule aside: the rebalancing alone)."""
    moves = [k for k, es in enumerate(events) if any(e.startswith("moved") for e in es)]
    return max([k for k in moves if k >= SLOW_FROM], default=SLOW_FROM) - SLOW_FROM


def _report_runs(name: str, runs: list[dict[str, Any]], steady: float) -> list[int]:
    """Print each round's plan changes and convergence; return the steps until the plan stays
    within 5% of the best (``within_best_after``)."""
    converged, within = [], []
    for r, run in enumerate(runs):
        within.append(within_best_after(run))
        changes = [(k, e) for k, es in enumerate(run["events"]) for e in es]
        converged.append(converged_after(run["walls"], run["events"], steady))
        print(f"{name}, round {r + 1}:")
        for k, e in changes:
            print(f"  step {k}: {e}")
        print(
            f"  final partition {Partition(tuple(run['partitions'][-1]))}, "
            f"{run['schedules'][-1]}, M={run['microbatches'][-1]}; converged {converged[-1]} "
            f"steps after the slowdown (on the final partition from {moved_into_place(run['events'])}"
            f" steps after), with {len(changes)} change(s); its plan within 5% of the best "
            f"(simulated) from {within[-1]} steps after the slowdown on"
        )
    return within


def main() -> None:
    """Adaptive, torch static and best-static runs (ours and torch's) on one pool, in rounds."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=45, help="steps of each adaptive run")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds of the four runs, order reversed each round"
    )
    p.add_argument("--quick", action="store_true")
    ns = p.parse_args()
    # --quick keeps the 1 ms kernels: at 0.3 ms on a loaded 2-core box the 2x stage's layers
    # read within the noise of the framework's time and the rebalancer rightly keeps still.
    m, fwd = (16, 1.0) if not ns.quick else (8, 1.0)
    steps = ns.steps if not ns.quick else 30
    rounds = ns.rounds if not ns.quick else 1
    initial = Partition.even(LAYERS, STAGES).bounds
    best = best_offline(m)
    tail = 8  # steady state: the last steps of each run
    static_steps = SLOW_FROM + 3 + tail
    jobs = {
        "adaptive": ("adaptive", initial, steps),
        # The default policy (PipelineConfig(adaptive=True)): moves, M and 1F1B <-> ZB-H1.
        "adaptive-switch": ("adaptive-switch", initial, steps),
        "torch": ("torch", initial, static_steps),
        "best": ("best", best.bounds, static_steps),
        # Context, not a target: what torch's own runtime gains from the same move.
        "torch-best": ("torch", best.bounds, static_steps),
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    with WorkerPool(STAGES) as pool:
        for r in range(rounds):
            order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
            for name in order:
                kind, bounds, n = jobs[name]
                runs[name].append(pool.run(_job, kind, bounds, n, m, fwd, timeout=900)[0])
            print(f"round {r + 1}/{rounds} done", flush=True)
    med = {
        k: statistics.median(w for run in v for w in run["walls"][-tail:]) for k, v in runs.items()
    }
    steady, t_torch, t_best = med["adaptive"], med["torch"], med["best"]
    switched = med["adaptive-switch"]
    print(
        f"EMULATED kernels ({fwd} ms fwd, {2 * fwd} ms bwd per layer), {STAGES} stages, {LAYERS} layers, "
        f"M={m}; stage {SLOW_STAGE} {FACTOR}x slower from step {SLOW_FROM}; {rounds} round(s), "
        f"medians of the last {tail} steps of every run; best offline partition {best}"
    )
    converged = _report_runs("adaptive 1F1B (rebalancer, defaults)", runs["adaptive"], steady)
    converged_switch = _report_runs(
        "default policy (PipelineConfig(adaptive=True))", runs["adaptive-switch"], switched
    )
    print(
        f"adaptive 1F1B steady {steady * 1e3:.1f} ms / torch static {t_torch * 1e3:.1f} ms = "
        f"{steady / t_torch:.3f} (target <= 0.75)"
    )
    print(
        f"adaptive 1F1B steady {steady * 1e3:.1f} ms / best static {t_best * 1e3:.1f} ms = "
        f"{steady / t_best:.3f} (target <= 1.05)"
    )
    print(
        f"context: torch static on the best partition {med['torch-best'] * 1e3:.1f} ms / on the "
        f"initial {t_torch * 1e3:.1f} ms = {med['torch-best'] / t_torch:.3f}; ours / torch, both "
        f"on the best partition: {t_best / med['torch-best']:.3f}"
    )
    finals = [run["schedules"][-1] for run in runs["adaptive-switch"]]
    print(
        f"default policy steady {switched * 1e3:.1f} ms / torch static {t_torch * 1e3:.1f} ms = "
        f"{switched / t_torch:.3f}; / adaptive 1F1B {switched / steady:.3f}; / best static "
        f"{switched / t_best:.3f}; final schedules {', '.join(finals)}"
    )
    print(
        "steps from the slowdown until the plan stays within 5% of the best partition "
        f"(simulated on the emulated costs), per round: adaptive 1F1B {', '.join(map(str, converged))}; default policy "
        f"{', '.join(map(str, converged_switch))} (target <= 5)"
    )
    path = write_json(
        "bench_adaptive",
        {
            "rounds": rounds,
            "adaptive_walls": [run["walls"] for run in runs["adaptive"]],
            "torch_walls": [run["walls"] for run in runs["torch"]],
            "best_walls": [run["walls"] for run in runs["best"]],
            "torch_best_walls": [run["walls"] for run in runs["torch-best"]],
            "events": [run["events"] for run in runs["adaptive"]],
            "best_partition": list(best.bounds),
            "median_step_s": med,
            "ratio_vs_torch": steady / t_torch,
            "ratio_vs_best": steady / t_best,
            "switch_walls": [run["walls"] for run in runs["adaptive-switch"]],
            "switch_events": [run["events"] for run in runs["adaptive-switch"]],
            "switch_final_schedules": finals,
            "switch_ratio_vs_torch": switched / t_torch,
            "switch_ratio_vs_best": switched / t_best,
            "switch_final_microbatches": [
                run["microbatches"][-1] for run in runs["adaptive-switch"]
            ],
            "layer_times": [run["layer_times"] for run in runs["adaptive"]],
            "switch_layer_times": [run["layer_times"] for run in runs["adaptive-switch"]],
            "steps_to_converge": converged,
            "switch_steps_to_converge": converged_switch,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
