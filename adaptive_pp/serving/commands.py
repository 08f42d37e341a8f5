"""``adaptive-pp export | serve | infer``: the serving subcommands.

Registered by ``adaptive_pp.cli``; everything heavy (torch, onnxruntime, grpc) is imported
when a command runs, so the rest of the CLI works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_MODEL = "adaptive_pp.serving.export:demo_mlp"
_EXTRA = "the serve extra: pip install 'adaptive-pp[serve]'"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers such as 0,5,10, got {text!r}"
        ) from None


def _factory(spec: str) -> Callable[[], Any]:
    """``package.module:function`` -> the function (ValueError naming what is missing)."""
    mod, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"a model factory is MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add export, serve and infer to the ``adaptive-pp`` subcommands."""
    p = sub.add_parser(
        "export", help="export a model's stages as ONNX files, checked by onnxruntime"
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="export directory")
    p.add_argument(
        "--model",
        default=DEMO_MODEL,
        help=f"MODULE:FUNCTION returning nn.Sequential or blocks "
        f"(default {DEMO_MODEL}: a 10-layer MLP, 256 wide)",
    )
    p.add_argument("--pre", metavar="MODULE:FUNCTION", help="module run first on stage 0")
    p.add_argument("--post", metavar="MODULE:FUNCTION", help="module run last on the last stage")
    p.add_argument("--partition", type=_ints, metavar="BOUNDS", help="e.g. 0,5,10 (default even)")
    p.add_argument("--stages", "-S", type=int, default=2, help="stages if no --partition (2)")
    p.add_argument("--input-shape", type=_ints, metavar="DIMS", help="one sample's shape, e.g. 256")
    p.add_argument("--dtype", default="float32", help="input dtype (float32)")
    p.add_argument("--input-high", type=int, default=2, help="integer inputs in [0, HIGH)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building the model")
    p.add_argument("--rtol", type=float, default=1e-4, help="check tolerance (1e-4)")
    p.add_argument("--atol", type=float, default=1e-5, help="check tolerance (1e-5)")

    p = sub.add_parser("serve", help="serve an export: one gRPC server process per stage")
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR")
    p.add_argument("--stage", type=int, help="serve this stage only, in this process")
    add_stage_arguments(p)

    p = sub.add_parser("infer", help="send requests through a served pipeline and measure them")
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR")
    p.add_argument(
        "--addresses", help="HOST:PORT of each stage, comma-separated (default: start them here)"
    )
    p.add_argument("--batch", "-B", type=int, default=64, help="samples per request (64)")
    p.add_argument("--microbatches", "-M", type=int, default=4, help="micro-batches (4)")
    p.add_argument("--tune", action="store_true", help="sweep M and pick it for the target")
    p.add_argument("--candidates", type=_ints, default=(1, 2, 4, 8, 16, 32), help="M to sweep")
    p.add_argument("--requests", type=int, default=20, help="measured requests per M (20)")
    p.add_argument("--budget-ms", type=float, default=50.0, help="p99 latency budget (50)")
    p.add_argument("--max-bubble", type=float, default=0.10, help="bubble cap (0.10)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per micro-batch, s (10)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/serve"), help="(runs/serve)")


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one stage server (shared with ``adaptive-pp serve``)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (0: a free one, printed when ready)")
    p.add_argument("--next", metavar="HOST:PORT", help="the next stage's address (not the last)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1)")
    p.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="extra ms per micro-batch: emulates a slow device (tests, experiments)",
    )


