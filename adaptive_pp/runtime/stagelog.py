"""What a stage measures in a step (StageLog), and how per-layer times are attributed.

Forward time per layer is timed around each segment; backward time per layer comes from
gradient hooks on the segment boundaries (``hooked``): segment i's backward ran from its
output's gradient to its input's. The same marks name the segment a failed backward was in.

Per-action start and end: the host clock on a CPU. On a GPU the host only queues kernels, so
each action's start and end are CUDA events on the compute stream, read once at the end of the
step (``StageLog.resolve``): no host synchronization per action, one at the step's start to
tie the GPU's clock to the host's. Waits for inputs are host time on both.
"""

from __future__ import annotations

import time
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
    #: The CUDA device whose actions are timed by events (None: by the host clock).
    cuda: torch.device | None = None
    _anchor: tuple[float, torch.cuda.Event] | None = field(default=None, repr=False)
    _started: torch.cuda.Event | None = field(default=None, repr=False)
    _events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(
        default_factory=list, repr=False
    )

    @classmethod
    def on(cls, device: torch.device) -> StageLog:
        """An empty log for actions run on ``device`` (on CUDA: the GPU clock is anchored now,
        the step's one synchronization)."""
        log = cls(cuda=device if device.type == "cuda" else None)
        if log.cuda is not None:
            torch.cuda.synchronize(log.cuda)
            log._anchor = (time.perf_counter(), _event(log.cuda))
        return log

    def action_started(self) -> float:
        """An action's compute starts now (its inputs are in): the host time, and on CUDA an
        event on the compute stream."""
        if self.cuda is not None:
            self._started = _event(self.cuda)
        return time.perf_counter()

    def action_done(self, action: Action, t_req: float, t_start: float, t0: float) -> None:
        """``action`` ended: it asked for its inputs at ``t_req`` and started at ``t_start``
        (host times; the log's times are relative to ``t0``)."""
        t_end = time.perf_counter()
        self.actions.append(action)
        self.start.append(t_start - t0)
        self.end.append(t_end - t0)
        self.compute += t_end - t_start
        self.wait += t_start - t_req
        if self._started is not None and self.cuda is not None:
            self._events.append((self._started, _event(self.cuda)))
            self._started = None

    def resolve(self, t0: float) -> None:
        """On CUDA: replace the actions' host start/end and compute by their events' times
        (waits for the last event, once). Nothing to do on a CPU."""
        if self._anchor is None or not self._events or len(self._events) != len(self.actions):
            return
        self._events[-1][1].synchronize()
        host, anchor = self._anchor
        base = host - t0
        self.start = [base + anchor.elapsed_time(a) / 1e3 for a, _ in self._events]
        self.end = [base + anchor.elapsed_time(b) / 1e3 for _, b in self._events]
        self.compute = sum(e - s for s, e in zip(self.start, self.end, strict=True))
        self._events = []


def _event(device: torch.device) -> torch.cuda.Event:
    """A CUDA event that records time, recorded on ``device``'s current stream."""
    event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    return event


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
