"""Rank jobs of tests/test_schedule_switch.py (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any

import runtime_cases as rc

from adaptive_pp.core.decisions import Decision, SetSchedule
from adaptive_pp.runtime.checkpoint import read_meta


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
