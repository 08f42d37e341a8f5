"""Simulator speed: one step of 64 stages x 1024 micro-batches (target: under 0.2 s)."""

from __future__ import annotations

import argparse
import statistics
import time

from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from experiments.common import write_json


def main() -> None:
    """Time simulate() (checking and report included) over a few repeats; print the median."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = {}
    for name in ("1f1b", "gpipe"):
        sched = make_schedule(name, args.stages, args.microbatches)
        costs = Costs.build(args.stages, args.microbatches, 1e-3, 2.4e-3, 1e-4)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            simulate(sched, costs)
            times.append(time.perf_counter() - t0)
        rows[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
        }
        print(
            f"{name:6s} {args.stages} stages x {args.microbatches} micro-batches: "
            f"median {rows[name]['median_s']:.3f} s  (min {min(times):.3f}, max {max(times):.3f}, "
            f"{args.repeats} runs; target < 0.2 s)"
        )
    path = write_json(
        "bench_simulator",
        {"stages": args.stages, "microbatches": args.microbatches, "results": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
