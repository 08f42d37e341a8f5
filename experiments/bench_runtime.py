"""Runtime vs torch.distributed.pipelining: same model, partition, M; ratios from one run.

16-layer MLP (width 256), batch 64, S=4 stages (4 layers each), M=16, EMULATED kernels: each layer
is a real Linear+tanh plus a sleep of 1 ms forward / 2 ms backward standing for accelerator time
(see adaptive_pp.emulation). Every configuration runs in the same 4 processes, in alternating
rounds, and the median step wall time is compared. Also: measured bubble vs (S-1)/(M+S-1), and
measured step time vs the simulator's prediction.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.analysis import hop_latencies, replay_measured
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import Placement, make_schedule, virtual_stage
from adaptive_pp.core.simulator import Costs, bubble_exact, simulate
from adaptive_pp.emulation.kernels import emulated_mlp
from adaptive_pp.runtime.launch import WorkerPool
from experiments.common import timed_steps, write_json
from experiments.peer import Record, run_reports, torch_pipeline_walls

CONFIGS = ("ours-1f1b", "torch-1f1b", "ours-gpipe", "torch-gpipe")
SETUP: dict[str, Any] = dict(
    layers=16, width=256, batch=64, stages=4, microbatches=16, fwd_ms=1.0, bwd_ms=2.0
)


def _model(args: dict[str, Any]) -> nn.Sequential:
    torch.manual_seed(0)
    model = emulated_mlp(
        args["layers"], args["width"], args["fwd_ms"] * 1e-3, args["bwd_ms"] * 1e-3
    )
    for i, factor in args.get("slow", {}).items():
        stage_layers = args["layers"] // args["stages"]
        for layer in list(model)[int(i) * stage_layers : (int(i) + 1) * stage_layers]:
            layer.slowdown = factor
    return model


def _data(args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(args["batch"], args["width"], generator=g),
        torch.randn(args["batch"], args["width"], generator=g),
    )


def run_ours(args: dict[str, Any], schedule: str, steps: int) -> dict[str, Any]:
    """Rank job: time ``steps`` steps of our runtime; rank 0 returns walls and reports."""
    model = _model(args)
    cfg = PipelineConfig(microbatches=args["microbatches"], schedule=schedule)
    x, y = _data(args)
    with Pipeline(
        model, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=1e-3), cfg
    ) as pipe:
        timed = timed_steps(lambda _: pipe.step(x, y), steps)
    return {"walls": timed.walls, "reports": [out.report.to_dict() for out in timed.outputs]}


def run_torch(args: dict[str, Any], schedule: str, steps: int) -> dict[str, Any]:
    """Rank job: the same with torch.distributed.pipelining's PipelineStage and schedule."""
    rank, stages = dist.get_rank(), dist.get_world_size()
    model = _model(args)
    sub: nn.Module | list[nn.Module]
    if schedule in ("interleaved-1f1b", "zb-v"):  # 2 chunks per rank, placed as ours are
        per = args["layers"] // (2 * stages)
        placement: Placement = "v" if schedule == "zb-v" else "loop"
        vs = [virtual_stage(rank, c, stages, placement) for c in (0, 1)]
        sub = [nn.Sequential(*list(model)[v * per : (v + 1) * per]) for v in vs]
        params = [p for mod in sub for p in mod.parameters()]
    else:
        per = args["layers"] // stages
        sub = nn.Sequential(*list(model)[rank * per : (rank + 1) * per])
        params = list(sub.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    x, y = _data(args)
    timeline: list[list[Record]] = []
    walls = torch_pipeline_walls(
        sub, schedule, args["microbatches"], opt, x, y, steps, timeline=timeline
    )
    return {"walls": walls, "reports": [], "timeline": timeline}


def _job(kind: str, args: dict[str, Any], steps: int) -> dict[str, Any]:
    ours, schedule = kind.split("-", 1)
    return (run_ours if ours == "ours" else run_torch)(args, schedule, steps)


def compare(
    pool: WorkerPool, args: dict[str, Any], rounds: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[StepReport]]]:
    """Every configuration in alternating rounds on ``pool``: step walls and step reports.

    Each run takes ``steps + 1`` steps; its first step warms up and is dropped.
    """
    walls: dict[str, list[float]] = {k: [] for k in CONFIGS}
    reports: dict[str, list[StepReport]] = {k: [] for k in CONFIGS}
    for rnd in range(rounds):
        for kind in CONFIGS:
            ranks = pool.run(_job, kind, args, steps + 1, timeout=600)
            walls[kind] += ranks[0]["walls"][1:]
            reports[kind] += run_reports(ranks, kind.split("-")[1], args["microbatches"])
        print(f"round {rnd + 1}/{rounds} done", flush=True)
    return walls, reports


def _median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs) if xs else float("nan")


def action_medians(reports: list[StepReport]) -> tuple[float, float, float]:
    """Median forward action, backward action and (per step) hop latency, in ms."""
    f = [t.end - t.start for r in reports for t in r.timeline if t.kind == "F"]
    b = [t.end - t.start for r in reports for t in r.timeline if t.kind == "B"]
    hop = [statistics.median(hop_latencies(r)) for r in reports]
    return _median_ms(f), _median_ms(b), _median_ms(hop)


