"""GPU check: run what this machine has of the GPU paths; write a JSON of what ran and what not.

Every part either runs (its figures and ``ok``) or is listed under ``not_run`` with the reason:

- ``cpu_pipeline`` (always): two ranks on the CPU (gloo data and control groups) train a
  seeded MLP with a live move, bit for bit (``torch.equal``) like one process.
- ``gpu_single_stage`` (one GPU or more): one stage on cuda:0, against the CPU run.
- ``gpu_shared_two_ranks`` (one GPU or more): two ranks sharing cuda:0 with a live move; the data
  groups are gloo (NCCL cannot run two ranks on one GPU), so tensors go through host memory.
- ``gpu_nccl`` (two GPUs or more): two ranks on cuda:0 and cuda:1, tensors over NCCL, a move.
- ``benchmark`` (two GPUs or more): ours against torch.distributed.pipelining (Schedule1F1B)
  on real kernels (an MLP of GPT-style feed-forward blocks, fp32), the ratio of median step
  times from one run, the configurations alternating.

GPU results are compared with the CPU run within ``TOLERANCE`` (other kernels sum in another
order; TF32 is off): losses relatively, parameters absolutely. Runs in well under 5 minutes on
one GPU. ``make gpu-check`` writes results/gpu_check/gpu_check.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from experiments.common import environment, timed_steps, write_json

#: GPU against CPU: relative on losses, absolute on parameters (float32, TF32 off).
TOLERANCE = {"loss_rel": 1e-4, "param_abs": 1e-4}
#: The equivalence runs: an MLP of LAYERS layers of WIDTH on two stages (BOUNDS), M, Adam.
WIDTH, LAYERS, BOUNDS, M, BATCH = 32, 6, (0, 3, 6), 4, 16
#: The benchmark: feed-forward blocks d -> 4d -> d, ``rows`` rows per micro-batch.
BENCH: dict[str, int] = {
    "d": 1024,
    "blocks": 16,
    "microbatches": 8,
    "rows": 1024,
    "steps": 6,
    "rounds": 2,
}
STEPS, MOVE_AT = 4, 2  # steps per equivalence run; the move runs before this step


def _mlp(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers))
    )


def _batches(width: int, batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g))
        for _ in range(steps)
    ]


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def reference(device: str = "cpu") -> dict[str, Any]:
    """One process on ``device``, the pipeline's micro-batch split and accumulation order."""
    torch.backends.cuda.matmul.allow_tf32 = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the stage processes: same kernels, same bits
    model = _mlp(WIDTH, LAYERS).to(device)
    opt, m, losses = _adam(model.parameters()), M, []
    for x, y in _batches(WIDTH, BATCH, STEPS):
        total = 0.0
        for xm, ym in zip(x.chunk(m), y.chunk(m)):
            loss = nn.functional.mse_loss(model(xm.to(device)), ym.to(device))
            total += float(loss.detach())
            (loss / m).backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / m)
    torch.set_num_threads(threads)
    state = {f"layers.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state}


def pipeline_job(devices: list[str], move: bool) -> dict[str, Any]:
    """Rank job: the check's MLP pipelined, this rank on ``devices[rank]``; with ``move``, stage
    1's first layer moves to stage 0 before step MOVE_AT."""
    import torch.distributed as dist

    from adaptive_pp import Pipeline, PipelineConfig
    from adaptive_pp.core.decisions import MoveLayers
    from adaptive_pp.observability.logs import configure_logging

    configure_logging(level="warning")  # the move comes back in the reports' events
    torch.backends.cuda.matmul.allow_tf32 = False
    stages = len(devices)
    bounds = BOUNDS if stages == 2 else (0, LAYERS)
    cfg = PipelineConfig(microbatches=M, partition=bounds, device=devices[dist.get_rank()])
    pipe = Pipeline(_mlp(WIDTH, LAYERS), nn.functional.mse_loss, _adam, cfg)
    losses, events = [], []
    for k, (x, y) in enumerate(_batches(WIDTH, BATCH, STEPS)):
        if move and k == MOVE_AT:
            pipe.apply(MoveLayers(src=1, dst=0, count=1))
        out = pipe.step(x, y)
        losses.append(out.loss)
        events += list(out.report.events)
    transport = pipe.local.transport
    state = {
        f"{name}.{k}": v.detach().cpu()
        for name, sd in pipe.local_state().items()
        for k, v in sd.items()
    }
    result = {
        "losses": losses,
        "state": state,
        "events": events,
        "bounds": list(pipe.partition.bounds),
        "data_backend": transport.backend,
        "wire_device": str(transport.device),
        "device": str(pipe.device),
    }
    pipe.close()
    return result


def compare(ranks: list[dict[str, Any]], ref: dict[str, Any], exact: bool) -> dict[str, Any]:
    """Losses and parameters of ``ranks`` against ``ref``: equal (``exact``) or within
    TOLERANCE; every layer must be held by one rank."""
    state = {k: v for r in ranks for k, v in r["state"].items()}
    missing = sorted(set(ref["state"]) - set(state))
    loss_rel = max(
        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ranks[-1]["losses"], ref["losses"])
    )
    param_abs = max(
        (float((state[k] - v).abs().max()) for k, v in ref["state"].items() if k in state),
        default=0.0,
    )
    equal = all(torch.equal(state[k], v) for k, v in ref["state"].items() if k in state)
    equal = equal and ranks[-1]["losses"] == ref["losses"]
    within = loss_rel <= TOLERANCE["loss_rel"] and param_abs <= TOLERANCE["param_abs"]
    return {
        "ok": not missing and (equal if exact else within),
        "bit_exact": equal,
        "max_loss_rel_diff": loss_rel,
        "max_param_abs_diff": param_abs,
        "missing_layers": missing,
        "losses": ranks[-1]["losses"],
        "partition": ranks[0]["bounds"],
        "events": [e for r in ranks for e in r["events"]],
        "data_backend": ranks[0]["data_backend"],
        "wire_device": [r["wire_device"] for r in ranks],
        "devices": [r["device"] for r in ranks],
    }


