"""Serving benchmark: a 10-layer MLP as 2 ONNX stages behind gRPC, M = 1..32, vs plain onnxruntime.

    python -m experiments.bench_serve [--quick] [--out DIR] [--figures docs/figures]

Model: 10 blocks (Linear 512x512 + ReLU, the last a plain Linear), partition (0, 5, 10): a
stage is 5 layers, ~1.5 ms for 32 samples and ~15 ms for 256 on one core of the 2-core CPU
this runs on. A request is a batch of 256 split into M micro-batches; each M gets the same
number of measured requests, in rounds that alternate with the baseline, so drift in the
machine's load (other users' jobs) hits every configuration alike. Each stage server is its own
process with one onnxruntime thread; the client keeps S + 1 micro-batches in flight.

Per M: latency per micro-batch (client send to answer) p50 / p99, bubble (the StepReport's
idle share of stage-time, the request's wall time as each stage's wall) and throughput
(samples / request wall). ``controllers.serving.choose_microbatches`` picks M for p99 <= 50 ms
and bubble <= 10%, or says which target binds. Baseline: the same model as one ONNX file in
one onnxruntime session in this process, with 1 and with 2 intra-op threads (the whole CPU),
a request being one run on all 256 samples; the ratio is served throughput at the chosen M
over the faster of the two.

Writes serve_bench.json and serve_bench.png (in --out, default results/serve_bench; with
--figures also copied there), and the chosen M's requests as a run directory (run/) that
``adaptive-pp plot`` reads. Timing is wall-clock on a shared 2-core CPU: figures are noisy.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adaptive_pp.core.report import StepReport
from adaptive_pp.serving.client import PipelineClient
from adaptive_pp.serving.export import demo_mlp, export_pipeline
from adaptive_pp.serving.launch import launch_stages
from adaptive_pp.serving.manifest import random_input
from adaptive_pp.serving.reporting import RunDir
from adaptive_pp.serving.sweep import row, serve_requests
from controllers.serving import ServingTarget, choose_microbatches, figures, percentile
from experiments.common import pyplot, results_dir, save_figure, study_args, write_json

NAME = "serve_bench"
FULL: dict[str, Any] = dict(
    layers=10,
    width=512,
    batch=256,
    stages=2,
    candidates=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
    requests=20,
    rounds=4,
)
QUICK: dict[str, Any] = dict(
    layers=10, width=64, batch=32, stages=2, candidates=[1, 2, 4], requests=2, rounds=1
)
NOTE = "wall-clock timing on a 2-core CPU shared with other jobs (each stage: 1 onnxruntime thread)"


def _baseline(path: Path, batches: Sequence[Any], threads: int) -> list[float]:
    """Seconds per request of plain onnxruntime (one session, ``threads`` threads)."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(["output"], {"input": batches[0]})
    out = []
    for x in batches:
        t0 = time.perf_counter()
        sess.run(["output"], {"input": x})
        out.append(time.perf_counter() - t0)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ns = study_args(__doc__, argv, lambda p: p.add_argument("--figures", default=None))
    setup = QUICK if ns.quick else FULL
    folder = results_dir(NAME, ns.out)
    target = ServingTarget()
    torch.manual_seed(0)
    model = demo_mlp(setup["width"], setup["layers"])
    per_round = max(1, setup["requests"] // setup["rounds"])
    with tempfile.TemporaryDirectory() as tmp:
        half = setup["layers"] // 2
        man = export_pipeline(model, (0, half, setup["layers"]), (setup["width"],), f"{tmp}/pipe")
        export_pipeline(model, (0, setup["layers"]), (setup["width"],), f"{tmp}/whole")

        def batch(i: int) -> Any:
            return random_input(setup["batch"], (setup["width"],), seed=i)

        by_m: dict[int, list[StepReport]] = {m: [] for m in setup["candidates"]}
        base: dict[int, list[float]] = {1: [], 2: []}
        with (
            launch_stages(f"{tmp}/pipe") as procs,
            PipelineClient(procs.addresses, partition=man.partition) as client,
        ):
            for r in range(setup["rounds"]):
                for m in setup["candidates"]:
                    make = lambda i, r=r: batch(1000 * r + i)  # noqa: E731
                    by_m[m] += serve_requests(client, make, m, per_round, warmup=1)
                for threads, times in base.items():
                    times += _baseline(
                        Path(tmp) / "whole" / "stage0.onnx",
                        [batch(1000 * r + i) for i in range(per_round)],
                        threads,
                    )
    choice = choose_microbatches([x for rs in by_m.values() for x in rs], target)
    rows = [figures(rs) for rs in by_m.values()]
    for rs in by_m.values():
        print(row(rs))
    chosen = next(f for f in rows if f.microbatches == choice.microbatches)
    baselines = {
        threads: {
            "threads": threads,
            "request_p50_ms": percentile(times, 50) * 1e3,
            "request_p99_ms": percentile(times, 99) * 1e3,
            "throughput": setup["batch"] * len(times) / sum(times),
        }
        for threads, times in base.items()
    }
    baseline = max(baselines.values(), key=lambda b: b["throughput"])
    base_tp = baseline["throughput"]
    ratio = chosen.throughput / base_tp
    walls = [r.step_time for r in by_m[choice.microbatches]]
    served_request = {"p50_ms": percentile(walls, 50) * 1e3, "p99_ms": percentile(walls, 99) * 1e3}
    print(f"chosen {choice.reason} (binds: {choice.binds})")
    for b in baselines.values():
        print(
            f"plain onnxruntime, one process, {b['threads']} thread(s): {b['request_p50_ms']:.2f} "
            f"ms per {setup['batch']}-sample request (p50), {b['throughput']:.0f} samples/s"
        )
    print(
        f"served at M={choice.microbatches}: {served_request['p50_ms']:.2f} ms per request "
        f"(p50), {ratio:.2f}x the throughput of the faster plain run"
    )
    print(f"note: {NOTE}")
    run = RunDir(folder / "run")
    for report in by_m[choice.microbatches]:
        run.append(report)
    png = _plot(rows, choice.microbatches, choice.binds, base_tp, target, folder)
    result = {
        "note": NOTE,
        "setup": setup,
        "target": {
            "latency_budget_ms": target.latency_budget * 1e3,
            "max_bubble": target.max_bubble,
        },
        "rows": [f.to_dict() for f in rows],
        "choice": {
            "microbatches": choice.microbatches,
            "binds": choice.binds,
            "reason": choice.reason,
        },
        "baseline": baseline,
        "baselines": list(baselines.values()),
        "served_request_ms": served_request,
        "ratio_throughput_vs_plain": ratio,
        "run_dir": str(run.path),
        "figures": [str(png)],
    }
    path = write_json(NAME, result, folder)
    if ns.figures is not None:
        Path(ns.figures).mkdir(parents=True, exist_ok=True)
        for f in (png, path):
            shutil.copy(f, Path(ns.figures) / f.name)
    print(f"wrote {path} and {png}")
    return result


def _plot(
    rows: Sequence[Any],
    chosen: int,
    binds: str,
    base_tp: float,
    target: ServingTarget,
    folder: Path,
) -> Path:
    plt = pyplot()
    fig, (ax_l, ax_b, ax_t) = plt.subplots(1, 3, figsize=(14, 4))
    ms = [f.microbatches for f in rows]
    ax_l.plot(ms, [f.p50 * 1e3 for f in rows], marker=".", label="p50")
    ax_l.plot(ms, [f.p99 * 1e3 for f in rows], marker=".", label="p99")
    ax_l.axhline(target.latency_budget * 1e3, color="r", linestyle="--", label="budget")
    ax_l.set_ylabel("latency per micro-batch (ms)")
    ax_b.plot(ms, [100 * f.bubble for f in rows], marker=".", label="measured")
    ax_b.plot(ms, [100 / (m + 1) for m in ms], linestyle=":", label="(S-1)/(M+S-1), S=2")
    ax_b.axhline(100 * target.max_bubble, color="r", linestyle="--", label="cap")
    ax_b.set_ylabel("bubble (%)")
    ax_t.plot(ms, [f.throughput for f in rows], marker=".", label="served, 2 stages")
    ax_t.axhline(base_tp, color="k", linestyle="--", label="plain onnxruntime, 1 process")
    ax_t.set_ylabel("throughput (samples/s)")
    for ax in (ax_l, ax_b, ax_t):
        ax.axvline(chosen, color="g", linestyle=":", label=f"chosen M={chosen}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batches M")
        ax.legend(fontsize=7)
    fig.suptitle(f"2-stage ONNX pipeline over gRPC; chosen M={chosen} (binds: {binds}); {NOTE}")
    return save_figure(fig, NAME, NAME, folder)


if __name__ == "__main__":
    main()
