"""Split backward for zero-bubble schedules: I (input gradient) then W (weight gradient).

``input_pass`` (the action I) runs autograd from the stage's top (the loss on the last stage,
else the stage output with the gradient received from downstream) to the stage input and to
every segment boundary, keeping the graph (``retain_graph``). No parameter gets a gradient in
I: autograd only runs the nodes on the way to the requested tensors. On the way it keeps, for
each segment, the gradients arriving at the segment's *weight-adjacent* nodes: the nodes I runs
(they lie on the path to the segment's input) that also have an edge towards a parameter the
input path does not use (a Linear's addmm, whose other edges lead to its weight and bias; a
LayerNorm). ``weight_pass`` (the action W) then starts one autograd call at each such node,
with the gradient I kept there, over the parameters that node reaches: only the weight side of
each node runs again, not the activation-gradient chain between the segment's output and it
(that work was I's). torch.distributed.pipelining's zero-bubble stages split the same way.

A segment whose input needs no gradient (the first segment of the first stage: I runs none of
its nodes) or in which one parameter is reached from two such nodes (reusing a weight inside a
layer) runs W as one call from the segment's output over its parameters instead, re-walking its
chain: exact either way. A stage whose segments share a parameter (tied weights) runs W as one
call from the top over all its parameters, so each parameter still gets its gradient summed
once, as in B.

Exact: every gradient is computed by the same autograd nodes from the same values as one full
backward (B), only in two calls; and the W's of a rank run in micro-batch order in ZB-H1
(``tests/test_zero_bubble.py`` checks it), so ``.grad`` accumulates in the reference's order.
Under activation checkpointing a segment is recomputed in I and again in W.

``backward_phase()`` says which pass runs ("I", "W", or None for a full backward or none): the
emulated kernels read it to sleep the I share, then the W share of their backward time. It is
process-wide, not per thread, since autograd may run a device's backward on its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from .chunk import Segment

Phase = Literal["I", "W"]
Grads = tuple[torch.Tensor | None, ...]

_phase: Phase | None = None
_at_exit: list[Callable[[], None]] = []


def backward_phase() -> Phase | None:
    """The split-backward pass running now: "I", "W", or None (full backward, or none)."""
    return _phase


def on_phase_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` in the calling thread whenever a split-backward pass ends (the emulated
    kernels sleep out the window an I pass still owes)."""
    if fn not in _at_exit:
        _at_exit.append(fn)


@contextmanager
def phase(which: Phase) -> Iterator[None]:
    """Mark the autograd calls inside as the ``which`` pass of a split backward."""
    global _phase
    before, _phase = _phase, which
    try:
        yield
    finally:
        _phase = before
        for fn in _at_exit:
            fn()


@dataclass
class WeightCall:
    """One autograd call of a W: start at ``edges`` with ``grads``, accumulate into ``params``."""

    edges: list[GradientEdge]
    grads: list[torch.Tensor]
    params: list[torch.Tensor]


@dataclass
class PendingW:
    """What I(m) leaves for W(m): per segment, the autograd calls of its W.

    ``whole``: one W from the top (shared parameters) instead of per segment. ``nbytes``: the
    kept gradients' bytes, counted in the activation stash until W ends.
    """

    segments: list[list[WeightCall]]
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


