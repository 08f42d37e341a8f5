"""Simulator speed: one step of 64 stages x 1024 micro-batches, end to end (target: < 0.2 s).

Per schedule: generation (make_schedule), costs (Costs.build), simulation (simulate, checking
and report included), the young garbage collection they leave pending, and their sum, median
over a few repeats (``--warmup N``: N untimed runs first). Generating, compiling and simulating
pause the cyclic collector (they make no cycles); the collection the next allocations would
trigger then scans the step's new objects once, so it is timed here, right after.

A generator's ``Schedule.stages`` and the report's timeline and queue traces are built when
first read (``core.actions.Deferred``); ``read`` (not in the total) is the time to read them
all afterwards: the Action lists, every start and end, every message's times. ``free`` (not in
the total either) is the time to drop the repeat's schedule, costs and report with what was
read (10^6 Python objects for ZB-V); until 2026-12-02 that happened inside the next repeat's
generate, costs and simulate (rebinding the names), about 40 ms of its total for ZB-V.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from experiments.common import write_json

NAMES = ("1f1b", "gpipe", "zb-h1", "interleaved-1f1b", "zb-v")


def _read(report: StepReport) -> None:
    """Read every deferred field of ``report`` (the timeline's lists, the queues' times)."""
    timeline = report.timeline
    _ = (timeline.actions, timeline.start, timeline.end)
    for q in report.queues:
        _ = (q.arrived, q.consumed)


def main() -> None:
    """Time generation + costs + simulate() (+ pending GC) per schedule; print the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=2, help="V of interleaved-1f1b")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed runs first (the process's heap grows)"
    )
    parser.add_argument("--names", nargs="*", default=list(NAMES), help="schedules to time")
    args = parser.parse_args()
    s_, m_ = args.stages, args.microbatches
    rows = {}
    for name in args.names:
        keys = ("generate", "costs", "simulate", "gc", "total", "read", "free")
        parts: dict[str, list[float]] = {key: [] for key in keys}
        for run in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            sched = make_schedule(name, s_, m_, args.chunks)
            t1 = time.perf_counter()
            costs = Costs.build(s_, m_, 1e-3, 2.4e-3, 1e-4)
            t2 = time.perf_counter()
            report = simulate(sched, costs)
            t3 = time.perf_counter()
            gc.collect(0)
            t4 = time.perf_counter()
            _read(report)
            t5 = time.perf_counter()
            del sched, costs, report
            t6 = time.perf_counter()
            if run < args.warmup:
                continue
            times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, t5 - t4, t6 - t5)
            for key, dt in zip(keys, times, strict=True):
                parts[key].append(dt)
        rows[name] = {k: statistics.median(v) for k, v in parts.items()}
        rows[name]["min_total_s"] = min(parts["total"])
        print(
            f"{name:17s} {s_} x {m_}: generate {rows[name]['generate']:.3f} s  costs "
            f"{rows[name]['costs']:.3f} s  simulate {rows[name]['simulate']:.3f} s  gc "
            f"{rows[name]['gc']:.3f} s  total {rows[name]['total']:.3f} s "
            f"(min {min(parts['total']):.3f}; target < 0.2 s)  read {rows[name]['read']:.3f} s  "
            f"free {rows[name]['free']:.3f} s"
        )
    path = write_json(
        "bench_simulator",
        {
            "stages": s_,
            "microbatches": m_,
            "chunks": args.chunks,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
