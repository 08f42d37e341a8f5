"""Serving with one real process per stage: equality, a killed stage named within seconds, CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("grpc")
pytest.importorskip("torch")

from adaptive_pp.cli import main
from adaptive_pp.serving.client import PipelineClient, StageError
from adaptive_pp.serving.launch import StageProcesses, launch_stages
from adaptive_pp.serving.manifest import load_manifest, load_reference

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    args = ["export", "-o", str(out), "--partition", "0,3,6", "--seed", "3"]
    assert main([*args, "--model", "tests.test_serve_processes:small_mlp"]) == 0
    return out


def small_mlp() -> list[object]:
    from adaptive_pp.serving.export import demo_mlp

    return list(demo_mlp(width=32, layers=6))


@pytest.fixture
def stages(export_dir: Path) -> Iterator[StageProcesses]:
    with launch_stages(export_dir, timeout=60) as procs:
        yield procs


def test_processes_serve_what_pytorch_computes_and_a_killed_stage_is_named(
    export_dir: Path, stages: StageProcesses
) -> None:
    man = load_manifest(export_dir)
    x, y = load_reference(export_dir)
    with PipelineClient(stages.addresses, partition=man.partition, timeout=5.0) as client:
        assert [h["stage"] for h in client.wait_ready(10)] == [0, 1]
        for m in (1, 4, len(x)):
            out = client.infer(x, m).output
            np.testing.assert_allclose(out, y, rtol=man.rtol, atol=man.atol)
        stages.kill(1)
        t0 = time.monotonic()
        with pytest.raises(StageError, match=r"stage 1 \(127\.0\.0\.1:\d+\) is unreachable") as e:
            client.infer(x, 4)
        assert e.value.stage == 1 and time.monotonic() - t0 < 5
        stages.kill(0)
        t0 = time.monotonic()
        with pytest.raises(StageError, match=r"stage 0 \(127\.0\.0\.1:\d+\) is unreachable") as e:
            client.infer(x, 4)
        assert e.value.stage == 0 and time.monotonic() - t0 < 5


def test_cli_infer_starts_the_stages_tunes_m_and_writes_a_run_dir(
    export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = [
        "infer",
        str(export_dir),
        "-B",
        "16",
        "--tune",
        "--candidates",
        "1,4",
        "--requests",
        "3",
    ]
    assert main([*args, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "served output equals PyTorch's on the reference batch" in out
    assert "chosen M=" in out and "binds:" in out
    summary = json.loads((run / "serve.json").read_text())
    assert [r["microbatches"] for r in summary["rows"]] == [1, 4]
    assert summary["choice"]["microbatches"] in (1, 4)
    assert len((run / "reports.jsonl").read_text().splitlines()) == 6


def test_bench_serve_quick_writes_rows_choice_and_ratio(tmp_path: Path) -> None:
    from experiments import bench_serve

    data = bench_serve.main(["--quick", "--out", str(tmp_path)])
    assert [r["microbatches"] for r in data["rows"]] == bench_serve.QUICK["candidates"]
    assert data["choice"]["binds"] in ("none", "latency", "bubble", "both")
    assert data["ratio_throughput_vs_plain"] > 0 and "2-core CPU" in data["note"]
    saved = json.loads((tmp_path / "serve_bench.json").read_text())
    assert saved["choice"] == data["choice"] and Path(data["figures"][0]).is_file()
    assert (tmp_path / "run" / "reports.jsonl").is_file()
