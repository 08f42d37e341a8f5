"""A/B: our runtime at a git ref against the working tree, side by side (EMULATED kernels).

Checks out REF into a temporary git worktree and starts two pools of 4 stage processes, one
importing the runtime from that worktree (A) and one from this checkout (B). Each round runs
every configuration on A and on B (order alternating between rounds) and torch's schedule in
the same round, so machine drift hits all three alike. Configurations:

- ``1f1b`` / ``gpipe``: bench_runtime's setup (16-layer MLP, 4 x 4 layers, M = 16, 1 ms / 2 ms);
- ``slowbest``: bench_adaptive's setup on the best partition ``0-4 | 5-9 | 10-11 | 12-15`` with
  stage 2 at 2x, against torch on the initial partition (the bound on the adaptive ratio).

Prints medians and B/A, A/torch, B/torch, then (``1f1b`` / ``gpipe``) each side's median forward
and backward action and hop latency, steadier than the step ratio for small changes; writes
results/bench_ab/bench_ab.json. Each side runs its own tree's emulated kernels: when REF's
emulated kernels (``adaptive_pp/emulation/kernels.py``, before the layout of issue #16
``adaptive_pp/emulation.py``) differ from the working tree's (e.g. REF before the windowed
kernels of 52c9fad), B/A measures the emulation too, and the benchmark says so.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from experiments.common import write_json

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6  # per bench_runtime run; the first is dropped
SLOW_STEPS = 12  # per slowbest run; the steps from 2 after the slowdown are kept
# The kernels both sides run (warned about if they differ), at their path before and after #16.
EMULATION = "adaptive_pp/emulation/kernels.py"
EMULATION_BEFORE = "adaptive_pp/emulation.py"


@functools.cache
def _slow_jobs() -> dict[str, tuple[Any, ...]]:
    """bench_adaptive's rank-job arguments: torch on the initial partition, ours on the best."""
    from adaptive_pp.core.partition import Partition
    from experiments import bench_adaptive as ba

    m, fwd = 16, 1.0
    initial = Partition.even(ba.LAYERS, ba.STAGES).bounds
    return {
        "torch": ("torch", initial, SLOW_STEPS, m, fwd),
        "ours": ("best", ba.best_offline(m).bounds, SLOW_STEPS, m, fwd),
    }


def run(pool: Any, kind: str) -> tuple[list[float], list[Any]]:
    """Step walls and step reports of one run, ``ours-CONFIG`` or ``torch-CONFIG``, on ``pool``.

    The rank jobs are bench_runtime's and bench_adaptive's ``_job``, which both trees have: a
    rank resolves them in the tree its pool imports from. Reports (ours, or torch's from the
    timings of its stage's chunks) come for ``1f1b`` / ``gpipe`` only.
    """
    from experiments import bench_adaptive, bench_runtime
    from experiments.peer import run_reports

    who, config = kind.split("-")
    if config == "slowbest":
        walls = pool.run(bench_adaptive._job, *_slow_jobs()[who], timeout=900)[0]["walls"]
        return list(walls[bench_adaptive.SLOW_FROM + 2 :]), []
    setup = bench_runtime.SETUP
    ranks = pool.run(bench_runtime._job, kind, setup, STEPS, timeout=900)
    return list(ranks[0]["walls"][1:]), run_reports(ranks, config, setup["microbatches"])


def _pool(path: Path) -> Any:
    """A pool of 4 ranks importing adaptive_pp, controllers and experiments from ``path``."""
    saved = list(sys.path)
    sys.path.insert(0, str(path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("adaptive_pp", "controllers")]:
        del sys.modules[name]
    # Spawned ranks inherit sys.path and re-import the main module, which the other tree may
    # not have: hide it while the ranks start (their jobs live in modules both trees have).
    main = sys.modules["__main__"]
    spec, file = main.__spec__, main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        import adaptive_pp  # the public name: both layouts have it

        return adaptive_pp.WorkerPool(4)
    finally:
        sys.path[:] = saved
        main.__spec__ = spec
        if file is not None:
            main.__file__ = file


def main() -> None:
    """Run the rounds and print the ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref", help="git commit or branch to compare the working tree with")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--configs", default="1f1b,gpipe,slowbest")
    ns = p.parse_args()
    configs = ns.configs.split(",")
    walls: dict[str, list[float]] = {}
    reports: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="adaptive_pp_ab_") as tmp:
        tree = Path(tmp) / "ref"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), ns.ref], check=True)
        commit = subprocess.run(
            [*git, "rev-parse", ns.ref], check=True, capture_output=True, text=True
        ).stdout.strip()
        theirs = tree / EMULATION if (tree / EMULATION).exists() else tree / EMULATION_BEFORE
        emulation_differs = theirs.read_bytes() != (ROOT / EMULATION).read_bytes()
        if emulation_differs:
            print(
                f"WARNING: {EMULATION} differs between {ns.ref} and the working tree: A and B "
                "run different emulated kernels, so B/A measures the emulation too",
                flush=True,
            )
        pools = {"A": _pool(tree), "B": _pool(ROOT)}
        try:
            for r in range(ns.rounds):
                order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
                for config in configs:
                    for who, side in [("ours", x) for x in order] + [("torch", "B")]:
                        got, reps = run(pools[side], f"{who}-{config}")
                        name = f"{side if who == 'ours' else 'torch'} {config}"
                        walls.setdefault(name, []).extend(got)
                        reports.setdefault(name, []).extend(reps)
                print(f"round {r + 1}/{ns.rounds} done", flush=True)
        finally:
            for pool in pools.values():
                pool.close()
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"EMULATED kernels; A = {ns.ref} ({commit[:10]}), B = working tree; medians per config")
    out: dict[str, Any] = {
        "ref": ns.ref,
        "commit": commit,
        "emulation_differs": emulation_differs,
        "median_step_s": med,
        "ratios": {},
    }
    for config in configs:
        a, b, t = med[f"A {config}"], med[f"B {config}"], med[f"torch {config}"]
        out["ratios"][config] = {"B/A": b / a, "A/torch": a / t, "B/torch": b / t}
        print(
            f"{config:9s} A {a * 1e3:7.1f} ms  B {b * 1e3:7.1f} ms  torch {t * 1e3:7.1f} ms  "
            f"B/A {b / a:.3f}  A/torch {a / t:.3f}  B/torch {b / t:.3f}"
        )
    from experiments import bench_runtime

    out["actions_ms"] = {}
    for name, reps in reports.items():
        if reps:
            f, b, hop = bench_runtime.action_medians(reps)
            out["actions_ms"][name] = {"forward": f, "backward": b, "hop": hop}
            print(f"{name:15s} forward {f:5.2f} ms  backward {b:5.2f} ms  hop {hop:5.3f} ms")
    print(f"wrote {write_json('bench_ab', out)}")


if __name__ == "__main__":
    main()