def run_pipeline(devices: list[str], move: bool, ref: dict[str, Any], exact: bool) -> Any:
    """``pipeline_job`` on ``len(devices)`` fresh ranks, compared with ``ref``."""
    from adaptive_pp.runtime.launch import WorkerPool

    t0 = time.perf_counter()
    with WorkerPool(len(devices)) as pool:
        ranks = pool.run(pipeline_job, devices, move, timeout=240)
    out = compare(ranks, ref, exact)
    if move:
        out["ok"] = out["ok"] and any(e.startswith("moved layers") for e in out["events"])
    return out | {"seconds": time.perf_counter() - t0}


# --- the benchmark: ours against torch.distributed.pipelining on real kernels ---------------


def _ffn_model() -> nn.Sequential:
    d = BENCH["d"]
    torch.manual_seed(0)
    return nn.Sequential(
        *(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(BENCH["blocks"])
        )
    )


def bench_job(kind: str, steps: int) -> dict[str, Any]:
    """Rank job: ``steps`` timed 1F1B steps (after one warm-up) of ``kind`` ("ours" or
    "torch") on cuda:RANK; each step ends with a device synchronize."""
    import torch.distributed as dist

    rank, stages = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    m, rows, d = BENCH["microbatches"], BENCH["rows"], BENCH["d"]
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(m * rows, d, generator=g), torch.randn(m * rows, d, generator=g)
    model = _ffn_model()
    per = BENCH["blocks"] // stages
    step: Callable[[int], Any]
    if kind == "ours":
        from adaptive_pp import Pipeline, PipelineConfig

        cfg = PipelineConfig(microbatches=m, device=str(device))
        pipe = Pipeline(model, nn.functional.mse_loss, _adam, cfg)
        xd, yd = x.to(device), y.to(device)

        def step(_: int) -> Any:
            loss = pipe.step(xd, yd).loss
            torch.cuda.synchronize(device)
            return loss

        done: Callable[[], None] = pipe.close
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        from experiments.peer import torch_step

        group = dist.new_group(backend="nccl")
        sub = model[rank * per : (rank + 1) * per].to(device)
        stage = PipelineStage(sub, rank, stages, device, group=group)
        sched = Schedule1F1B(stage, m, loss_fn=nn.functional.mse_loss)
        opt = _adam(sub.parameters())
        xd, yd = x.to(device), y.to(device)

        def step(_: int) -> Any:
            torch_step(sched, opt, xd, yd, rank, stages)
            torch.cuda.synchronize(device)

        def done() -> None:
            dist.destroy_process_group(group)

    timed = timed_steps(step, steps, warmup=1)
    done()
    return {"walls": timed.walls}


