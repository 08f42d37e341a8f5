"""Telemetry overhead: OTel spans + metrics exported to a real collector vs telemetry off.

4 stages, 16-layer MLP (width 256), batch 64, M=16, EMULATED 1 ms forward / 2 ms backward per
layer (a sleep standing for accelerator time). Rounds alternate off / on in the same stage
processes; "on" exports every rank's spans and metrics over OTLP/gRPC to a rotel-agent collector
(metrics exported every second), "off" passes no provider. Queue instrumentation (timestamps,
per-step report) is part of the runtime and runs in both. Prints median on / median off.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.emulation.kernels import emulated_mlp
from adaptive_pp.observability.otel import local_collector, setup_otlp
from adaptive_pp.runtime.launch import WorkerPool
from experiments.common import timed_steps, write_json


def job(endpoint: str | None, steps: int, microbatches: int, fwd_ms: float) -> list[float]:
    """Rank job: ``steps`` timed steps, exporting to ``endpoint`` when given."""
    torch.manual_seed(0)
    model = emulated_mlp(16, 256, fwd_ms * 1e-3, 2 * fwd_ms * 1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    otel = (
        setup_otlp(
            endpoint,
            attributes={"adaptive_pp.rank": dist.get_rank()},
            export_interval_s=1.0,
            set_global=False,
        )
        if endpoint
        else None
    )
    providers: dict[str, Any] = (
        {"tracer_provider": otel.tracer_provider, "meter_provider": otel.meter_provider}
        if otel is not None
        else {}
    )
    with Pipeline(
        model,
        nn.functional.mse_loss,
        lambda p: torch.optim.Adam(p, lr=1e-4),
        PipelineConfig(microbatches=microbatches),
        **providers,
    ) as pipe:
        # The first step warms up: timed, not returned.
        walls = timed_steps(lambda _: pipe.step(x, y), steps - 1, warmup=1).walls
    if otel is not None:
        otel.shutdown()
    return walls


def main() -> None:
    """Alternate off/on rounds on 4 ranks; print the ratio of median step times."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    ns = p.parse_args()
    rounds, steps, m, fwd = (1, 3, 4, 0.2) if ns.quick else (ns.rounds, ns.steps, 16, 1.0)
    walls: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp, WorkerPool(4) as pool:
        log = Path(tmp) / "collector.log"
        with local_collector(log) as endpoint:
            for _ in range(rounds):
                for mode in ("off", "on"):
                    ranks = pool.run(job, endpoint if mode == "on" else None, steps, m, fwd)
                    walls[mode] += ranks[0]
            received = len(re.findall(r"^\s*Name\s*: adaptive_pp\.step$", log.read_text(), re.M))
    off, on = statistics.median(walls["off"]), statistics.median(walls["on"])
    print(
        f"EMULATED kernels ({fwd} ms fwd, {2 * fwd} ms bwd per layer), 4 stages, 16 layers, M={m}"
    )
    print(
        f"median step: telemetry off {off * 1e3:.1f} ms, on (OTLP to rotel-agent) "
        f"{on * 1e3:.1f} ms; ratio on/off {on / off:.3f} (target <= 1.03); "
        f"collector received {received} step spans"
    )
    path = write_json(
        "bench_telemetry",
        {"off_s": walls["off"], "on_s": walls["on"], "ratio": on / off, "spans_seen": received},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
