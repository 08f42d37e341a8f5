"""Helpers shared by the experiments: result folders and run metadata."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def results_dir(name: str) -> Path:
    """``results/NAME`` under the repo (or $ADAPTIVE_PP_RESULTS), created if missing."""
    root = Path(
        os.environ.get("ADAPTIVE_PP_RESULTS", Path(__file__).resolve().parent.parent / "results")
    )
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every result."""
    import numpy
    import torch

    import adaptive_pp

    return {
        "adaptive_pp": adaptive_pp.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` plus the environment to ``results/NAME/NAME.json``; return the path."""
    path = results_dir(name) / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path