def decompose(
    reports: dict[str, list[StepReport]], med: dict[str, float], s: int, m: int
) -> dict[str, Any]:
    """Where each runtime's step goes, from its timelines; and what free communication gives.

    Per configuration: median forward and backward action time, median hop latency (the delay
    a waiting consumer saw), and the replay of each step with its measured durations and zero
    hop latency. The replay of torch's steps with zero hop latency is a bound for any runtime
    that runs the kernels as torch's does: nothing spent between actions.
    """
    out: dict[str, Any] = {}
    print("\nwhere the step goes (medians over steps; EMULATED kernels):")
    for kind in CONFIGS:
        reps = reports[kind]
        if not reps:
            continue
        f, b, hop = action_medians(reps)
        free = [replay_measured(r, [0.0] * (s - 1)) for r in reps]
        row = {
            "forward_ms": f,
            "backward_ms": b,
            "hop_ms": hop,
            "free_comm_step_ms": _median_ms([r.step_time for r in free]),
            "free_comm_bubble": statistics.median(r.bubble_fraction for r in free),
        }
        row["free_comm_over_torch"] = row["free_comm_step_ms"] / (
            1e3 * med["torch-" + kind.split("-")[1]]
        )
        out[kind] = row
        print(
            f"{kind:12s} forward {row['forward_ms']:5.2f} ms  backward {row['backward_ms']:5.2f} ms"
            f"  hop {row['hop_ms']:5.3f} ms  | same actions, free communication: step "
            f"{row['free_comm_step_ms']:6.1f} ms = {row['free_comm_over_torch']:.3f} of torch's,"
            f" bubble {row['free_comm_bubble']:6.2%} ({100 * (row['free_comm_bubble'] - bubble_exact(s, m)):+.2f} pp)"
        )
    return out


def main() -> None:
    """Run every configuration in alternating rounds on one pool of 4 ranks; print ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--steps", type=int, default=6, help="steps per round (first round's first dropped)"
    )
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    p.add_argument("--slow", type=str, default="", help="STAGE=FACTOR to slow one stage, e.g. 2=2")
    ns = p.parse_args()
    args: dict[str, Any] = dict(SETUP)
    if ns.slow:
        stage, factor = ns.slow.split("=")
        args["slow"] = {int(stage): float(factor)}
    if ns.quick:
        ns.rounds, ns.steps = 1, 2
        args.update(microbatches=4, fwd_ms=0.2, bwd_ms=0.4)
    with WorkerPool(args["stages"]) as pool:
        walls, reports = compare(pool, args, ns.rounds, ns.steps)
    med = {k: statistics.median(v) for k, v in walls.items()}
    s, m = args["stages"], args["microbatches"]
    per_stage = args["layers"] // s
    nominal = simulate(
        make_schedule("1f1b", s, m),
        Costs.build(
            s,
            m,
            per_stage * args["fwd_ms"] * 1e-3,
            per_stage * args["bwd_ms"] * 1e-3,
            slowdown=args.get("slow"),
        ),
    )
    out: dict[str, Any] = {
        "setup": args,
        "median_step_s": med,
        "ratios": {},
        "bubble": {},
        "simulator": {},
    }
    print(
        f"\nEMULATED kernels: {args['layers']} layers x ({args['fwd_ms']} ms fwd, {args['bwd_ms']} ms bwd), "
        f"S={s}, M={m}, batch {args['batch']}, width {args['width']}; median of {len(walls['ours-1f1b'])} steps"
    )
    for sched in ("1f1b", "gpipe"):
        ratio = med[f"ours-{sched}"] / med[f"torch-{sched}"]
        out["ratios"][sched] = ratio
        print(
            f"{sched:6s} ours {med[f'ours-{sched}'] * 1e3:8.1f} ms   torch {med[f'torch-{sched}'] * 1e3:8.1f} ms"
            f"   ratio ours/torch {ratio:.3f} (target <= 0.95)"
        )
    for sched in ("1f1b", "gpipe"):
        reps = reports[f"ours-{sched}"]
        bubble = statistics.median(r.bubble_fraction for r in reps)
        peer = statistics.median(r.bubble_fraction for r in reports[f"torch-{sched}"])
        flush = statistics.median(r.step_time for r in reps)
        # Prediction from the durations the run measured (kernel + framework time per action),
        # step by step; the median of those predictions against the median measured step.
        measured = statistics.median(replay_measured(r).step_time for r in reps)
        out["bubble"][sched] = {"measured": bubble, "exact": bubble_exact(s, m), "torch": peer}
        out["simulator"][sched] = {
            "measured_flush_s": flush,
            "predicted_nominal_s": nominal.step_time,
            "predicted_from_measured_durations_s": measured,
        }
        print(
            f"{sched:6s} bubble measured {bubble:6.2%} vs exact (S-1)/(M+S-1) {bubble_exact(s, m):6.2%}"
            f" (diff {100 * (bubble - bubble_exact(s, m)):+.2f} pp; target within 2 pp);"
            f" torch's {peer:6.2%} (its posting counts as idle)"
        )
        print(
            f"{sched:6s} step (flush) measured {flush * 1e3:7.1f} ms; simulator: nominal "
            f"{nominal.step_time * 1e3:7.1f} ms ({flush / nominal.step_time - 1:+.1%}), from measured "
            f"action durations {measured * 1e3:7.1f} ms ({flush / measured - 1:+.1%}); target within 5%"
        )
    out["decomposition"] = decompose(reports, med, s, m)
    path = write_json("bench_runtime", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
