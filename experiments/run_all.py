"""Run every study of issue #8 in one process (stage pools shared between them); print the times.

    python -m experiments.run_all [--quick] [--out ROOT] [--figures DIR]

Each study writes JSON and PNGs into ROOT/<study>/ (default results/<study>/); ``--quick`` runs
each in seconds (the smoke test in ``make test`` does that); ``--figures DIR`` also copies every
PNG into DIR (``make experiments`` refreshes docs/figures, which docs/EXPERIMENTS.md shows).
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.common import shared_pools, study_args

STUDIES = (
    "exp_bubble_table",
    "exp_gpipe_vs_1f1b",
    "exp_m_sweep",
    "exp_moe",
    "exp_transition",
    "exp_peers",
    "exp_2bw",
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the studies in order; return each one's result and the seconds it took."""
    ns = study_args(__doc__, argv, lambda p: p.add_argument("--figures", default=None))
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with shared_pools():
        for name in STUDIES:
            print(f"\n=== {name}{' (quick)' if ns.quick else ''} ===", flush=True)
            args = ["--quick"] if ns.quick else []
            if ns.out is not None:
                args += ["--out", str(Path(ns.out) / name)]
            t = time.perf_counter()
            results[name] = importlib.import_module(f"experiments.{name}").main(args)
            seconds[name] = time.perf_counter() - t
            if ns.figures is not None:
                Path(ns.figures).mkdir(parents=True, exist_ok=True)
                for png in results[name]["figures"]:
                    shutil.copy(png, Path(ns.figures) / Path(png).name)
    total = time.perf_counter() - t0
    print("\n" + "\n".join(f"{name:20s} {s:7.1f} s" for name, s in seconds.items()))
    print(f"{'total':20s} {total:7.1f} s{' (quick)' if ns.quick else ''}")
    return {"results": results, "seconds": seconds, "total_s": total}


if __name__ == "__main__":
    main()
