"""experiments.common helpers that need no processes: the timed-step loop of the rank jobs, and
a peer's timelines as a StepReport."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adaptive_pp.core.analysis import hop_latencies, replay_measured  # noqa: E402
from adaptive_pp.core.schedules import make_schedule  # noqa: E402
from adaptive_pp.core.simulator import Costs, simulate  # noqa: E402
from experiments.common import timed_steps  # noqa: E402
from experiments.peer import posting_ms, timeline_report  # noqa: E402

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


def test_timeline_report_keeps_chunks_and_leaves_posting_out() -> None:
    """Interleaved records carry their chunk (a fifth field) into the actions; torch's posting
    records ("P") stay out of the timeline and the compute, and ``posting_ms`` gives their time
    per action, per rank and step past the warm-up (median)."""
    sim = simulate(make_schedule("interleaved-1f1b", 2, 2, 2), Costs.build(2, 2, MS, 2 * MS))
    per_rank = []
    for s in range(2):
        recs: list[tuple[str, int, float, float, int]] = []
        for t in sim.timeline.stage(s):
            recs.append((t.kind, t.microbatch, t.start, t.end, t.chunk))
            recs.append(("P", -1, t.end, t.end + 0.1 * MS * (s + 1), 0))
        per_rank.append(recs)
    rep = timeline_report(per_rank, "interleaved-1f1b", 2)
    assert list(rep.timeline) == list(sim.timeline)
    assert {t.chunk for t in rep.timeline} == {0, 1}
    assert rep.step_time == pytest.approx(sim.step_time)
    assert [s.compute for s in rep.stages] == pytest.approx([s.compute for s in sim.stages])
    warm = [("F", 0, 0.0, 1.0, 0), ("P", -1, 1.0, 2.0, 0)]  # the warm-up step: left out
    ranks = [{"timeline": [warm, recs]} for recs in per_rank]
    assert posting_ms(ranks) == pytest.approx(0.15)  # ranks post 0.1 and 0.2 ms per action
    assert posting_ms([{"walls": [], "reports": []}]) != posting_ms(ranks)  # ours: nan


def test_timed_steps_times_each_step_after_its_barrier_and_drops_the_warm_up() -> None:
    """Hooks see every step k (warm-up included) in order around the barrier; only the last
    ``steps`` steps come back, one wall each, and a wall is the step's time alone."""
    log: list[str] = []
    naps = {0: 0.03, 1: 0.0, 2: 0.02, 3: 0.0, 4: 0.01}

    def step(k: int) -> str:
        log.append(f"step {k}")
        time.sleep(naps[k])
        return f"out {k}"

    def before(k: int) -> None:
        log.append(f"before {k}")
        time.sleep(0.05)  # untimed

    timed = timed_steps(
        step,
        3,
        warmup=2,
        before_step=before,
        after_step=lambda k, out: log.append(f"after {k} {out}"),
        barrier=lambda: log.append("barrier"),
    )
    assert log == [
        e for k in range(5) for e in (f"before {k}", "barrier", f"step {k}", f"after {k} out {k}")
    ]
    assert timed.outputs == ["out 2", "out 3", "out 4"]
    assert len(timed.walls) == len(timed.starts) == 3
    # Walls are the steps' naps (2: 20 ms, 3: none, 4: 10 ms), never before_step's 50 ms.
    assert timed.walls[0] >= 0.02 and timed.walls[2] >= 0.01
    assert max(timed.walls) < 0.05 and timed.walls[1] < 0.01
    assert timed.starts == sorted(timed.starts)
    assert timed.starts[1] - timed.starts[0] >= timed.walls[0] + 0.05  # step 3's before ran


def test_timed_steps_without_warm_up_keeps_every_step() -> None:
    timed = timed_steps(lambda k: k * k, 4, barrier=lambda: None)
    assert timed.outputs == [0, 1, 4, 9] and len(timed.walls) == 4
    assert all(w >= 0 for w in timed.walls)
