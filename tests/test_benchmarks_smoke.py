"""Smoke test: the README's benchmark commands run in quick mode and write what they print."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # spawned stage processes inherit sys.path
    sys.path.insert(0, str(ROOT))

from experiments import bench_adaptive, bench_runtime  # noqa: E402

pytestmark = pytest.mark.multiprocess


def _run(
    main: Callable[[], None], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """``python -m experiments.NAME --quick``, its results under ``tmp_path``; its JSON."""
    monkeypatch.setenv("ADAPTIVE_PP_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [name, "--quick"])
    main()
    data: dict[str, Any] = json.loads((tmp_path / name / f"{name}.json").read_text())
    return data


def test_bench_runtime_quick_writes_ratios_and_decomposition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _run(bench_runtime.main, "bench_runtime", tmp_path, monkeypatch)
    assert set(data["ratios"]) == {"1f1b", "gpipe"} and all(r > 0 for r in data["ratios"].values())
    assert set(data["decomposition"]) == set(bench_runtime.CONFIGS)
    for row in data["decomposition"].values():
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["hop_ms"] >= 0
        assert row["free_comm_step_ms"] > 0 and 0 < row["free_comm_bubble"] < 1
    for sched in ("1f1b", "gpipe"):
        sim = data["simulator"][sched]
        assert sim["predicted_from_measured_durations_s"] > sim["predicted_nominal_s"] > 0


def test_bench_adaptive_quick_moves_layers_off_the_slow_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _run(bench_adaptive.main, "bench_adaptive", tmp_path, monkeypatch)
    assert set(data["median_step_s"]) == {
        "adaptive",
        "adaptive-switch",
        "torch",
        "best",
        "torch-best",
    }
    assert data["switch_final_schedules"][0] in ("1f1b", "zb-h1")
    assert data["switch_ratio_vs_torch"] > 0
    moves = [e for run in data["events"] for step in run for e in step if e.startswith("moved")]
    assert moves, data["events"]
    assert len(data["steps_to_converge"]) == data["rounds"] == 1
    assert data["ratio_vs_torch"] > 0 and data["ratio_vs_best"] > 0
