"""What a stage measures in a step (StageLog), and how per-layer times are attributed.

Forward time per layer is timed around each segment; backward time per layer comes from
gradient hooks on the segment boundaries (``hooked``): segment i's backward ran from its
output's gradient to its input's. The same marks name the segment a failed backward was in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.schedules import Action
from .chunk import Segment


@dataclass
class StageLog:
    """What a stage measured during one step (times relative to the step's start)."""

    actions: list[Action] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    compute: float = 0.0
    wait: float = 0.0
    peak_stash: int = 0
    peak_stash_bytes: int = 0
    layer_forward: dict[int, float] = field(default_factory=dict)
    layer_backward: dict[int, float] = field(default_factory=dict)
    loss_sum: float = 0.0


def layer_backward_times(
    segments: list[Segment],
    boundaries: list[torch.Tensor],
    marks: list[float],
    span: tuple[float, float],
    is_last: bool,
    log: StageLog,
) -> None:
    """Segment i's backward ran from its output's gradient to its input's gradient (``span``:
    the backward's start and end)."""
    # Hooks fire from the top down; boundaries without a hook have no mark (backward's
    # start and end stand for the top and the input).
    when: list[float | None] = [None] * len(boundaries)
    for i, t in zip(reversed(hooked(boundaries, is_last)), marks, strict=False):
        when[i] = t
    for i, seg in enumerate(segments):
        above, below = when[i + 1], when[i]
        start = span[0] if above is None else above
        stop = span[1] if below is None else below
        add_time(log.layer_backward, seg.layer, max(0.0, stop - start))


def add_time(acc: dict[int, float], layer: int | None, seconds: float) -> None:
    """Accumulate per-layer time (pre, post and the loss, layer None, are not layers)."""
    if layer is not None:
        acc[layer] = acc.get(layer, 0.0) + seconds


def hooked(boundaries: list[torch.Tensor], is_last: bool) -> list[int]:
    """Boundaries whose gradient is timestamped, bottom to top.

    The interior ones, plus the top one on the last stage (the loss sits above it there);
    elsewhere the top's gradient arrives when backward starts and the input's when it ends,
    which the action's own timestamps give.
    """
    top = len(boundaries) if is_last else len(boundaries) - 1
    return [i for i in range(1, top) if boundaries[i].requires_grad]


def backward_culprit(
    segments: list[Segment], boundaries: list[torch.Tensor], marks: list[float], is_last: bool
) -> str:
    """Name the segment whose backward raised: the one below the last boundary that got grad."""
    done = len(marks)
    marked = hooked(boundaries, is_last)
    if not done and is_last:
        return "loss or last segment"
    # marked[-done:] got their gradient (off the last stage the top always has it); the failing
    # segment sits just below the lowest of them.
    reached = marked[-done] if done else len(boundaries) - 1
    idx = min(max(reached - 1, 0), len(segments) - 1)
    return segments[idx].name
