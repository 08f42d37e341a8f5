"""experiments/gpu_check.py on this machine: what ran, and what did not and why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_gpu_check_runs_the_cpu_path_and_says_what_it_could_not_run(tmp_path: Path) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # At most one GPU: the smoke test stays quick (the benchmark needs two).
    subprocess.run(
        [sys.executable, "-m", "experiments.gpu_check", "--out", str(tmp_path), "--gpus", "1"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["gpus"] == min(gpus, 1) and out["ok"]
    cpu = out["ran"]["cpu_pipeline"]
    assert cpu["ok"] and cpu["bit_exact"] and cpu["data_backend"] == "gloo"
    assert cpu["partition"] == [0, 4, 6]  # the live move happened
    assert any(e.startswith("moved layers 3-3 from stage 1 to stage 0") for e in cpu["events"])
    # Never run here: NCCL and the benchmark need two GPUs.
    for part in ("gpu_nccl", "benchmark"):
        assert part not in out["ran"]
        assert out["not_run"][part] in ("no CUDA device", "needs 2 GPUs, 1 in use")
    gpu_parts = ("gpu_single_stage", "gpu_shared_two_ranks")
    if gpus == 0:
        assert all(out["not_run"][p] == "no CUDA device" for p in gpu_parts)
    else:
        assert all(out["ran"][p]["ok"] for p in gpu_parts)
        assert out["ran"]["gpu_shared_two_ranks"]["data_backend"] == "gloo"
