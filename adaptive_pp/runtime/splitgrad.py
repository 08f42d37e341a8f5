"""Split backward for zero-bubble schedules: I (input gradient) then W (weight gradient).

``input_pass`` (the action I) runs autograd from the stage's top (the loss on the last stage,
else the stage output with the gradient received from downstream) to the stage input and to
every segment boundary, keeping the graph (``retain_graph``) and the gradient at each segment's
output. No parameter gets a gradient in I: autograd only runs the nodes on the way to the
requested tensors. ``weight_pass`` (the action W) then runs, per segment, autograd from the
segment's output (with the gradient I kept there) to that segment's own parameters, which
accumulates into their ``.grad``.

Exact: every gradient is computed by the same autograd nodes from the same values as one full
backward (B), only in two calls; and the W's of a rank run in micro-batch order in ZB-H1
(``tests/test_zero_bubble.py`` checks it), so ``.grad`` accumulates in the reference's order.
Cost: W re-walks each segment's internal chain from its output (a segment is one layer, so
this is the layer's own activation-gradient work again, not the stage's), and under activation
checkpointing the segment is recomputed in I and again in W. A stage whose segments share a
parameter (tied weights) runs W as one call from the top over all its parameters instead, so
each parameter still gets its gradient summed once, as in B.

``backward_phase()`` says which pass runs ("I", "W", or None for a full backward or none): the
emulated kernels read it to sleep the I share, then the W share of their backward time. It is
process-wide, not per thread, since autograd may run a device's backward on its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .chunk import Segment

Phase = Literal["I", "W"]

_phase: Phase | None = None


def backward_phase() -> Phase | None:
    """The split-backward pass running now: "I", "W", or None (full backward, or none)."""
    return _phase


@contextmanager
def phase(which: Phase) -> Iterator[None]:
    """Mark the autograd calls inside as the ``which`` pass of a split backward."""
    global _phase
    before, _phase = _phase, which
    try:
        yield
    finally:
        _phase = before


@dataclass
class PendingW:
    """What I(m) leaves for W(m): per segment, its output and the gradient I computed there.

    ``outputs[i]`` is None where segment i gets no gradient (nothing above it needs its
    output). ``whole``: one W from the top (shared parameters) instead of one per segment.
    ``nbytes``: the kept gradients' bytes, counted in the activation stash until W ends.
    """

    outputs: list[tuple[torch.Tensor, torch.Tensor] | None]
    whole: tuple[torch.Tensor, torch.Tensor | None] | None = None
    nbytes: int = 0


def shares_parameters(modules: Sequence[nn.Module]) -> bool:
    """Whether a parameter belongs to more than one of ``modules`` (tied weights)."""
    seen: set[int] = set()
    for mod in modules:
        ids = {id(p) for p in mod.parameters()}
        if seen & ids:
            return True
        seen |= ids
    return False


def input_pass(
    top: torch.Tensor,
    grad: torch.Tensor | None,
    boundaries: list[torch.Tensor],
    is_last: bool,
    whole: bool,
) -> tuple[torch.Tensor | None, PendingW]:
    """Run I: the gradient of the stage input (None if it needs none), and what W needs.

    ``boundaries`` are the stage input and each segment's output; ``top`` is the loss (last
    stage, ``grad`` None) or the last boundary (``grad`` received from downstream).
    """
    n = len(boundaries) - 1
    # The stage input, the interior boundaries, and the last one on the last stage (the loss
    # sits above it); elsewhere the gradient of the last boundary is the received one.
    want = [i for i in range(n + 1 if is_last else n) if boundaries[i].requires_grad]
    got: Sequence[torch.Tensor | None] = ()
    if want:  # else a first stage of one segment: its I has nothing to compute
        with phase("I"):
            got = torch.autograd.grad(
                top, [boundaries[i] for i in want], grad, retain_graph=True, allow_unused=True
            )
    at: dict[int, torch.Tensor | None] = dict(zip(want, got, strict=True))
    if not is_last and grad is not None:
        at[n] = grad
    pending = PendingW([None] * n)
    if whole:
        pending.whole = (top, grad)
    for i in range(n):
        g = at.get(i + 1)
        if g is not None:
            pending.outputs[i] = (boundaries[i + 1], g)
            if i + 1 < n or is_last:  # the received gradient is not I's to count
                pending.nbytes += g.nbytes
    return at.get(0), pending


def weight_params(module: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that W gives a gradient to."""
    return [p for p in module.parameters() if p.requires_grad]


def weight_pass_segment(
    module: nn.Module, output: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """W of one segment: from its output's gradient to its own parameters (into ``.grad``)."""
    params = weight_params(module)
    if output is None or not params:
        return
    with phase("W"):
        torch.autograd.backward(output[0], output[1], inputs=params)


def weight_pass_whole(
    modules: Sequence[nn.Module], top: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    """W of a stage whose segments share parameters: one call from the top over all of them."""
    params = list({id(p): p for m in modules for p in weight_params(m)}.values())
    if not params:
        return
    with phase("W"):
        torch.autograd.backward(top[0], top[1], inputs=params)


class WeightPassError(Exception):
    """A W failed in segment ``name`` (``layer``: its block index, None if not a block)."""

    def __init__(self, name: str, layer: int | None, cause: Exception) -> None:
        super().__init__(f"{name}: {cause}")
        self.name, self.layer, self.cause = name, layer, cause


def weight_pass(segments: Sequence[Segment], pending: PendingW, times: dict[int, float]) -> None:
    """W of one micro-batch: every segment's weight gradients, each block's seconds added to
    ``times`` (by layer); WeightPassError names the segment that failed."""
    if pending.whole is not None:
        t = time.perf_counter()
        try:
            weight_pass_whole([seg.module for seg in segments], pending.whole)
        except Exception as exc:
            raise WeightPassError("segments sharing parameters", None, exc) from exc
        blocks = [seg.layer for seg in segments if seg.layer is not None]
        for layer in blocks:  # one call for all: its time split evenly
            times[layer] = times.get(layer, 0.0) + (time.perf_counter() - t) / len(blocks)
        return
    for seg, out in zip(segments, pending.outputs, strict=True):
        t = time.perf_counter()
        try:
            weight_pass_segment(seg.module, out)
        except Exception as exc:
            raise WeightPassError(seg.name, seg.layer, exc) from exc
        if seg.layer is not None:
            times[seg.layer] = times.get(seg.layer, 0.0) + time.perf_counter() - t
