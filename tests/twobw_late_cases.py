"""Rank jobs for tests/test_2bw_late.py: PipeDream-2BW steps that end without waiting for the
peers (the loss posted after the last stage's last forward, the report merged when read)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import runtime_cases as rc

from adaptive_pp.core.schedules import Action

GATE_WAIT_S = 30.0


def train_with_held_forward(case: rc.Case, gate: str, held: int) -> dict[str, Any]:
    """Rank job: ``case`` under 2BW, no controller. At step ``held`` the last stage holds its
    last forward (so the step's loss, and its last backward) until rank 0 has returned from
    that step (rank 0 creates the file ``gate`` then); it raises if that does not happen
    within GATE_WAIT_S. Losses and reports are read only after the drain: every step's, in
    order."""
    from adaptive_pp.runtime.stage import StageWorker

    pipe = rc.case_pipeline(case)
    act = StageWorker.act
    last_f = Action(pipe.num_stages - 1, "F", case.microbatches - 1)

    def held_act(self: StageWorker, action: Action, *args: Any, **kwargs: Any) -> Any:
        if pipe.step_count == held and pipe.is_last and action[:3] == last_f[:3]:
            deadline = time.monotonic() + GATE_WAIT_S
            while not Path(gate).exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"rank 0 did not return from step {held} while the last "
                        "stage held its last forward: it waits for its peers (or the loss)"
                    )
                time.sleep(0.01)
        return act(self, action, *args, **kwargs)

    StageWorker.act = held_act  # type: ignore[method-assign]
    try:
        outs = []
        for k, (x, y) in enumerate(rc.batches(case)):
            outs.append(pipe.step(x, y))
            if k == held and pipe.stage == 0:
                Path(gate).touch()
        pipe.flush()
    finally:
        StageWorker.act = act  # type: ignore[method-assign]
    reports = [out.report for out in outs]
    result = {
        "losses": [out.loss for out in outs],
        "report_steps": [r.step for r in reports],
        "report_losses": [r.loss for r in reports],
        "last_actions": [[str(a) for a in r.timeline.actions[-1]] for r in reports],
    }
    result.update(rc.snapshot(pipe))
    pipe.close()
    return result