def weight_params(module: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that W gives a gradient to."""
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class _SegmentPlan:
    """A segment's weight-adjacent nodes (each with the parameters it reaches), or ``None``
    nodes: W from the segment's output. ``kept`` collects what I's prehooks saw."""

    nodes: list[tuple[Node, list[torch.Tensor]]] | None
    kept: dict[Node, Grads] = field(default_factory=dict)


def _plan(inp: torch.Tensor, out: torch.Tensor, params: list[torch.Tensor]) -> _SegmentPlan:
    """Where the W of the segment from ``inp`` to ``out`` starts (see the module docstring).

    One depth-first walk of the segment's graph, children before parents: a node is on the
    input path if it leads to ``inp``; a node on it whose other edges reach parameters is
    weight-adjacent. Parameters and a leaf input show up as accumulators (``.variable``).
    """
    root = out.grad_fn
    if root is None or not inp.requires_grad or not params:
        return _SegmentPlan(None)
    stop = inp.grad_fn  # None for a leaf input: its accumulator is recognised by its variable
    ids = {id(p) for p in params}
    on: dict[Node, bool] = {}
    reach: dict[Node, set[int]] = {}  # nodes off the input path: the parameters they reach
    found: list[tuple[Node, set[int]]] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if not children_done:
            if node not in on:
                on[node] = False  # visiting; a DAG never meets it again before it is done
                stack.append((node, True))
                for c, _ in node.next_functions:
                    # Accumulators (with a variable) are leaves: read by the parent below.
                    if c is None or c is stop or c in on:
                        continue
                    if not hasattr(c, "variable"):
                        stack.append((c, False))
            continue
        on_path, weights = False, set()
        for c, _ in node.next_functions:
            if c is None:
                continue
            if c is stop:
                on_path = True
            elif hasattr(c, "variable"):  # an accumulator: a parameter, the input, or neither
                v = c.variable
                if v is inp:
                    on_path = True
                elif id(v) in ids:
                    weights.add(id(v))
            elif on[c]:
                on_path = True
            else:
                weights |= reach[c]
        on[node] = on_path
        if not on_path:
            reach[node] = weights
        elif weights:
            found.append((node, weights))
    if not on[root]:  # nothing in the segment leads to its input: W from the output
        return _SegmentPlan(None)
    owned: set[int] = set()
    for _, weights in found:
        if weights & owned:  # a parameter two nodes reach: W from the output instead
            return _SegmentPlan(None)
        owned |= weights
    return _SegmentPlan([(node, [p for p in params if id(p) in w]) for node, w in found])


def input_pass(
    top: torch.Tensor,
    grad: torch.Tensor | None,
    boundaries: list[torch.Tensor],
    params: Sequence[list[torch.Tensor]],
    is_last: bool,
    whole: bool,
) -> tuple[torch.Tensor | None, PendingW]:
    """Run I: the gradient of the stage input (None if it needs none), and what W needs.

    ``boundaries`` are the stage input and each segment's output, ``params[i]`` segment i's
    parameters; ``top`` is the loss (last stage, ``grad`` None) or the last boundary (``grad``
    received from downstream).
    """
    n = len(boundaries) - 1
    # The stage input, the interior boundaries, and the last one on the last stage (the loss
    # sits above it); elsewhere the gradient of the last boundary is the received one.
    want = [i for i in range(n + 1 if is_last else n) if boundaries[i].requires_grad]
    plans = [
        _SegmentPlan(None) if whole else _plan(boundaries[i], boundaries[i + 1], params[i])
        for i in range(n)
    ]
    handles: list[RemovableHandle] = []
    for plan in plans:
        for node, _ in plan.nodes or ():
            handles.append(node.register_prehook(_keeper(plan.kept, node)))
    got: Sequence[torch.Tensor | None] = ()
    try:
        if want:  # else a first stage of one segment: its I has nothing to compute
            with phase("I"):
                got = torch.autograd.grad(
                    top, [boundaries[i] for i in want], grad, retain_graph=True, allow_unused=True
                )
    finally:
        for h in handles:
            h.remove()
    at: dict[int, torch.Tensor | None] = dict(zip(want, got, strict=True))
    if not is_last and grad is not None:
        at[n] = grad
    pending = PendingW([[] for _ in range(n)])
    if whole:
        pending.whole = (top, grad)
        return at.get(0), pending
    for i, plan in enumerate(plans):
        if plan.nodes is None:  # from the segment's output
            g = at.get(i + 1)
            if g is not None and params[i]:
                out = boundaries[i + 1]
                pending.segments[i].append(WeightCall([get_gradient_edge(out)], [g], params[i]))
                if i + 1 < n or is_last:  # the received gradient is not I's to count
                    pending.nbytes += g.nbytes
            continue
        for node, reach in plan.nodes:
            # Not run in I (nothing reached it): its parameters get no gradient, as in B.
            kept = [(k, g) for k, g in enumerate(plan.kept.get(node, ())) if g is not None]
            if kept:
                edges = [GradientEdge(node, k) for k, _ in kept]
                grads = [g for _, g in kept]
                pending.segments[i].append(WeightCall(edges, grads, reach))
                pending.nbytes += sum(g.nbytes for g in grads)
    return at.get(0), pending


def _keeper(into: dict[Node, Grads], node: Node) -> Callable[[Grads], None]:
    """A prehook filing the gradients arriving at ``node`` under it in ``into``."""

    def keep(grads: Grads) -> None:
        into[node] = grads

    return keep


class WeightPassError(Exception):
    """A W failed in segment ``name`` (``layer``: its block index, None if not a block)."""

    def __init__(self, name: str, layer: int | None, cause: Exception) -> None:
        super().__init__(f"{name}: {cause}")
        self.name, self.layer, self.cause = name, layer, cause


def weight_pass_segment(calls: Sequence[WeightCall]) -> None:
    """W of one segment: its autograd calls, each into its parameters' ``.grad``."""
    with phase("W"):
        for call in calls:
            torch.autograd.backward(call.edges, call.grads, inputs=call.params)


def weight_pass_whole(
    modules: Sequence[nn.Module], top: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    """W of a stage whose segments share parameters: one call from the top over all of them."""
    params = list({id(p): p for m in modules for p in weight_params(m)}.values())
    if not params:
        return
    with phase("W"):
        torch.autograd.backward(top[0], top[1], inputs=params)


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
    for seg, calls in zip(segments, pending.segments, strict=True):
        t = time.perf_counter()
        try:
            weight_pass_segment(calls)
        except Exception as exc:
            raise WeightPassError(seg.name, seg.layer, exc) from exc
        if seg.layer is not None:
            times[seg.layer] = times.get(seg.layer, 0.0) + time.perf_counter() - t
