"""PipeDream-2BW vs our flushed 1F1B: steady-state step time and what a drain costs.

bench_runtime's setup: 16-layer MLP (width 256), batch 64, S = 4 stages of 4 layers, M = 16,
EMULATED kernels (a real Linear+tanh plus a sleep of 1 ms forward / 2 ms backward per layer,
standing for accelerator time). 2BW runs twice: with lead 1 (PipeDream-2BW's order, S - s
activations in flight on stage s) and with lead 2 (``PipelineConfig.lead``: each rank two
forwards ahead of the next, so a message has an action's time to arrive; 2(S-1-s) + 1
activations in flight). All three run on one pool of 4 ranks in alternating rounds; each run
takes ``--warmup`` untimed steps (2BW's first window has no spilled backwards), then
``--steps`` steps back to back between two barriers (``common.back_to_back``: no barrier
between steps, so 2BW's windows may overlap); a run's step time is that wall / steps, and the
medians over runs are compared. Ideal ratio 2BW / 1F1B = M / (M + S - 1) = 0.84
(no fill or drain per step); target <= 0.88 (for each lead). Printed next to it: the
simulator's steady state of a 2BW window (``simulate(make_schedule("2bw", S, M), ...)``: consecutive windows overlap) and
a model of a window whose ranks all start together (what a step that ends with a collective
on every rank allowed: stage s waits s forwards for its first input), and both leads simulated
with a hop of ``HOP_S`` (bench_runtime's measured hop). Then each lead-1 2BW run's
``pipe.flush()`` is timed (barrier to return, slowest rank): a drain's cost in ms and in steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core import twobw
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from experiments import bench_runtime as br
from experiments.common import back_to_back, pool, write_json

NAME = "bench_2bw"
#: What runs: (schedule, 2BW lead) by the name the results use.
SCHEDULES = {"2bw": ("2bw", 1), "2bw-lead2": ("2bw", 2), "1f1b": ("1f1b", 1)}
TARGET = 0.88
HOP_S = 0.5e-3  # one hop's latency as bench_runtime measures it (0.44-0.57 ms), simulated


def run_job(
    args: dict[str, Any], schedule: str, warmup: int, steps: int, lead: int = 1
) -> dict[str, Any]:
    """Rank job: ``warmup`` untimed steps of ``schedule`` (2BW: with ``lead``), ``steps`` back
    to back (one wall), then a timed ``flush`` (a drain under 2BW).

    Returns this rank's wall per step, losses, the reports' step times and the flush's wall.
    """
    model = br._model(args)
    cfg = PipelineConfig(microbatches=args["microbatches"], schedule=schedule, lead=lead)
    x, y = br._data(args)
    with Pipeline(
        model, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=1e-3), cfg
    ) as pipe:
        timed = back_to_back(lambda _: pipe.step(x, y), steps, warmup=warmup)
        dist.barrier()
        t0 = time.perf_counter()
        pipe.flush()
        flush_s = time.perf_counter() - t0
    return {
        "per_step": timed.per_step,
        "losses": [out.loss for out in timed.outputs],
        "step_times": [out.report.step_time for out in timed.outputs],
        "flush_s": flush_s,
    }


def synced_window_s(num: int, m: int, fwd: float, bwd: float) -> float:
    """A steady-state 2BW window whose ranks all start at 0 (zero hop cost): every spilled
    backward whose downstream partner ran in the previous window is ready at once; the rest
    wait for their producer in this window. Returns the end of the last action on any rank."""
    acts = [twobw.window(num, m, s, spill=True) for s in range(num)]
    here = {(a.stage, a.kind, a.microbatch) for row in acts for a in row}
    done: dict[tuple[int, str, int], float] = {}
    pos, free = [0] * num, [0.0] * num
    moved = True
    while moved:
        moved = False
        for s in range(num):
            while pos[s] < len(acts[s]):
                a = acts[s][pos[s]]
                peer = s - 1 if a.kind == "F" else s + 1  # F after upstream's, B downstream's
                dep = (peer, "F" if peer < s else "B", a.microbatch)
                if dep in here and dep not in done:
                    break  # its producer has not run yet: try the other ranks
                start = max(free[s], done.get(dep, 0.0))
                free[s] = done[(s, a.kind, a.microbatch)] = start + (fwd if a.kind == "F" else bwd)
                pos[s] += 1
                moved = True
    if pos != [len(row) for row in acts]:
        raise RuntimeError(f"synced window model deadlocked at {pos}")
    return max(free)


def predictions(args: dict[str, Any]) -> dict[str, float]:
    """Simulated step times (s) of both schedules and the ratios they give."""
    s, m = args["stages"], args["microbatches"]
    per = args["layers"] // s
    f, b = per * args["fwd_ms"] * 1e-3, per * args["bwd_ms"] * 1e-3
    costs = Costs.build(s, m, f, b)
    stream = simulate(make_schedule("2bw", s, m), costs).step_time
    flushed = simulate(make_schedule("1f1b", s, m), costs).step_time
    synced = synced_window_s(s, m, f, b)
    hop = Costs.build(s, m, f, b, HOP_S)
    hopped = {
        lead: simulate(make_schedule("2bw", s, m, lead=lead), hop).step_time for lead in (1, 2)
    }
    hopped_flushed = simulate(make_schedule("1f1b", s, m), hop).step_time
    return {
        "2bw_stream_s": stream,
        "2bw_synced_window_s": synced,
        "1f1b_s": flushed,
        "ratio_stream": stream / flushed,
        "ratio_synced_window": synced / flushed,
        "ideal": m / (m + s - 1),
        "drain_s": (s - 1) * b,
        "hop_s": HOP_S,
        "with_hop_2bw_s": hopped[1],
        "with_hop_2bw_lead2_s": hopped[2],
        "with_hop_1f1b_s": hopped_flushed,
    }


def main() -> None:
    """Run both schedules in alternating rounds on one pool of S ranks; print and save."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="timed steps per run, back to back")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first in each run")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ns = p.parse_args()
    args: dict[str, Any] = dict(br.SETUP)
    if ns.quick:
        ns.rounds, ns.steps, ns.warmup = 1, 2, 1
        args.update(stages=2, layers=4, microbatches=4, fwd_ms=0.2, bwd_ms=0.4)  # 2 processes
    walls: dict[str, list[float]] = {k: [] for k in SCHEDULES}
    reported: dict[str, list[float]] = {k: [] for k in SCHEDULES}
    flushes: list[float] = []
    with pool(args["stages"]) as workers:
        for rnd in range(ns.rounds):
            for kind in list(SCHEDULES)[:: 1 if rnd % 2 == 0 else -1]:
                schedule, lead = SCHEDULES[kind]
                ranks = workers.run(run_job, args, schedule, ns.warmup, ns.steps, lead, timeout=600)
                walls[kind].append(ranks[0]["per_step"])
                reported[kind] += ranks[0]["step_times"]
                if kind == "2bw":
                    flushes.append(max(r["flush_s"] for r in ranks))
            print(f"round {rnd + 1}/{ns.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_reported = {k: statistics.median(v) for k, v in reported.items()}
    ratios = {k: med[k] / med["1f1b"] for k in SCHEDULES if k != "1f1b"}
    ratio = ratios["2bw"]
    pred = predictions(args)
    flush_s = statistics.median(flushes)
    s, m = args["stages"], args["microbatches"]
    print(
        f"\nEMULATED kernels: {args['layers']} layers x ({args['fwd_ms']} ms fwd, "
        f"{args['bwd_ms']} ms bwd), S={s}, M={m}, batch {args['batch']}, width {args['width']}; "
        f"median over {ns.rounds} runs per schedule of (wall of {ns.steps} steps back to back) / "
        f"{ns.steps}, after {ns.warmup} warm-up steps; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    for kind in SCHEDULES:
        runs = ", ".join(f"{w * 1e3:.1f}" for w in walls[kind])
        print(
            f"{kind:9s} median step {med[kind] * 1e3:7.1f} ms (runs: {runs}; report step_time "
            f"{med_reported[kind] * 1e3:7.1f} ms)"
        )
    for kind, r in ratios.items():
        print(
            f"ratio {kind}/1f1b {r:.3f} (target <= {TARGET}: {'met' if r <= TARGET else 'MISSED'};"
            f" ideal M/(M+S-1) = {pred['ideal']:.3f})"
        )
    print(
        f"simulator: 2bw window steady state {pred['2bw_stream_s'] * 1e3:.1f} ms vs 1f1b "
        f"{pred['1f1b_s'] * 1e3:.1f} ms -> ratio {pred['ratio_stream']:.3f}; a window with every "
        f"rank starting together {pred['2bw_synced_window_s'] * 1e3:.1f} ms -> ratio "
        f"{pred['ratio_synced_window']:.3f}"
    )
    print(
        f"simulator with a {HOP_S * 1e3:.1f} ms hop: 2bw lead 1 {pred['with_hop_2bw_s'] * 1e3:.1f} ms"
        f", lead 2 {pred['with_hop_2bw_lead2_s'] * 1e3:.1f} ms, 1f1b "
        f"{pred['with_hop_1f1b_s'] * 1e3:.1f} ms -> ratios "
        f"{pred['with_hop_2bw_s'] / pred['with_hop_1f1b_s']:.3f} and "
        f"{pred['with_hop_2bw_lead2_s'] / pred['with_hop_1f1b_s']:.3f}"
    )
    print(
        f"drain: pipe.flush() {flush_s * 1e3:.1f} ms (median of {len(flushes)}, slowest rank) = "
        f"{flush_s / med['2bw']:.3f} steps of 2bw (nominal (S-1) x backward = "
        f"{pred['drain_s'] * 1e3:.1f} ms)"
    )
    out: dict[str, Any] = {
        "setup": {**args, "rounds": ns.rounds, "steps": ns.steps, "warmup": ns.warmup},
        "kernels": "EMULATED",
        "median_step_s": med,
        "median_report_step_s": med_reported,
        "runs_per_step_s": walls,
        "ratio": ratio,
        "ratios": ratios,
        "target": TARGET,
        "target_met": ratio <= TARGET,
        "targets_met": {k: r <= TARGET for k, r in ratios.items()},
        "simulator": pred,
        "flush_s": flushes,
        "flush_median_s": flush_s,
        "flush_steps": flush_s / med["2bw"],
    }
    print(f"wrote {write_json(NAME, out)}")


if __name__ == "__main__":
    main()
