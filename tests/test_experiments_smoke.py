"""Smoke test: every study of the experiment suite runs in quick mode and writes its outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import PoolFor, lend_pools

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # spawned stage processes inherit sys.path
    sys.path.insert(0, str(ROOT))

from experiments import run_all  # noqa: E402

pytestmark = pytest.mark.multiprocess

KEYS = {
    "exp_bubble_table": {"setup", "table", "figures"},
    "exp_gpipe_vs_1f1b": {"setup", "training", "sweep", "smallest_m_u_above_80", "figures"},
    "exp_m_sweep": {"setup", "sweep", "stash_matches_prediction", "figures"},
    "exp_moe": {"setup", "configs", "target", "target_met", "figures"},
    "exp_transition": {"setup", "per_step", "moves", "targets_met", "figures"},
    "exp_peers": {"setup", "scenarios", "figures"},
    "exp_2bw": {"setup", "curves", "gaps", "figures"},
}
ENVIRONMENT = {"torch", "python", "platform", "cpus", "time", "adaptive_pp", "matplotlib"}


def test_every_study_runs_quick_and_writes_json_and_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pools: PoolFor
) -> None:
    lend_pools(pools, monkeypatch, run_all)  # the studies' pools: the session's
    out = run_all.main(["--quick", "--out", str(tmp_path)])
    assert set(out["results"]) == set(run_all.STUDIES) == set(KEYS)
    for name, keys in KEYS.items():
        data = json.loads((tmp_path / name / f"{name}.json").read_text())
        assert keys <= set(data), (name, keys - set(data))
        assert set(data["environment"]) >= ENVIRONMENT, name
        pngs = [Path(p) for p in data["figures"]]
        assert pngs and all(p.parent == tmp_path / name for p in pngs), name
        assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    table = out["results"]["exp_bubble_table"]["table"]
    assert table["1f1b"]["approx"] == pytest.approx(0.1875)
    assert table["gpipe"]["exact"] == pytest.approx(3 / 19)
    assert out["results"]["exp_gpipe_vs_1f1b"]["losses_identical"] is True
    assert out["results"]["exp_m_sweep"]["stash_matches_prediction"] is True
    moe = out["results"]["exp_moe"]["configs"]
    assert set(moe) == {"dense", "static", "raise-M", "repartition", "both"}
    assert max(x for x in moe["static"]["load_factor"] if x is not None) > 2.0  # skew took hold
