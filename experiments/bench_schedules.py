"""Schedules side by side: ours vs torch.distributed.pipelining on each schedule both run.

bench_runtime's setup (16-layer MLP, S = 4 x 4 layers, M = 16, EMULATED kernels: 1 ms forward,
2 ms backward per layer, the backward split I : W = 0.56 : 0.44 under zero-bubble schedules for
both runtimes), one pool of 4 ranks, every configuration once per round in alternating order.
Prints, per schedule, ours / torch; our best schedule / torch's Schedule1F1B; and each of our
schedules' measured bubble against the simulator's (equal to the closed forms:
(S-1)/(M+S-1) for 1F1B, idle (S-1)(F+I-W) per rank for ZB-H1, (S-1)/(VM+S-1) for interleaved
1F1B). Interleaved 1F1B runs V = 2 chunks of 2 layers per rank on both runtimes (torch's
ScheduleInterleaved1F1B), chunk c of rank r holding virtual stage c * S + r. ZB-V (torch's
ScheduleZBVZeroBubble) runs 2 chunks of 2 layers per rank in V placement, rank r holding
virtual stages r and 2S-1-r (the loss on rank 0), backward split as for ZB-H1; its bubble is
the simulator's (idle S - 1 units per rank of 6M + S - 1 when F = I = W per chunk). Torch's
ZB-V always runs; ours only where our runtime has it (``"zb-v" in SCHEDULE_NAMES``).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from adaptive_pp.core.actions import SCHEDULE_NAMES
from adaptive_pp.core.analysis import hop_latencies
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import W_SHARE, Costs, simulate
from adaptive_pp.runtime.launch import WorkerPool
from experiments import bench_runtime as br
from experiments.common import write_json
from experiments.peer import posting_ms, run_reports

SCHEDULES = ("1f1b", "zb-h1", "interleaved-1f1b", "zb-v")
CHUNKED = ("interleaved-1f1b", "zb-v")  # 2 chunks of half a rank's layers on both runtimes


def kinds_run(ours_has: tuple[str, ...] = SCHEDULE_NAMES) -> list[str]:
    """The configurations, "ours-SCHEDULE" and "torch-SCHEDULE", in round order: torch's on
    every schedule, ours on those our runtime runs (``ours_has``)."""
    return [
        f"{who}-{s}"
        for s in SCHEDULES
        for who in ("ours", "torch")
        if who == "torch" or s in ours_has
    ]


def _simulated_bubble(args: dict[str, Any], schedule: str) -> float:
    s, m = args["stages"], args["microbatches"]
    per = args["layers"] // s
    costs = Costs.build(s, m, per * args["fwd_ms"] * 1e-3, per * args["bwd_ms"] * 1e-3)
    return simulate(make_schedule(schedule, s, m), costs).bubble_fraction


def _per_action(
    args: dict[str, Any], reports: dict[str, list[StepReport]], posting: dict[str, list[float]]
) -> dict[str, Any]:
    """Median forward and backward (B, or I and W) action per runtime and schedule, and each
    one's overhead over the emulated kernels' nominal time. Ours post their sends inside the
    action; torch's schedules post between actions, so its overhead is given with its median
    posting time per action added ("+ posting"), which is what compares like with like."""
    per = args["layers"] // args["stages"]
    nominal = {"F": per * args["fwd_ms"], "B": per * args["bwd_ms"]}
    nominal |= {"I": nominal["B"] * (1 - W_SHARE), "W": nominal["B"] * W_SHARE}
    out: dict[str, Any] = {}
    print("\nper action (medians, ms; EMULATED kernels' nominal in brackets):")
    for kind, reps in reports.items():
        if not reps:
            continue
        scale = 2 if kind.endswith(CHUNKED) else 1  # V = 2 chunks of half the layers
        post = statistics.median(posting[kind]) if kind.startswith("torch") else 0.0
        row: dict[str, Any] = {"posting_per_action": post}
        text = []
        for k in "FBIW":
            xs = [t.end - t.start for r in reps for t in r.timeline if t.kind == k]
            if xs:
                ms = 1e3 * statistics.median(xs)
                over = ms + post - nominal[k] / scale
                row[k] = {"ms": ms, "overhead_ms": over}
                text.append(f"{k} {ms:5.2f} [{nominal[k] / scale:4.2f}] {over:+5.2f}")
        if kind.endswith("-1f1b") and "interleaved" not in kind:  # one chunk per rank
            # The delay a waiting consumer saw: its start minus the producer's end (ours post
            # their sends inside the action, torch after it: its posting is in its hop).
            row["hop_ms"] = 1e3 * statistics.median(
                statistics.median(hop_latencies(r)) for r in reps
            )
            text.append(f"hop {row['hop_ms']:4.2f}")
        out[kind] = row
        extra = f" (overheads include {post:4.2f} posting)" if post else ""
        print(f"  {kind:22s} " + "  ".join(text) + extra)
    return out


def main() -> None:
    """Run the rounds; print and write the ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (+1 warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="emulated kernel times x SCALE (the per-action framework time stays); results go\n"
        "to bench_schedules_x<SCALE>.json, the headline run (scale 1) to bench_schedules.json",
    )
    ns = p.parse_args()
    args: dict[str, Any] = dict(br.SETUP)
    args.update(fwd_ms=args["fwd_ms"] * ns.scale, bwd_ms=args["bwd_ms"] * ns.scale)
    if ns.quick:
        ns.rounds, ns.steps = 1, 2
        args.update(microbatches=4, fwd_ms=0.2, bwd_ms=0.4)
    kinds = kinds_run()
    both = [s for s in SCHEDULES if f"ours-{s}" in kinds]
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    reports: dict[str, list[StepReport]] = {k: [] for k in kinds}
    posting: dict[str, list[float]] = {k: [] for k in kinds}
    with WorkerPool(args["stages"]) as pool:
        for rnd in range(ns.rounds):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                ranks = pool.run(br._job, kind, args, ns.steps + 1, timeout=600)
                walls[kind] += ranks[0]["walls"][1:]
                reports[kind] += run_reports(ranks, kind.split("-", 1)[1], args["microbatches"])
                posting[kind].append(posting_ms(ranks))
            print(f"round {rnd + 1}/{ns.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    out: dict[str, Any] = {"setup": args, "median_step_s": med, "ratios": {}, "bubble": {}}
    print(
        f"\nEMULATED kernels: {args['layers']} layers x ({args['fwd_ms']} ms fwd, "
        f"{args['bwd_ms']} ms bwd), S={args['stages']}, M={args['microbatches']}; "
        f"median of {len(walls[kinds[0]])} steps per configuration"
    )
    for s in both:
        ratio = med[f"ours-{s}"] / med[f"torch-{s}"]
        out["ratios"][s] = ratio
        print(
            f"{s:16s} ours {med[f'ours-{s}'] * 1e3:7.1f} ms  torch {med[f'torch-{s}'] * 1e3:7.1f} ms"
            f"  ours/torch {ratio:.3f} (target <= 0.95)"
        )
    for s in SCHEDULES:
        if s not in both:
            print(f"{s:16s} ours: not in our runtime ({', '.join(SCHEDULE_NAMES)})")
    best = min(both, key=lambda s: med[f"ours-{s}"])
    out["ratios"]["best_over_torch_1f1b"] = best_ratio = med[f"ours-{best}"] / med["torch-1f1b"]
    print(f"our best ({best}) / torch Schedule1F1B: {best_ratio:.3f} (target <= 0.85)")
    # The same work per rank in every schedule: a step at nominal kernel times without framework
    # or hops is work / (1 - bubble), so one schedule's ideal over 1F1B's is a ratio of those.
    closed = {x: _simulated_bubble(args, x) for x in SCHEDULES}  # the closed forms
    out["ratios"]["ideal_over_1f1b"] = ideal_ratio = {
        x: (1.0 - closed["1f1b"]) / (1.0 - closed[x]) for x in SCHEDULES[1:]
    }
    print(
        "each schedule's ideal / 1F1B's (simulated: nominal kernels, no framework time, no hops): "
        + ", ".join(f"{x} {r:.3f}" for x, r in ideal_ratio.items())
    )
    out["ratios"]["torch_over_torch_1f1b"] = torch_own = {
        s: med[f"torch-{s}"] / med["torch-1f1b"] for s in SCHEDULES[1:]
    }
    print(
        "torch's own / its Schedule1F1B: " + ", ".join(f"{s} {r:.3f}" for s, r in torch_own.items())
    )
    for s in both:
        measured = statistics.median(r.bubble_fraction for r in reports[f"ours-{s}"])
        peer = statistics.median(r.bubble_fraction for r in reports[f"torch-{s}"])
        expected = closed[s]
        out["bubble"][s] = {"measured": measured, "closed_form": expected, "torch": peer}
        print(
            f"{s:16s} bubble measured {measured:6.2%} vs closed form {expected:6.2%} "
            f"({100 * (measured - expected):+.2f} pp; target within 2 pp); torch's {peer:6.2%}"
        )
    print(
        "  (torch's bubble from its actions' timeline: its posting between actions is idle there)"
    )
    out["actions_ms"] = _per_action(args, reports, posting)
    name = "bench_schedules" if ns.scale == 1.0 else f"bench_schedules_x{ns.scale:g}"
    print(f"wrote {write_json(name, out)}")


if __name__ == "__main__":
    main()
