"""Rank jobs of tests/test_schedule_switch.py (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any

import runtime_cases as rc
import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import Decision, SetSchedule
from adaptive_pp.emulation.kernels import emulated_mlp
from adaptive_pp.runtime.checkpoint import read_meta
from controllers import AdaptivePolicy


def switch_refuse_checkpoint(
    case: rc.Case, script: dict[int, Decision], path: str
) -> dict[str, Any]:
    """Rank job: train ``case`` with a Scripted controller (``script``: decision after step k),
    then ask for schedules the runtime cannot switch to, then checkpoint.

    Returns what train_pipelined does, plus each step's schedule, the refusals, the schedule
    after them and the checkpoint's recorded schedule.
    """
    pipe = rc.case_pipeline(case, controller=rc.Scripted(script))
    losses, events, schedules = [], [], []
    for x, y in rc.batches(case):
        out = pipe.step(x, y)
        losses.append(out.loss)
        events += list(out.report.events)
        schedules.append(out.report.schedule)
    refusals = []
    for name in ("interleaved-1f1b", "zb-h9"):
        try:
            pipe.apply(SetSchedule(name))
        except ValueError as exc:
            refusals.append(str(exc))
    after = pipe.plan.schedule
    pipe.save_checkpoint(path)
    result = {
        "losses": losses,
        "events": events,
        "schedules": schedules,
        "refusals": refusals,
        "after": after,
        "saved": read_meta(path)["schedule"],
        **rc.snapshot(pipe),
    }
    pipe.close()
    return result


def refused_switch(case: rc.Case, name: str) -> dict[str, Any]:
    """Rank job: step 0, ask to switch to ``name`` (refused: the error text), the other steps."""
    pipe = rc.case_pipeline(case)
    data = rc.batches(case)
    losses = [pipe.step(*data[0]).loss]
    refused = ""
    try:
        pipe.apply(SetSchedule(name))
    except ValueError as exc:
        refused = str(exc)
    losses += [pipe.step(x, y).loss for x, y in data[1:]]
    result = {
        "losses": losses,
        "refused": refused,
        "after": pipe.plan.schedule,
        **rc.snapshot(pipe),
    }
    pipe.close()
    return result


def adaptive_emulated(steps: int) -> dict[str, Any]:
    """Rank job: 4 emulated layers (2 ms forward, 4.8 ms backward) on 2 stages, M = 2, 1F1B,
    under the default AdaptivePolicy; returns each step's schedule and partition, and the
    events."""
    torch.manual_seed(0)
    model = emulated_mlp(4, 8, 2e-3, 4.8e-3)
    cfg = PipelineConfig(microbatches=2, partition=(0, 2, 4))
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    schedules, partitions, events = [], [], []
    with Pipeline(
        model,
        nn.functional.mse_loss,
        lambda p: torch.optim.SGD(p, lr=0.01),
        cfg,
        controller=AdaptivePolicy(),
    ) as pipe:
        for _ in range(steps):
            report = pipe.step(x, y).report
            schedules.append(report.schedule)
            partitions.append(report.partition)
            events += list(report.events)
    return {"schedules": schedules, "partitions": partitions, "events": events}
