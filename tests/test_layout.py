"""The layout shows the design: the core and the controllers never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [ROOT / "adaptive_pp" / "core", ROOT / "controllers"]


def torch_imports(path: Path) -> list[str]:
    """Every import of torch (at any depth, lazy ones too) in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "torch"]
    return found


@pytest.mark.parametrize("folder", PURE, ids=lambda p: p.name)
def test_pure_packages_have_no_torch_import(folder: Path) -> None:
    files = sorted(folder.glob("*.py"))
    assert files
    assert [hit for f in files for hit in torch_imports(f)] == []


def test_torch_import_is_found(tmp_path: Path) -> None:
    """The check above can fail: a lazy import inside a function counts."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from torch import nn\n    import torch.distributed\n")
    assert torch_imports(src) == ["m.py:2 torch", "m.py:3 torch.distributed"]


def test_importing_the_core_loads_no_torch() -> None:
    """At run time too: the package, its public core paths and the controllers."""
    code = (
        "import sys, adaptive_pp, adaptive_pp.decisions, adaptive_pp.simulator, controllers\n"
        "import adaptive_pp.core.analysis, adaptive_pp.core.errors\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_public_module_paths_are_the_core_modules() -> None:
    import adaptive_pp.core.decisions
    import adaptive_pp.decisions

    assert adaptive_pp.decisions is adaptive_pp.core.decisions