def run_export(args: argparse.Namespace) -> int:
    try:
        import torch

        from .export import export_pipeline
    except ImportError as exc:
        raise ValueError(f"export needs {_EXTRA} ({exc})") from exc
    from adaptive_pp.core.partition import Partition

    torch.manual_seed(args.seed)
    model = _factory(args.model)()
    pre = _factory(args.pre)() if args.pre else None
    post = _factory(args.post)() if args.post else None
    blocks = list(model)
    part = Partition(args.partition) if args.partition else Partition.even(len(blocks), args.stages)
    shape = args.input_shape
    if shape is None:
        first = pre if pre is not None else blocks[0]
        width = next((m.in_features for m in first.modules() if hasattr(m, "in_features")), None)
        if width is None:
            raise ValueError("give --input-shape (one sample's input shape)")
        shape = (int(width),)
    m = export_pipeline(
        blocks,
        part,
        shape,
        args.out,
        pre=pre,
        post=post,
        dtype=args.dtype,
        input_high=args.input_high,
        rtol=args.rtol,
        atol=args.atol,
        seed=args.seed,
    )
    for st in m.stages:
        print(
            f"stage {st.stage}: layers {st.layers[0]}..{st.layers[1] - 1} -> {args.out / st.file} "
            f"{st.input.describe()} -> {st.output.describe()}; onnxruntime = PyTorch within "
            f"rtol {m.rtol:g}, atol {m.atol:g} (max |error| {st.max_error:.2g})"
        )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        from .launch import launch_stages
        from .manifest import load_manifest
        from .server import serve
    except ImportError as exc:
        raise ValueError(f"serve needs {_EXTRA} ({exc})") from exc
    if args.stage is not None:
        return serve(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    delays = [args.delay_ms] * load_manifest(args.export_dir).num_stages
    with launch_stages(
        args.export_dir, host=args.host, threads=args.threads, delays_ms=delays
    ) as p:
        for s, a in enumerate(p.addresses):
            print(f"stage {s}: {a} (pid {p.procs[s].pid})")
        print(f"try: adaptive-pp infer {args.export_dir} --addresses {','.join(p.addresses)}")
        print("Ctrl-C stops every stage", flush=True)
        while not stop.wait(0.5):
            if dead := [s for s, q in enumerate(p.procs) if q.poll() is not None]:
                print(f"stage server(s) {dead} exited", file=sys.stderr)
                return 1
    return 0


def run_infer(args: argparse.Namespace) -> int:
    try:
        from controllers.serving import ServingTarget, figures

        from .client import PipelineClient, StageError
        from .launch import StageProcesses, launch_stages
        from .manifest import load_manifest, load_reference, random_input
        from .reporting import RunDir
        from .sweep import row, serve_requests, sweep
    except ImportError as exc:
        raise ValueError(f"infer needs {_EXTRA} ({exc})") from exc
    import numpy as np

    man = load_manifest(args.export_dir)
    procs: StageProcesses | None = None
    if args.addresses:
        addresses = args.addresses.split(",")
    else:
        print(f"== starting {man.num_stages} stage server processes ==")
        procs = launch_stages(args.export_dir)
        addresses = procs.addresses
    spec = man.stages[0].input

    def batch(i: int) -> Any:
        shape = tuple(d for d in spec.shape[1:] if d is not None)
        return random_input(args.batch, shape, spec.dtype, high=man.input_high, seed=1000 + i)

    try:
        with PipelineClient(addresses, partition=man.partition, timeout=args.timeout) as client:
            client.wait_ready(10)
            x, y = load_reference(args.export_dir)
            got = client.infer(x, min(len(x), 2)).output
            err = float(np.max(np.abs(got.astype(np.float64) - y)))
            same = np.allclose(got, y, rtol=man.rtol, atol=man.atol)
            print(
                f"served output {'equals' if same else 'DIFFERS FROM'} PyTorch's on the reference "
                f"batch within rtol {man.rtol:g}, atol {man.atol:g} (max |error| {err:.2g})"
            )
            run = RunDir(args.run_dir)
            target = ServingTarget(args.budget_ms * 1e-3, args.max_bubble)
            summary: dict[str, Any] = {
                "stages": addresses,
                "batch": args.batch,
                "cpus": os.cpu_count(),
            }
            if args.tune:
                by_m, choice = sweep(
                    client,
                    batch,
                    args.candidates,
                    args.requests,
                    target=target,
                    run=run,
                    progress=print,
                )
                print(f"chosen {choice.reason} (binds: {choice.binds})")
                summary["rows"] = [figures(rs).to_dict() for rs in by_m.values()]
                summary["choice"] = {
                    "microbatches": choice.microbatches,
                    "binds": choice.binds,
                    "reason": choice.reason,
                }
            else:
                reports = serve_requests(client, batch, args.microbatches, args.requests, run=run)
                print(row(reports))
                summary["rows"] = [figures(reports).to_dict()]
            print(
                f"wrote {run.reports} and {run.write_summary(summary)}; "
                f"plots: adaptive-pp plot {args.run_dir}"
            )
            return 0 if same else 1
    except StageError as exc:
        print(f"adaptive-pp: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if procs is not None:
            procs.close()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "export": run_export,
    "serve": run_serve,
    "infer": run_infer,
}
