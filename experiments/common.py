"""Helpers shared by the experiments: arguments, result folders, run metadata, figures, pools,
the timed-step loop of every rank job (``timed_steps``; ``back_to_back`` for steps that
overlap), a generic rank job for our runtime, and per-step statistics."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def results_dir(name: str, folder: str | Path | None = None) -> Path:
    """``folder``, else ``results/NAME`` under the repo (or $ADAPTIVE_PP_RESULTS); created."""
    root = Path(
        os.environ.get("ADAPTIVE_PP_RESULTS", Path(__file__).resolve().parent.parent / "results")
    )
    path = Path(folder) if folder is not None else root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every result."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch

    import adaptive_pp

    try:
        mpl = version("matplotlib")
    except PackageNotFoundError:
        mpl = None
    return {
        "adaptive_pp": adaptive_pp.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "matplotlib": mpl,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_json(name: str, data: dict[str, Any], folder: str | Path | None = None) -> Path:
    """Write ``data`` plus the environment to ``FOLDER/NAME.json``; return the path."""
    path = results_dir(name, folder) / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path


def study_args(
    doc: str | None, argv: Sequence[str] | None, extra: Callable[[Any], None] | None = None
) -> argparse.Namespace:
    """Parse a study's command line: ``--quick``, ``--out DIR`` and ``extra``'s options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    p.add_argument("--out", default=None, help="folder for JSON and PNG (default results/NAME)")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, name: str, stem: str, folder: str | Path | None = None) -> Path:
    """Save ``fig`` as ``FOLDER/STEM.png`` (adaptive_pp.plots.save_figure) and close it."""
    from adaptive_pp.observability.plots import save_figure as save_png

    fig.tight_layout()
    path = save_png(fig, results_dir(name, folder) / f"{stem}.png")
    pyplot().close(fig)
    return path


def kernel_note(launch_s: float, per_sample_s: float, samples: int) -> str:
    """One line stating an emulated layer's forward and backward time at ``samples``."""
    from adaptive_pp.core.simulator import BACKWARD_RATIO

    fwd = launch_s + per_sample_s * samples
    return (
        f"EMULATED kernels (sleep windows): per layer forward {launch_s * 1e3:.3g} ms + "
        f"{per_sample_s * 1e3:.3g} ms/sample = {fwd * 1e3:.3g} ms at {samples} samples, "
        f"backward {BACKWARD_RATIO}x = {BACKWARD_RATIO * fwd * 1e3:.3g} ms"
    )


_SHARED: dict[int, Any] | None = None


@contextlib.contextmanager
def shared_pools() -> Iterator[None]:
    """Within this context, ``pool(n)`` hands out one WorkerPool per size, closed at the end."""
    global _SHARED
    _SHARED = {}
    try:
        yield
    finally:
        pools, _SHARED = _SHARED, None
        for p in pools.values():
            p.close()


@contextlib.contextmanager
def pool(nprocs: int) -> Iterator[Any]:
    """A WorkerPool of ``nprocs`` ranks: the shared one if ``shared_pools`` is active."""
    from adaptive_pp.runtime.launch import WorkerPool

    if _SHARED is None:
        with WorkerPool(nprocs) as p:
            yield p
        return
    if nprocs not in _SHARED or _SHARED[nprocs].broken:
        _SHARED[nprocs] = WorkerPool(nprocs)
    yield _SHARED[nprocs]


@dataclass
class TimedSteps(Generic[T]):
    """What ``timed_steps`` measured, one entry per timed step (warm-up steps left out)."""

    walls: list[float] = field(default_factory=list)
    """Seconds from the barrier's release to ``step`` returning (``time.perf_counter``)."""
    starts: list[float] = field(default_factory=list)
    """``time.perf_counter()`` at each step's start: the origin of the step's timings."""
    outputs: list[T] = field(default_factory=list)
    """What ``step(k)`` returned (e.g. our StepOutput)."""


def timed_steps(
    step: Callable[[int], T],
    steps: int,
    *,
    warmup: int = 0,
    before_step: Callable[[int], object] | None = None,
    after_step: Callable[[int, T], object] | None = None,
    barrier: Callable[[], object] | None = None,
) -> TimedSteps[T]:
    """The timed loop of a rank job: ``warmup + steps`` calls of ``step(k)``, k = 0, 1, ...

    Each step: ``before_step(k)`` (untimed: slow a stage down, make the batch), ``barrier()``
    (default ``torch.distributed.barrier``: every rank starts the step together), then the wall
    clock of ``step(k)`` alone, e.g. ``lambda k: pipe.step(x, y)`` (ours) or a torch schedule's
    step plus its optimizer step (the peer); then ``after_step(k, output)`` (untimed: read state
    the next step changes). Hooks run on warm-up steps too; only the last ``steps`` steps are
    recorded: their walls, start times and outputs, in order.
    """
    if barrier is None:
        import torch.distributed as dist

        barrier = dist.barrier
    timed: TimedSteps[T] = TimedSteps()
    for k in range(warmup + steps):
        if before_step is not None:
            before_step(k)
        barrier()
        t0 = time.perf_counter()
        out = step(k)
        wall = time.perf_counter() - t0
        if k >= warmup:
            timed.walls.append(wall)
            timed.starts.append(t0)
            timed.outputs.append(out)
        if after_step is not None:
            after_step(k, out)
    return timed


@dataclass
class BackToBack(Generic[T]):
    """What ``back_to_back`` measured: one wall for all the steps, and their outputs."""

    wall: float
    """Seconds from the first barrier's release to the second's (every rank done)."""
    steps: int
    outputs: list[T] = field(default_factory=list)

    @property
    def per_step(self) -> float:
        """``wall / steps``: the steady-state step time of a schedule whose steps overlap."""
        return self.wall / self.steps