def run_benchmark(gpus: int) -> dict[str, Any]:
    """Ours and torch's on min(gpus, 4) GPUs, alternating, in one pool; the ratio."""
    from adaptive_pp.runtime.launch import WorkerPool

    stages = min(gpus, 4)
    walls: dict[str, list[float]] = {"ours": [], "torch": []}
    with WorkerPool(stages) as pool:
        for rnd in range(BENCH["rounds"]):
            for kind in ("ours", "torch") if rnd % 2 == 0 else ("torch", "ours"):
                walls[kind] += pool.run(bench_job, kind, BENCH["steps"], timeout=300)[0]["walls"]
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "ok": True,
        "setup": {**BENCH, "stages": stages, "schedule": "1f1b", "dtype": "float32"},
        "median_step_s": med,
        "ours_over_torch": med["ours"] / med["torch"],
        "walls": walls,
    }


def main() -> None:
    """Run every part this machine can run; write the JSON; exit 1 if a part that ran failed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="folder for gpu_check.json")
    p.add_argument("--gpus", type=int, default=None, help="use at most this many GPUs")
    ns = p.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = gpus if ns.gpus is None else min(gpus, ns.gpus)
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    out: dict[str, Any] = {"environment": environment(), "gpus": gpus, "gpu_names": names}
    out |= {"tolerance": TOLERANCE, "ran": {}, "not_run": {}}
    ref = reference("cpu")
    cpu, one, two = ["cpu", "cpu"], ["cuda:0", "cuda:0"], ["cuda:0", "cuda:1"]
    parts: dict[str, tuple[int, Callable[[], dict[str, Any]]]] = {
        "cpu_pipeline": (0, lambda: run_pipeline(cpu, True, ref, exact=True)),
        "gpu_single_stage": (1, lambda: run_pipeline(["cuda:0"], False, ref, exact=False)),
        "gpu_shared_two_ranks": (1, lambda: run_pipeline(one, True, ref, exact=False)),
        "gpu_nccl": (2, lambda: run_pipeline(two, True, ref, exact=False)),
        "benchmark": (2, lambda: run_benchmark(gpus)),
    }
    for name, (need, run) in parts.items():
        if gpus < need:
            why = "no CUDA device" if gpus == 0 else f"needs {need} GPUs, {gpus} in use"
            out["not_run"][name] = why
            print(f"{name}: not run ({why})", flush=True)
            continue
        try:
            out["ran"][name] = result = run()
        except Exception as exc:  # one part's failure is a result too; the others still run
            out["ran"][name] = result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {'ok' if result['ok'] else 'FAILED'} {_summary(result)}", flush=True)
    out["ok"] = all(r["ok"] for r in out["ran"].values())
    print(f"wrote {write_json('gpu_check', out, ns.out)}")
    if not out["ok"]:
        raise SystemExit(1)


def _summary(result: dict[str, Any]) -> str:
    if "ours_over_torch" in result:
        return f"ours/torch {result['ours_over_torch']:.3f}"
    if "error" in result:
        return str(result["error"])
    return (
        f"({result['data_backend']} data groups, bit-exact {result['bit_exact']}, "
        f"max loss rel diff {result['max_loss_rel_diff']:.2e})"
    )


if __name__ == "__main__":
    main()
