"""Smoke tests: the PipeDream-2BW benchmark and convergence study run in quick mode (2 stage
processes) and write sane outputs. No timing assertions."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import PoolFor, lend_pools

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # spawned stage processes inherit sys.path
    sys.path.insert(0, str(ROOT))

from experiments import bench_2bw, exp_2bw  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.fixture(autouse=True)
def session_pools(pools: PoolFor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both quick runs on the session's pool of 2 stage processes."""
    lend_pools(pools, monkeypatch)


def test_bench_2bw_quick_writes_ratio_simulator_and_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADAPTIVE_PP_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_2bw", "--quick"])
    bench_2bw.main()
    assert "EMULATED" in capsys.readouterr().out
    data = json.loads((tmp_path / "bench_2bw" / "bench_2bw.json").read_text())
    assert {"setup", "median_step_s", "ratio", "target", "simulator", "flush_median_s"} <= set(data)
    assert data["kernels"] == "EMULATED"
    assert set(data["median_step_s"]) == set(bench_2bw.SCHEDULES)
    assert all(v > 0 for v in data["median_step_s"].values())
    assert math.isfinite(data["ratio"]) and data["ratio"] > 0
    assert set(data["ratios"]) == {"2bw", "2bw-lead2"} and data["ratios"]["2bw"] == data["ratio"]
    assert data["flush_median_s"] > 0 and data["flush_steps"] > 0
    sim = data["simulator"]
    s, m = data["setup"]["stages"], data["setup"]["microbatches"]
    assert sim["ratio_stream"] == pytest.approx(m / (m + s - 1))  # equal stages: no bubble
    assert sim["ratio_stream"] < sim["ratio_synced_window"] < 1
    assert sim["with_hop_2bw_lead2_s"] < sim["with_hop_2bw_s"]  # lead 2 hides the hops


def test_synced_window_model_on_the_benchmark_setup() -> None:
    # S = 4, M = 16, F = 4 ms, B = 8 ms: every rank starts together, so stage 3 waits 3 F.
    assert bench_2bw.synced_window_s(4, 16, 4.0, 8.0) == pytest.approx(16 * 12 + 3 * 4)
    assert bench_2bw.synced_window_s(2, 1, 1.0, 2.0) == pytest.approx(4.0)


def test_exp_2bw_quick_writes_decreasing_curves_and_png(tmp_path: Path) -> None:
    figs = tmp_path / "figures"
    out = exp_2bw.main(["--quick", "--out", str(tmp_path), "--figures", str(figs)])
    data = json.loads((tmp_path / "exp_2bw.json").read_text())
    assert {"setup", "curves", "gaps", "figures", "environment"} <= set(data)
    assert out["gaps"] == data["gaps"]
    steps = data["setup"]["steps"]
    for opt in exp_2bw.OPTIMIZERS:
        for schedule in exp_2bw.SCHEDULES:
            curve = data["curves"][opt][schedule]
            assert len(curve) == steps and all(math.isfinite(x) for x in curve)
            assert sum(curve[-5:]) / 5 < curve[0]  # it learns
        gap = data["gaps"][opt]
        assert gap["first_step_equal"] is True  # both start on W(0) with the same batch
        assert math.isfinite(gap["last_ratio"]) and gap["last_ratio"] > 0
        assert all(0 < x < data["curves"][opt]["1f1b"][0] for x in gap["full_loss"].values())
    pngs = [Path(p) for p in data["figures"] + data["copies"]]
    assert [p.parent for p in pngs] == [tmp_path, figs]
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 10_000 for p in pngs)
