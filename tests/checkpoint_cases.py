"""Rank jobs for tests/test_checkpoint.py (importable by spawned ranks)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig

WIDTH, BOUNDS = 64, (0, 2, 4, 6, 8)  # 8 layers on 4 stages: stage 2 holds layers 4 and 5


def mlp(kind: str = "saved") -> nn.Sequential:
    """8 x (Linear(64, 64), Tanh), or a model that differs from it.

    "width": layers 4-5 (all of stage 2) go 64 -> 32 -> 64, the stage's in/out widths kept;
    "bias": layer 5 has no bias; "other": 8 x Linear(32, 32), nothing fits.
    """
    torch.manual_seed(0)
    width = 32 if kind == "other" else WIDTH
    dims = [(width, width)] * 8
    if kind == "width":
        dims[4], dims[5] = (WIDTH, 32), (32, WIDTH)
    layers = [
        nn.Linear(a, b, bias=not (kind == "bias" and i == 5)) for i, (a, b) in enumerate(dims)
    ]
    return nn.Sequential(*(nn.Sequential(layer, nn.Tanh()) for layer in layers))


def batches(kind: str = "saved") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same two mini-batches on every rank, for ``mlp(kind)``."""
    width = 32 if kind == "other" else WIDTH
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, width, generator=g), torch.randn(4, width, generator=g)) for _ in "ab"]


def adam(params: Any) -> torch.optim.Optimizer:
    """Per-parameter tensors and a scalar step in its state."""
    return torch.optim.Adam(params, lr=1e-2)


def pipeline(model: nn.Sequential) -> Pipeline:
    """Adam, M=2, BOUNDS."""
    return Pipeline(
        model, nn.functional.mse_loss, adam, PipelineConfig(microbatches=2, partition=BOUNDS)
    )


def state(pipe: Pipeline) -> dict[str, Any]:
    """This rank's parameters, optimizer state (both copied) and step count."""
    return {
        "params": {
            k: {n: t.clone() for n, t in sd.items()} for k, sd in pipe.local_state().items()
        },
        "optimizer": copy.deepcopy(pipe.optimizer.state_dict()) if pipe.optimizer else None,
        "step_count": pipe.step_count,
    }


def save(path: str) -> dict[str, Any]:
    """Rank job: train the saved model two steps, checkpoint it to ``path``."""
    with pipeline(mlp()) as pipe:
        for x, y in batches():
            pipe.step(x, y)
        pipe.save_checkpoint(path)
        return state(pipe)


def try_loads(probes: list[tuple[str, str]], then_load: str | None = None) -> dict[str, Any]:
    """Rank job: per probe ``(model kind, checkpoint)``: one step, a load, one more step.

    The loads are expected to fail. Per model kind: the load's error, the state before and
    after it, the next step's loss and the final state; with ``then_load``, the pipeline then
    loads that checkpoint too, and "reloaded" is its state after that.
    """
    out: dict[str, Any] = {}
    for kind, ck in probes:
        (x0, y0), (x1, y1) = batches(kind)
        with pipeline(mlp(kind)) as pipe:
            pipe.step(x0, y0)
            before = state(pipe)
            error = None
            try:
                pipe.load_checkpoint(ck)
            except Exception as exc:
                error = (type(exc).__name__, str(exc))
            after = state(pipe)
            loss = pipe.step(x1, y1).loss
            out[kind] = {"error": error, "before": before, "after": after, "loss": loss}
            out[kind]["final"] = state(pipe)
            if then_load is not None:
                pipe.load_checkpoint(then_load)
                out[kind]["reloaded"] = state(pipe)
    return out


def reference(kind: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``mlp(kind)`` trained on ``batches(kind)`` in one process, as the pipeline splits them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the stage processes: same kernels, same bits
    try:
        model = mlp(kind)
        opt = adam(model.parameters())
        losses = []
        for x, y in batches(kind):
            total = 0.0
            for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
                loss = nn.functional.mse_loss(model(xm), ym)
                total += float(loss.detach())
                (loss / 2).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / 2)
        return losses, model.state_dict()
    finally:
        torch.set_num_threads(threads)


EXPORT_WIDTHS = (6, 8, 5, 7, 6, 4)


def export_blocks(seed: int) -> list[nn.Module]:
    """Five (Linear, Tanh) blocks of mixed widths, seeded."""
    torch.manual_seed(seed)
    w = EXPORT_WIDTHS
    return [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(w, w[1:], strict=False)]


def train_for_export(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """Rank job (3 ranks): export_blocks with a ``pre`` and a ``post`` Linear, 3 Adam steps,
    saved to ``path``. This rank's parameters."""
    cfg = PipelineConfig(microbatches=2, partition=(0, 2, 3, 5))
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)) for _ in range(3)]
    blocks = export_blocks(5)
    pre, post = nn.Linear(6, 6), nn.Linear(4, 4)
    with Pipeline(blocks, nn.functional.mse_loss, adam, cfg, pre=pre, post=post) as pipe:
        for x, y in data:
            pipe.step(x, y)
        pipe.save_checkpoint(path)
        params: dict[str, dict[str, torch.Tensor]] = state(pipe)["params"]
        return params