def back_to_back(
    step: Callable[[int], T],
    steps: int,
    *,
    warmup: int = 0,
    barrier: Callable[[], object] | None = None,
) -> BackToBack[T]:
    """``warmup`` untimed calls of ``step(k)``, then ``steps`` calls back to back between two
    barriers (default ``torch.distributed.barrier``), timed as one wall.

    ``timed_steps`` starts every step on a barrier, which forbids consecutive steps from
    overlapping; a schedule without a flush (PipeDream-2BW) is measured honestly only this way,
    and a flushed one the same way for a side-by-side ratio. The wall includes one pipeline
    fill and, behind the closing barrier, the slowest rank's end of the last step.
    """
    if barrier is None:
        import torch.distributed as dist

        barrier = dist.barrier
    for k in range(warmup):
        step(k)
    barrier()
    t0 = time.perf_counter()
    outputs = [step(warmup + k) for k in range(steps)]
    barrier()
    return BackToBack(time.perf_counter() - t0, steps, outputs)


def train_job(
    model_fn: Callable[[], Any],
    config: Any,
    data_fn: Callable[[int], tuple[Any, Any]],
    steps: int,
    lr: float = 1e-3,
    controller_fn: Callable[[], Any] | None = None,
    before_step: Callable[[Any, int], None] | None = None,
    probe: Callable[[Any, int], Any] | None = None,
) -> dict[str, Any]:
    """Rank job: train ``model_fn()`` with Adam(lr) on our runtime for ``steps`` steps.

    ``data_fn(k)`` gives step k's (inputs, targets) on every rank; ``before_step(pipe, k)`` runs
    before each step (inject slowdowns, skew); ``controller_fn()`` builds the controller;
    ``probe(pipe, k)`` runs after each step and its values come back as ``probes``.
    Returns every step's report (as dicts), loss and barrier-to-return wall time (``timed_steps``).
    """
    import torch
    from torch import nn

    from adaptive_pp import Pipeline
    from adaptive_pp.observability.logs import configure_logging

    configure_logging(level="warning")  # decisions come back in the reports' events
    torch.manual_seed(0)
    model = model_fn()
    controller = controller_fn() if controller_fn is not None else None
    batches: dict[int, tuple[Any, Any]] = {}
    probes: list[Any] = []
    with Pipeline(
        model,
        nn.functional.mse_loss,
        lambda p: torch.optim.Adam(p, lr=lr),
        config,
        controller=controller,
    ) as pipe:

        def prepare(k: int) -> None:
            if before_step is not None:
                before_step(pipe, k)
            batches[k] = data_fn(k)

        timed = timed_steps(
            lambda k: pipe.step(*batches.pop(k)),
            steps,
            before_step=prepare,
            after_step=lambda k, _: probes.append(probe(pipe, k) if probe is not None else None),
        )
    return {
        "reports": [out.report.to_dict() for out in timed.outputs],
        "losses": [out.loss for out in timed.outputs],
        "walls": timed.walls,
        "probes": probes,
    }


def step_stats(report: Any) -> dict[str, Any]:
    """One step's figures: step time, bubble, per-stage U and idle ratio, bubble/U."""
    util = list(report.utilization)
    mean_u = sum(util) / len(util) if util else 0.0
    return {
        "step": report.step,
        "microbatches": report.microbatches,
        "partition": list(report.partition),
        "step_ms": report.step_time * 1e3,
        "bubble": report.bubble_fraction,
        "utilization": util,
        "idle": [s.bubble for s in report.stages],
        "bubble_to_u": report.bubble_fraction / mean_u if mean_u > 0 else float("inf"),
        "change_ms": report.extra.get("change", 0.0) * 1e3,
        "events": list(report.events),
    }


def median_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median over steps of step_stats rows (per-stage lists element-wise)."""
    if not rows:
        return {}
    med = statistics.median
    stages = len(rows[0]["utilization"])
    return {
        "steps": len(rows),
        "step_ms": med(r["step_ms"] for r in rows),
        "bubble": med(r["bubble"] for r in rows),
        "bubble_to_u": med(r["bubble_to_u"] for r in rows),
        "utilization": [med(r["utilization"][s] for r in rows) for s in range(stages)],
        "idle": [med(r["idle"][s] for r in rows) for s in range(stages)],
        "microbatches": rows[-1]["microbatches"],
        "partition": rows[-1]["partition"],
    }


@dataclass(frozen=True)
class Regression:
    """Synthetic regression y = W x + b + noise (``samples`` points of ``width``, seeded: the
    same on every rank), served in epochs of seeded shuffles."""

    samples: int
    width: int
    noise: float
    bias_scale: float = 0.1

    @functools.cached_property
    def data(self) -> tuple[Any, Any]:
        """All points: x (samples x width) and y (computed once)."""
        import torch

        g = torch.Generator().manual_seed(0)
        w = torch.randn(self.width, self.width, generator=g) / self.width**0.5
        b = self.bias_scale * torch.randn(self.width, generator=g)
        x = torch.randn(self.samples, self.width, generator=g)
        return x, x @ w.T + b + self.noise * torch.randn(self.samples, self.width, generator=g)

    def batch(self, step: int, size: int) -> tuple[Any, Any]:
        """Step ``step``'s mini-batch of ``size`` points (an epoch: a seeded shuffle)."""
        import torch

        x, y = self.data
        epoch, i = divmod(step, self.samples // size)
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(1000 + epoch))
        idx = order[i * size : (i + 1) * size]
        return x[idx], y[idx]
