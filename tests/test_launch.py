"""Multi-process: how launch starts ranks. By default they fork from a forkserver that imported
torch once, yet each still starts with its parent's environment, stdout and CPU priority as they
are at the launch (not as they were when the server started), and a rank that dies is named."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest

from adaptive_pp.runtime import launch as launch_module
from adaptive_pp.runtime.launch import LaunchError, launch

pytestmark = pytest.mark.multiprocess
MARK = "ADAPTIVE_PP_TEST_LAUNCH_MARK"


def what_a_rank_sees(parent: int) -> dict[str, Any]:
    """Rank job: what it inherited, and whether torch came with the process."""
    dynamo = "torch._dynamo" in sys.modules  # before anything here could import it
    import torch

    rank = int(os.environ["RANK"])
    print(f"rank {rank} says hello", flush=True)
    print(f"rank {rank} warns", file=sys.stderr, flush=True)
    return {
        "mark": os.environ.get(MARK),
        "priority": os.getpriority(os.PRIO_PROCESS, 0),
        "threads": torch.get_num_threads(),
        "forked_from_parent": os.getppid() == parent,
        "dynamo": dynamo,
        "sum": float(torch.ones(1000, 100).sum()),  # a parallel op: no OpenMP pool inherited
    }


def die_on_rank_one() -> int:
    """Rank job: rank 1 is killed by a signal; rank 0 returns."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def _divide_on(rank: int) -> float:
    return 1.0 / (int(os.environ["RANK"]) - rank)


def raise_on_rank_one() -> float:
    """Rank job: rank 1 divides by zero two calls deep; rank 0 returns."""
    return _divide_on(1)


def test_a_raising_ranks_traceback_is_in_the_message() -> None:
    with pytest.raises(LaunchError) as caught:
        launch(raise_on_rank_one, 2, timeout=120)
    text = str(caught.value)
    assert text.startswith("rank 1 failed: ZeroDivisionError: float division by zero")
    # A CI log shows only the message: it names the function and line that raised.
    tail = text.split("rank 1's traceback:\n", 1)[1]
    assert 'in _divide_on\n      return 1.0 / (int(os.environ["RANK"]) - rank)' in tail
    assert "in raise_on_rank_one" in tail


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_rank_starts_with_the_parents_environment_and_output(
    method: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    parent = os.getpid()
    if method == "forkserver":  # the server runs from now on, with this environment and stdout
        with capfd.disabled():
            launch(what_a_rank_sees, 1, parent, start_method=method, timeout=120)
    monkeypatch.setenv(MARK, f"set after the first launch ({method})")
    capfd.readouterr()
    ranks = launch(what_a_rank_sees, 2, parent, threads=2, start_method=method, timeout=120)
    out, err = capfd.readouterr()
    for r, seen in enumerate(ranks):
        assert seen["mark"] == f"set after the first launch ({method})", r
        assert seen["priority"] == os.getpriority(os.PRIO_PROCESS, 0), r
        assert seen["threads"] == 2, r
        assert seen["sum"] == 100000.0, r
        # A forkserver's child is the server's, not ours: torch was imported there, once.
        assert seen["forked_from_parent"] is (method == "spawn"), r
        assert f"rank {r} says hello" in out
        assert f"rank {r} warns" in err


def test_ranks_fork_from_a_server_by_default() -> None:
    assert launch_module.START_METHOD == "forkserver"
    (seen,) = launch(what_a_rank_sees, 1, os.getpid(), timeout=120)
    assert seen["forked_from_parent"] is False
    # The server imported torch._dynamo too, which a rank's first optimizer would import.
    assert seen["dynamo"] is True


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_rank_killed_by_a_signal_is_named(method: str) -> None:
    with pytest.raises(LaunchError) as caught:
        launch(die_on_rank_one, 2, start_method=method, timeout=120)
    root = caught.value.root
    assert (root.rank, root.kind) == (1, "Died")
    assert "signal SIGKILL" in root.message
