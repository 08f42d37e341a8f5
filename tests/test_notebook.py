"""The seed notebook (experiments/seed_notebook.ipynb) runs end to end in quick mode.

Every cell of the notebook checks what it shows with asserts, so executing it is the test:
nbclient raises CellExecutionError, naming the cell, if any cell raises. The kernel is this
interpreter (a kernelspec written for the test), so the notebook sees the same venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="needs the 'notebook' extra")
nbformat = pytest.importorskip("nbformat", reason="needs the 'notebook' extra")
pytest.importorskip("ipykernel", reason="needs the 'notebook' extra")
pytest.importorskip("matplotlib", reason="needs the 'notebook' extra")

pytestmark = pytest.mark.multiprocess  # the notebook spawns two stage processes

NOTEBOOK = Path(__file__).resolve().parent.parent / "experiments" / "seed_notebook.ipynb"
FIGURES = {"loss.png", "gpipe_vs_1f1b.png", "bubble_utilization.png", "stash.png", "adapt.png"}
KERNEL = "adaptive-pp-test"


def test_seed_notebook_runs_quick_and_its_checks_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "adaptive_pp test", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched first
    monkeypatch.setenv("SEED_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("SEED_NOTEBOOK_OUT", str(tmp_path / "figures"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=240,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # CellExecutionError (with the cell and its traceback) if a cell raises
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == FIGURES


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
