"""AsyncState's version update beside the stage thread: joined once, errors raised on join."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from adaptive_pp.runtime.versions import AsyncState, WeightVersions


def _state() -> tuple[AsyncState, nn.Linear]:
    layer = nn.Linear(3, 2)
    return AsyncState(WeightVersions(dict(layer.named_parameters()), stage=0)), layer


def test_an_update_runs_on_another_thread_and_done_follows_the_join() -> None:
    state, layer = _state()
    grads = {n: torch.ones_like(p) for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    where: list[str] = []
    done: list[int] = []

    def make() -> None:
        where.append(threading.current_thread().name)
        state.versions.update(1, grads, opt)

    state.start_update(make, lambda: done.append(1))
    state.join()
    assert where == ["2bw-version-update"]
    assert done == [1] and state.updating is None
    assert state.versions.newest == 1
    for n, p in layer.named_parameters():
        assert torch.equal(p.detach(), before[n] - 0.5)  # W(1) = W(0) - lr x 1
    state.join()  # nothing running: a no-op, done not run again
    assert done == [1]


def test_a_failed_update_raises_on_join_and_done_does_not_run() -> None:
    state, _ = _state()
    done: list[int] = []

    def make() -> None:
        raise RuntimeError("optimizer broke")

    state.start_update(make, lambda: done.append(1))
    with pytest.raises(RuntimeError, match="optimizer broke"):
        state.join()
    assert done == [] and state.updating is None
    state.join()  # the error is raised once


def test_a_second_update_waits_for_the_first() -> None:
    state, _ = _state()
    order: list[str] = []
    gate = threading.Event()

    def first() -> None:
        gate.wait(5)
        order.append("first")

    state.start_update(first, lambda: order.append("first done"))
    threading.Timer(0.05, gate.set).start()
    state.start_update(lambda: order.append("second"), lambda: order.append("second done"))
    state.join()
    assert order == ["first", "first done", "second", "second done"]
