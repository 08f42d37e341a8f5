"""Command line: ``adaptive-pp simulate|demo|trace|plot|export|serve|infer``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .core.analysis import replay_measured
from .core.schedules import (
    SCHEDULE_NAMES,
    SIMULATED_SCHEDULE_NAMES,
    ScheduleError,
    make_schedule,
)
from .core.simulator import Costs, bubble_approx, bubble_exact, simulate
from .observability.chrome_trace import load_run, side_by_side, write_chrome_trace
from .observability.display import summary, timeline
from .observability.logs import FORMATS, LEVELS
from .observability.otel import ENV_ENDPOINT
from .observability.plots import PlotDependencyError, plot_run
from .serving import commands as serving


def _slowdown(text: str) -> tuple[int, float]:
    stage, sep, factor = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(stage), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected STAGE=FACTOR such as 2=2.0, got {text!r}"
        ) from None


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="simulate one step of a schedule (no processes)")
    p.add_argument("--stages", "-S", type=int, default=4, help="pipeline stages (default 4)")
    p.add_argument("--microbatches", "-M", type=int, default=16, help="micro-batches (default 16)")
    p.add_argument("--schedule", choices=SIMULATED_SCHEDULE_NAMES, default="1f1b")
    p.add_argument(
        "--chunks", "-V", type=int, default=2, help="model chunks per rank (interleaved-1f1b)"
    )
    p.add_argument(
        "--lead",
        type=int,
        default=1,
        help="2bw: forwards each rank runs ahead of the next (default 1; 2 hides the hops)",
    )
    p.add_argument("--tau-f", type=float, default=1.0, help="forward ms per stage (default 1)")
    p.add_argument("--tau-b", type=float, default=2.0, help="backward ms per stage (default 2)")
    p.add_argument(
        "--tau-w",
        type=float,
        default=None,
        help="weight-gradient ms of the backward, for zb-h1 (default: 0.44 x tau-b)",
    )
    p.add_argument("--tau-c", type=float, default=0.0, help="ms per hop (default 0)")
    p.add_argument(
        "--slow",
        type=_slowdown,
        action="append",
        default=[],
        metavar="STAGE=FACTOR",
        help="slow a stage down, e.g. --slow 2=2.0 (repeatable)",
    )
    p.add_argument("--timeline", action="store_true", help="print an ASCII timeline")
    p.add_argument("--width", type=int, default=100, help="timeline width in characters")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument(
        "--chrome-trace",
        type=Path,
        metavar="FILE",
        help="also write the step as Chrome trace JSON (open in ui.perfetto.dev)",
    )


def _run_simulate(args: argparse.Namespace) -> int:
    sched = make_schedule(
        args.schedule, args.stages, args.microbatches, args.chunks, lead=args.lead
    )
    costs = Costs.build(
        args.stages,
        args.microbatches,
        args.tau_f * 1e-3,
        args.tau_b * 1e-3,
        args.tau_c * 1e-3,
        slowdown=dict(args.slow),
        tau_w=None if args.tau_w is None else args.tau_w * 1e-3,
    )
    report = simulate(sched, costs)
    if args.chrome_trace is not None:
        path = write_chrome_trace(args.chrome_trace, [report])
        # keep stdout pure JSON under --json
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        data = report.to_dict()
        data["bubble_exact"] = bubble_exact(args.stages, args.microbatches)
        data["bubble_approx"] = bubble_approx(args.stages, args.microbatches)
        json.dump(data, sys.stdout)
        print()
        return 0
    print(summary(report))
    if args.timeline:
        print()
        print(timeline(report, args.width))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    if args.simulate_only:
        print("== simulated: 4 stages x 16 micro-batches, 1 ms forward, 2 ms backward ==\n")
        for name in ("gpipe", "1f1b"):
            report = simulate(make_schedule(name, 4, 16), Costs.build(4, 16, 1e-3, 2e-3))
            print(summary(report))
            print()
            print(timeline(report, 96))
            print()
        return 0
    from .emulation.demo import Observe, Slowdown, train_rank, written
    from .runtime.launch import launch

    if not 0 <= args.slow_stage < args.stages:
        raise ValueError(f"--slow-stage must be a stage 0..{args.stages - 1}")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "reports.jsonl").unlink(missing_ok=True)
    # no endpoint given: setup_otlp in each rank falls back to $OTEL_EXPORTER_OTLP_ENDPOINT
    observe = Observe(args.log_format, args.log_level, args.otlp_endpoint, str(run_dir))
    slow = Slowdown(args.slow_stage, args.slow_factor, args.slow_at - 1) if args.slow_at else None
    print(f"== starting {args.stages} stage processes (each imports torch: a few seconds) ==")
    launch(train_rank, args.stages, args.steps, args.microbatches, args.schedule, observe, slow)
    print()
    try:
        paths = plot_run(run_dir)
    except PlotDependencyError as exc:  # no matplotlib: the trace still helps
        print(f"no plots: {exc}")
        paths = [write_chrome_trace(run_dir / "trace.json", load_run(run_dir))]
    print("\n".join(written(str(run_dir), paths)))
    return 0


def _add_trace(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trace", help="write a run's step reports as Chrome trace JSON")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="holds reports.jsonl")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: RUN_DIR/trace.json")
    p.add_argument(
        "--replay",
        action="store_true",
        help="add the simulator's replay of each step (measured durations) below the run",
    )


def _run_trace(args: argparse.Namespace) -> int:
    reports = load_run(args.run_dir)
    out = args.output
    if out is None:
        out = (args.run_dir if args.run_dir.is_dir() else args.run_dir.parent) / "trace.json"
    if args.replay:
        label = "measured" if all(r.source == "runtime" for r in reports) else "run"
        replay = [replay_measured(r) for r in reports]
        print(write_chrome_trace(out, side_by_side({label: reports, "replay": replay})))
    else:
        print(write_chrome_trace(out, reports))
    return 0


def _add_plot(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plot", help="write PNG plots and trace.json of a run (needs matplotlib)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="holds reports.jsonl")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: RUN_DIR)")
    p.add_argument("--step", type=int, metavar="N", help="step of the timeline (default: last)")
    p.add_argument(
        "--queue-steps", type=int, default=3, metavar="K", help="steps in the queue plot (3)"
    )


def _run_plot(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out, step=args.step, queue_steps=args.queue_steps):
        print(path)
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": _run_simulate,
    "demo": _run_demo,
    "trace": _run_trace,
    "plot": _run_plot,
    **serving.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``adaptive-pp``."""
    parser = argparse.ArgumentParser(prog="adaptive-pp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"adaptive-pp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    demo = sub.add_parser(
        "demo",
        help="train on 4 local processes with adaptive=True while one stage slows down",
    )
    demo.add_argument("--stages", type=int, default=4)
    demo.add_argument("--microbatches", type=int, default=8)
    demo.add_argument("--schedule", choices=SCHEDULE_NAMES, default="1f1b")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--slow-stage", type=int, default=2, help="the stage that slows down (2)")
    demo.add_argument("--slow-factor", type=float, default=2.0, help="how much slower (2.0)")
    demo.add_argument(
        "--slow-at", type=int, default=8, help="first slow step, from 1 (8; 0: never)"
    )
    demo.add_argument(
        "--simulate-only", action="store_true", help="print simulated GPipe and 1F1B instead"
    )
    demo.add_argument(
        "--run-dir",
        default="runs/demo",
        help="where reports.jsonl, trace.json and the plots go (runs/demo; replaced)",
    )
    demo.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help=f"export OpenTelemetry spans and metrics over OTLP/gRPC (default ${ENV_ENDPOINT})",
    )
    demo.add_argument("--log-format", choices=FORMATS, default="console", help="structlog output")
    demo.add_argument("--log-level", choices=LEVELS, default="warning")
    _add_trace(sub)
    _add_plot(sub)
    serving.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `adaptive-pp ... | head` exits quietly
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, ScheduleError, PlotDependencyError, OSError) as exc:
        # bad input, a missing or malformed run dir, matplotlib missing, an unwritable path
        print(f"adaptive-pp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
