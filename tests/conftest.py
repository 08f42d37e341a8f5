"""Shared test configuration: hypothesis profiles.

- ``dev`` (the default here): 60 examples per property, no deadline.
- ``ci``: hypothesis's built-in profile (derandomised, no deadline, no example database).
  Hypothesis loads it by itself when the ``CI`` environment variable (or a vendor's CI variable)
  is set; versions that predate the built-in profile get an equivalent one registered here.
- ``HYPOTHESIS_PROFILE=<name>`` picks a profile explicitly.

No profile has a deadline: these tests make no timing assertions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.errors import InvalidArgument

from adaptive_pp.emulation import kernels as emulation
from adaptive_pp.runtime.launch import WorkerPool

settings.register_profile("dev", max_examples=60, deadline=None)

try:
    settings.get_profile("ci")
except InvalidArgument:  # hypothesis without a built-in "ci" profile
    settings.register_profile(
        "ci",
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _current_profile() -> str | None:
    getter = getattr(settings, "get_current_profile_name", None)
    return getter() if getter is not None else None


if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif "CI" in os.environ or _current_profile() == "ci":
    settings.load_profile("ci")
else:
    settings.load_profile("dev")


def _spawning_files() -> frozenset[str]:
    """Test files (as node ids start: ``tests/test_x.py``) with tests marked ``multiprocess`` or
    ``collector``: tests that spawn stage processes or a collector."""
    here = Path(__file__).resolve().parent
    marks = ("mark.multiprocess", "mark.collector")
    return frozenset(
        f"{here.name}/{f.name}"
        for f in here.glob("test_*.py")
        if any(m in f.read_text() for m in marks)
    )


# Files with spawning tests that may run beside the serialized ones, on the other worker: they
# start their own processes (torchrun agents, a study's pools) rather than share the session's
# pools much, and assert no timing (exactness, files and fields written). Timing-sensitive
# tests (a stage named within N s, a move seen through a loaded box's noise, measured bubbles)
# stay serialized; these run after the pure tests, at a lower CPU priority (see
# ``pytest_runtest_setup``).
BESIDE_THE_PURE_TESTS = frozenset(
    {"tests/test_experiments_smoke.py", "tests/test_multihost.py", "tests/test_resume.py"}
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``make test`` runs ``-n 2``) the files that spawn stage processes
    all go to one worker, one test after another: they share the session's stage pools and
    each wants the machine's cores for its ranks; the pure-Python tests go to the other, and
    so do the files of ``BESIDE_THE_PURE_TESTS`` (each file on one worker, its tests in turn),
    which would otherwise make the serialized worker the last to finish by minutes.
    (``--dist loadgroup`` cannot express this: pytest 9 ignores the group xdist 3.8 sets.)"""
    from xdist.scheduler import LoadScopeScheduling

    spawning = _spawning_files()

    class ProcessesOnOneWorker(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path in BESIDE_THE_PURE_TESTS:
                return path
            return "processes" if path in spawning else nodeid

        def _assign_work_unit(self, node: Any) -> None:
            # The files of BESIDE_THE_PURE_TESTS once nothing else is left.
            queue = self.workqueue
            first = next((s for s in queue if s not in BESIDE_THE_PURE_TESTS), None)
            if first is not None:
                queue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return ProcessesOnOneWorker(config, log)


_lowered: list[bool] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, a worker that runs a file of BESIDE_THE_PURE_TESTS lowers its CPU priority
    (and its children's) for good, before the test's fixtures start processes, so that the
    serialized tests' ranks, some of them timed, get the cores first when both want them."""
    if "PYTEST_XDIST_WORKER" not in os.environ or _lowered:
        return
    if item.nodeid.split("::", 1)[0] in BESIDE_THE_PURE_TESTS:
        os.nice(10)
        _lowered.append(True)


PoolFor = Callable[[int], WorkerPool]


@pytest.fixture(scope="session")
def pools() -> Iterator[PoolFor]:
    """``pools(S)``: a pool of S stage processes, started on first use and kept for the session.

    Spawning a rank costs seconds (it imports torch); multi-process property tests feed many
    cases to the same ranks. A pool broken by a failed case is replaced.
    """
    made: dict[int, WorkerPool] = {}

    def get(stages: int) -> WorkerPool:
        if stages not in made or made[stages].broken:
            made[stages] = WorkerPool(stages)
        return made[stages]

    yield get
    for pool in made.values():
        pool.close()


class _Lent:
    """A session pool handed out as ``with WorkerPool(n) as pool`` would: not closed at the end."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def __enter__(self) -> WorkerPool:
        return self.pool

    def __exit__(self, *exc: object) -> None:
        pass


class _SessionPools(dict[int, WorkerPool]):
    """``experiments.common``'s shared pools, drawn from the session's ``pools`` (which replaces
    a broken one)."""

    def __init__(self, get: PoolFor) -> None:
        super().__init__()
        self._get = get

    def __contains__(self, nprocs: object) -> bool:
        return True

    def __getitem__(self, nprocs: int) -> WorkerPool:
        return self._get(nprocs)


def lend_pools(pools: PoolFor, monkeypatch: pytest.MonkeyPatch, *modules: ModuleType) -> None:
    """Experiments and benchmarks run on the session's stage pools instead of spawning their own
    (a rank costs seconds of CPU: it imports torch): ``experiments.common.pool`` hands them out,
    and each of ``modules`` gets them from its ``WorkerPool`` and ``shared_pools``. What the
    studies compute is the same on any pool of that many ranks: they share pools in
    ``run_all`` too."""
    from experiments import common

    monkeypatch.setattr(common, "_SHARED", _SessionPools(pools))
    for module in modules:
        if hasattr(module, "WorkerPool"):
            monkeypatch.setattr(module, "WorkerPool", lambda n: _Lent(pools(n)))
        if hasattr(module, "shared_pools"):
            monkeypatch.setattr(module, "shared_pools", contextlib.nullcontext)


class FakeClock:
    """Stands in for ``time`` in ``adaptive_pp.emulation``: sleeps advance it and are recorded."""

    def __init__(self, oversleep: float = 0.0) -> None:
        self.now = 1000.0
        self.oversleep = oversleep
        self.slept: list[float] = []

    def perf_counter(self) -> float:
        """The fake time."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Record the request; the clock moves on by it (plus ``oversleep``)."""
        self.slept.append(seconds)
        self.now += seconds + self.oversleep

    def spend(self, seconds: float) -> None:
        """Host work: time passes without a sleep."""
        self.now += seconds


def drive_emulation(mp: pytest.MonkeyPatch, clock: FakeClock) -> FakeClock:
    """Let ``clock`` drive emulated kernels, with this thread's emulation clock state reset."""
    mp.setattr(emulation, "time", clock)
    mp.setattr(emulation._clock, "woke", 0.0)
    mp.setattr(emulation._clock, "late", 0.0)
    mp.setattr(emulation._clock, "owed", 0.0)
    return clock


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A FakeClock driving emulated kernels (see ``drive_emulation``)."""
    return drive_emulation(monkeypatch, FakeClock())
