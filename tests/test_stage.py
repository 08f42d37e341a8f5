"""adaptive_pp.stage in one process: which segment a backward failure names, per-layer times.

A stand-in link delivers the output gradient, so a stage that is not the last runs too.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from adaptive_pp.core.errors import StageFailure
from adaptive_pp.core.schedules import Action
from adaptive_pp.runtime.chunk import Chunk, Segment
from adaptive_pp.runtime.comm import Header, Message, MessageKind
from adaptive_pp.runtime.driver import run_actions
from adaptive_pp.runtime.stage import StageWorker

WIDTH = 8


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected backward failure")


class BadBackward(nn.Module):
    """A Linear whose backward raises."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = _FailInBackward.apply(self.linear(x))  # type: ignore[no-untyped-call]
        return y


class GradLink:
    """Stand-in for the link to the next stage: any gradient asked for is ones; sends kept."""

    def __init__(self) -> None:
        self.sent: list[Header] = []

    def take(
        self, kind: MessageKind, microbatch: int, timeout: float, what: str, vstage: int = 0
    ) -> Message:
        header = Header(kind, microbatch, 0, 0, 0, 0, torch.float32, (2, WIDTH))
        return Message(header, torch.ones(2, WIDTH), time.perf_counter())

    def send(self, header: Header, payload: torch.Tensor) -> None:
        self.sent.append(header)


def worker(modules: list[nn.Module], last: bool) -> StageWorker:
    segments = [Segment.block(i, mod) for i, mod in enumerate(modules)]
    down: Any = None if last else GradLink()
    loss = nn.functional.mse_loss if last else None
    chunk = Chunk(0, segments)
    return StageWorker(chunk, 1 if last else 2, loss, None, down, torch.device("cpu"), 5.0)


def run(w: StageWorker, microbatches: int = 2) -> Any:
    torch.manual_seed(0)
    xs = [torch.randn(2, WIDTH) for _ in range(microbatches)]
    acts = [Action(0, k, m) for m in range(microbatches) for k in ("F", "B")]  # type: ignore[arg-type]
    return run_actions([w], acts, xs, xs if w.is_last else None, 0, time.perf_counter(), version=0)


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_backward_failure_names_the_segment_that_raised(bad: int, last: bool) -> None:
    mods: list[nn.Module] = [nn.Linear(WIDTH, WIDTH) for _ in range(3)]
    mods[bad] = BadBackward()
    with pytest.raises(StageFailure) as info:
        run(worker(mods, last))
    assert f"stage 0, layers.{bad}, micro-batch 0, backward" in str(info.value)
    assert "injected backward failure" in str(info.value)


def test_loss_backward_failure_is_named_as_such_on_the_last_stage() -> None:
    w = worker([nn.Linear(WIDTH, WIDTH) for _ in range(2)], last=True)

    def bad_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = _FailInBackward.apply(nn.functional.mse_loss(out, target))  # type: ignore[no-untyped-call]
        return loss

    w.loss_fn = bad_loss
    with pytest.raises(StageFailure, match="loss or last segment, micro-batch 0, backward"):
        run(w)


@pytest.mark.parametrize("last", [False, True])
def test_every_layer_gets_a_backward_time_within_its_actions(last: bool) -> None:
    w = worker([nn.Linear(WIDTH, WIDTH) for _ in range(4)], last)
    log = run(w, microbatches=3)
    assert sorted(log.layer_backward) == [0, 1, 2, 3]
    assert all(t > 0 for t in log.layer_backward.values())
    backward = sum(
        e - s for a, s, e in zip(log.actions, log.start, log.end, strict=True) if a.kind == "B"
    )
    assert sum(log.layer_backward.values()) <= backward
    if not last:
        assert [h.microbatch for h in w.down.sent] == [0, 1, 2]  # type: ignore[union-attr]
