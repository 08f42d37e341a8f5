"""Stage-process jobs of the failure tests: loops that catch a failed step and go on, a
poisoned pipeline and its recovery, frozen and slow stages, a Pipeline made twice."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import runtime_cases as rc
import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import MoveLayers

# 4 stages of 2 x Linear(64, 64) (+ an activation), M = 4, Adam.
CASE = rc.Case(
    seed=3,
    widths=(64,) * 9,
    bounds=(0, 2, 4, 6, 8),
    microbatches=4,
    schedule="1f1b",
    optimizer="adam",
    steps=6,
)
AT = 2  # the step that fails


def _pipeline(model: nn.Sequential, case: rc.Case = CASE, **cfg: Any) -> Pipeline:
    config = PipelineConfig(
        microbatches=case.microbatches, schedule=case.schedule, partition=case.bounds, **cfg
    )
    return Pipeline(model, nn.functional.mse_loss, lambda p: rc.make_optimizer(case, p), config)


def _error(step: int, exc: BaseException) -> dict[str, Any]:
    return {
        "step": step,
        "kind": type(exc).__name__,
        "message": str(exc),
        "undone": getattr(exc, "undone", None),
        "remote": getattr(exc, "remote", None),
        "value_error": isinstance(exc, ValueError),
    }


def _faulty(x: torch.Tensor, y: torch.Tensor, fault: str, pipe: Pipeline) -> tuple[Any, Any]:
    """The batch of the failing step as each rank passes it."""
    if fault == "bad_batch" and pipe.stage == 0:
        return x[:-1], y  # stage 0's batch does not split into M; the others' do
    if fault == "no_targets" and pipe.is_last:
        return x, None
    if fault == "nan":
        y = y.clone()
        y[-1, 0] = float("nan")  # the loss of the last micro-batch is NaN
    return x, y


def job_catch_and_continue(fault: str, case: rc.Case = CASE) -> dict[str, Any]:
    """``try: pipe.step(x, y) except Exception: continue`` with one failing step at AT."""
    pipe = _pipeline(rc.build_model(case), case)

    def batch(k: int, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
        return _faulty(x, y, fault, pipe) if k == AT else (x, y)

    return _train_catching(pipe, case, batch)


def _train_catching(
    pipe: Pipeline,
    case: rc.Case,
    batch: Callable[[int, torch.Tensor, torch.Tensor], tuple[Any, Any]],
) -> dict[str, Any]:
    """Train on every batch, catching each step's error (the user's loop); then close."""
    losses, errors = [], []
    for k, (x, y) in enumerate(rc.batches(case)):
        try:
            losses.append(pipe.step(*batch(k, x, y)).loss)
        except Exception as exc:
            errors.append(_error(k, exc))
    result = {"losses": losses, "errors": errors, **rc.snapshot(pipe)}
    pipe.close()
    return result


def _fail_backward_once(layer: nn.Module, call: int) -> None:
    """Make the backward through ``layer``'s output raise after its ``call``-th forward."""
    seen = {"calls": 0}

    def boom(_grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected backward failure")

    def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        seen["calls"] += 1
        if seen["calls"] == call:
            out.register_hook(boom)

    layer.register_forward_hook(hook)


def job_poisoned_then_reload(path: str) -> dict[str, Any]:
    """Stage 1's backward of the last micro-batch fails at step AT: the stages below have
    stepped their optimizers, so the pipeline is poisoned; step AT+1 must refuse; loading
    the checkpoint saved before AT heals it and training goes on (batches AT, AT+1 skipped).
    """
    case = CASE
    model = rc.build_model(case)
    _fail_backward_once(model[3], AT * case.microbatches + case.microbatches)
    pipe = _pipeline(model)

    def batch(k: int, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
        if k == AT:
            pipe.save_checkpoint(path)
        if k == AT + 2:
            pipe.load_checkpoint(path)
        return x, y

    return _train_catching(pipe, case, batch)


def job_frozen(folder: str, recv_timeout: float = 300.0) -> None:
    """Default settings; stage 2 stops itself (SIGSTOP) in its 2nd step's forward (and writes
    when to FOLDER/frozen). The others write what they raised, and when, to FOLDER/rank-R."""
    model = rc.build_model(CASE)

    def freeze(_mod: nn.Module, _inp: Any, _out: Any) -> None:
        freeze.calls += 1  # type: ignore[attr-defined]
        if freeze.calls == CASE.microbatches + 2:  # type: ignore[attr-defined]
            with open(os.path.join(folder, "frozen"), "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)

    freeze.calls = 0  # type: ignore[attr-defined]
    model[4].register_forward_hook(freeze)
    pipe = _pipeline(model, recv_timeout=recv_timeout)
    out: dict[str, Any] = {"kind": "none"}
    try:
        for x, y in rc.batches(CASE):
            pipe.step(x, y)
    except Exception as exc:
        out = {**_error(-1, exc), "at": time.time()}
    with open(os.path.join(folder, f"rank-{pipe.stage}"), "w") as f:
        json.dump(out, f)


def job_slow(timeout: float, seconds: float) -> dict[str, Any]:
    """Stage 1 computes for ``seconds`` (real kernels, not a sleep) in one forward of step 1,
    longer than the heartbeat timeout: nobody may call it frozen; training stays exact."""
    case = rc.Case(**{**CASE.__dict__, "steps": 3})
    model = rc.build_model(case)

    def busy(_mod: nn.Module, _inp: Any, _out: Any) -> None:
        busy.calls += 1  # type: ignore[attr-defined]
        if busy.calls == case.microbatches + 1:  # type: ignore[attr-defined]
            a = torch.randn(256, 256)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                a = torch.tanh(a @ a)

    busy.calls = 0  # type: ignore[attr-defined]
    model[2].register_forward_hook(busy)
    pipe = _pipeline(model, case, heartbeat_timeout=timeout, heartbeat_interval=timeout / 4)
    losses = [pipe.step(x, y).loss for x, y in rc.batches(case)]
    result = {"losses": losses, **rc.snapshot(pipe)}
    pipe.close()
    return result


def job_twice() -> list[float]:
    """The same model trained by one Pipeline, closed, then by a second one: same losses."""
    losses = []
    for _ in range(2):
        case = rc.Case(**{**CASE.__dict__, "steps": 2})
        pipe = _pipeline(rc.build_model(case), case)
        losses += [pipe.step(x, y).loss for x, y in rc.batches(case)]
        pipe.close()
    return losses


def job_disagree() -> dict[str, Any]:
    """Rank 0 is asked for another move than the others: every rank refuses, none moves."""
    pipe = _pipeline(rc.build_model(CASE))
    move = MoveLayers(1, 0, 1) if pipe.stage == 0 else MoveLayers(2, 1, 1)
    try:
        pipe.apply(move)
        out: dict[str, Any] = {"kind": "none"}
    except Exception as exc:
        out = {**_error(0, exc), "stage": getattr(exc, "stage", None)}
    out["bounds"] = pipe.partition.bounds
    x, y = rc.batches(CASE)[0]
    out["loss"] = pipe.step(x, y).loss  # still usable
    pipe.close()
    return out
