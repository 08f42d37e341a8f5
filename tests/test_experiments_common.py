"""experiments.common helpers that need no processes: a peer's timelines as a StepReport."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adaptive_pp.core.analysis import hop_latencies, replay_measured  # noqa: E402
from adaptive_pp.core.schedules import make_schedule  # noqa: E402
from adaptive_pp.core.simulator import Costs, simulate  # noqa: E402
from experiments.common import timeline_report  # noqa: E402

MS = 1e-3


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_timeline_report_reads_a_peer_step_like_ours(name: str) -> None:
    """Per-rank (kind, micro-batch, start, end) records of a simulated step give back its
    timeline, step time, compute per stage and hop latency (no queue traces needed)."""
    costs = Costs.build(
        3, 4, [[x * MS for x in (1.0, 1.4, 0.8, 1.2)], 1.1 * MS, 0.9 * MS], 2.0 * MS, 0.25 * MS
    )
    sim = simulate(make_schedule(name, 3, 4), costs, step=7)
    per_rank = [
        [(t.kind, t.microbatch, t.start, t.end) for t in sim.timeline.stage(s)] for s in range(3)
    ]
    rep = timeline_report(per_rank, name, 4, step=7)
    assert rep.step == 7 and rep.schedule == name and rep.microbatches == 4
    assert list(rep.timeline) == list(sim.timeline)
    assert rep.step_time == pytest.approx(sim.step_time)
    assert [s.compute for s in rep.stages] == pytest.approx([s.compute for s in sim.stages])
    assert hop_latencies(rep) == pytest.approx([0.25 * MS, 0.25 * MS])
    assert replay_measured(rep).step_time == pytest.approx(sim.step_time)
