"""PipeDream-2BW steps that do not wait for their peers at the end: the loss is posted by the
last stage after its last forward, each rank's report share is posted without waiting and the
report is merged when read, the loss taken when read. No timing assertions: the last stage
holds its last forward until rank 0 has returned, which only a step that waits neither for the
last stage's end of window nor for its loss can do."""

from __future__ import annotations

from pathlib import Path

import pytest
import runtime_cases as rc
import twobw_cases as tc
import twobw_late_cases as lc
from conftest import PoolFor

from adaptive_pp.core.schedules import make_schedule


@pytest.mark.multiprocess
@pytest.mark.parametrize(("stages", "optimizer"), [(3, "adam"), (4, "sgd")])
def test_rank_0_returns_while_the_last_stage_holds_its_last_forward(
    pools: PoolFor, tmp_path: Path, stages: int, optimizer: str
) -> None:
    """Rank 0 returns step 1 while the last stage has yet to run that step's last forward (so
    before the step's loss exists); the losses and reports, read after the drain, are each
    step's, in order, the same on every rank; training is still the update rule, bit for
    bit."""
    layers = 2 * stages
    widths = (5, 4, 6, 3, 5, 4, 3, 2, 4)[: layers + 1]
    case = rc.Case(17, widths, tuple(range(0, layers + 1, 2)), 4, "2bw", optimizer, 4)
    gate = str(tmp_path / "rank0-returned")
    ranks = pools(stages).run(lc.train_with_held_forward, case, gate, 1, timeout=120)
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case))
    steady = [str(a) for a in make_schedule("2bw", stages, 4).stages[-1]]
    for r in ranks:
        assert r["report_steps"] == list(range(case.steps))
        assert r["report_losses"] == r["losses"]
        assert r["last_actions"][1:] == [steady] * (case.steps - 1)
