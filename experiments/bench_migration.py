"""Cost of a live migration: the step that contains one vs a normal step (EMULATED kernels).

4 stages, 16-layer MLP (width 256), batch 64, M=16, emulated 1 ms forward / 2 ms backward per
layer. Before step 5 one boundary layer moves from stage 2 to stage 1 (parameters, Adam moments,
version). Target: (migration + step) <= 1.25 x median normal step + time to transfer the moved
bytes, the latter measured in the same run by sending the same bytes between the two ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import MoveLayers
from adaptive_pp.core.report import StepReport
from adaptive_pp.emulation.kernels import emulated_mlp
from adaptive_pp.runtime.launch import WorkerPool
from experiments.common import timed_steps, write_json


def job(steps: int, move_at: int, microbatches: int, fwd_ms: float) -> dict[str, Any]:
    """Rank job: time each step; apply the move before step ``move_at``; time a raw transfer."""
    torch.manual_seed(0)
    model = emulated_mlp(16, 256, fwd_ms * 1e-3, 2 * fwd_ms * 1e-3)
    cfg = PipelineConfig(microbatches=microbatches)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    change, moved = 0.0, 0
    with Pipeline(
        model, nn.functional.mse_loss, lambda p: torch.optim.Adam(p, lr=1e-4), cfg
    ) as pipe:

        def step(k: int) -> StepReport:
            """Step ``k``; at ``move_at`` the move first, timed with the step."""
            nonlocal change, moved
            if k == move_at:
                t0 = time.perf_counter()
                event = pipe.apply(MoveLayers(2, 1, 1))
                change = time.perf_counter() - t0
                moved = int(str(event).split("(")[1].split(" bytes")[0])
            return pipe.step(x, y).report

        timed = timed_steps(step, steps)
    walls, events = timed.walls, [list(report.events) for report in timed.outputs]
    dist.barrier()
    payload = torch.zeros(max(1, moved // 4))
    t0 = time.perf_counter()
    if dist.get_rank() == 2:
        dist.send(payload, 1)
    elif dist.get_rank() == 1:
        dist.recv(payload, 2)
    transfer = time.perf_counter() - t0
    return {
        "walls": walls,
        "change": change,
        "events": events,
        "bytes": moved,
        "transfer": transfer,
    }


def main() -> None:
    """Run once on 4 ranks and print the ratio against the bound."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    ns = p.parse_args()
    steps, move_at, m, fwd = (4, 2, 4, 0.2) if ns.quick else (9, 5, 16, 1.0)
    with WorkerPool(4) as pool:
        ranks = pool.run(job, steps, move_at, m, fwd, timeout=600)
    r0 = ranks[0]
    normal = statistics.median(w for k, w in enumerate(r0["walls"]) if k not in (0, move_at))
    migr = r0["walls"][move_at]
    transfer = ranks[1]["transfer"]
    bound = 1.25 * normal + transfer
    print(
        f"EMULATED kernels ({fwd} ms fwd, {2 * fwd} ms bwd per layer), 4 stages, 16 layers, M={m}"
    )
    print(
        f"normal step (median) {normal * 1e3:.1f} ms; step with migration {migr * 1e3:.1f} ms "
        f"(of which migration {r0['change'] * 1e3:.1f} ms, {r0['bytes']} bytes moved)"
    )
    print(
        f"ratio {migr / normal:.3f}; bound 1.25 x normal + transfer ({transfer * 1e3:.2f} ms) = "
        f"{bound * 1e3:.1f} ms -> {'within' if migr <= bound else 'OVER'} the bound"
    )
    print(f"report of that step: {r0['events'][move_at]}")
    path = write_json(
        "bench_migration",
        {
            "normal_s": normal,
            "migration_step_s": migr,
            "migration_s": r0["change"],
            "bytes": r0["bytes"],
            "transfer_s": transfer,
            "bound_s": bound,
            "events": r0["events"][move_at],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
