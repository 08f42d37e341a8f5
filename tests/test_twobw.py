"""PipeDream-2BW: 1F1B without a flush, two weight versions, equal to its update rule."""

from __future__ import annotations

import pytest
import runtime_cases as rc
import twobw_cases as tc
from conftest import PoolFor

from adaptive_pp.core import twobw
from adaptive_pp.core.schedules import one_f_one_b


def test_windows_and_drain_are_one_unflushed_1f1b_stream() -> None:
    """Step k's window with ids shifted by k*M, then the drain: exactly 1F1B over steps x M."""
    for s_count in range(1, 6):
        for m in range(max(1, s_count - 1), 7):
            for steps in range(1, 4):
                flat = one_f_one_b(s_count, steps * m)
                for s in range(s_count):
                    acts = []
                    for k in range(steps):
                        window = twobw.window(s_count, m, s, spill=k > 0)
                        acts += [a._replace(microbatch=a.microbatch + k * m) for a in window]
                    drain = twobw.drain(s_count, m, s)
                    acts += [a._replace(microbatch=a.microbatch + steps * m) for a in drain]
                    assert tuple(acts) == flat.stages[s]


def test_fewer_microbatches_than_stages_minus_one_are_refused() -> None:
    with pytest.raises(ValueError, match="M >= S - 1"):
        twobw.window(4, 2, 0, spill=True)


WIDTHS = (5, 4, 6, 3, 5, 4, 3, 2, 4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_2bw_equals_its_update_rule(pools: PoolFor, stages: int, optimizer: str) -> None:
    layers = 2 * stages
    case = rc.Case(7, WIDTHS[: layers + 1], tuple(range(0, layers + 1, 2)), 4, "2bw", optimizer, 4)
    ranks = pools(stages).run(tc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case))
