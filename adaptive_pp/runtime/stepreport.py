"""The step report of a pipeline run: each rank's share, merged on every rank after a step.

A flushed step gathers the shares at its end (every rank waits for the slowest). A
PipeDream-2BW step does not: each rank posts its share to every peer without waiting
(``PendingReport``) and the report is merged when it is read, or when the next step, a drain
or a change settles it; the loss, which ``step`` returns at once, is posted by the last stage
right after its last forward (slot ``LOSS``), so no rank waits for the end of its peers' windows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..core.report import QueueTrace, StageStats, StepReport, Timeline
from ..core.schedules import Action
from .comm import Link, MessageKind
from .control import Control
from .layerstate import layer_name, named_params, state_bytes
from .local import LocalStage
from .stagelog import StageLog

LOSS, PART = 0, 1  # the slots of a 2BW step's posted messages (Control.post)


class ReportMeta(NamedTuple):
    """What a step's report takes from the rank's state when the step ran (the same on every
    rank): the state may have moved on by the time the shares are merged."""

    step: int
    schedule: str
    microbatches: int
    partition: tuple[int, ...]
    events: tuple[str, ...]
    change: float

    @classmethod
    def of(cls, local: LocalStage) -> ReportMeta:
        """The current step's, from ``local`` (before ``finish_step``)."""
        return cls(
            local.step_count,
            local.schedule.name,
            local.microbatches,
            tuple(local.partition.bounds),
            tuple(local.pending_events),
            local.change_s,
        )


def local_part(local: LocalStage, log: StageLog, t0: float, optimizer_s: float) -> dict[str, Any]:
    """This rank's share of the step report, JSON-ready, times relative to its step start."""
    layers = local.layers()
    sizes = state_bytes(local.optimizer, local.modules())
    queues = []
    for ln, kind in _incoming(local):
        got = [i for i, k in enumerate(ln.log.kinds) if k == kind]
        queues.append(
            {
                "src": ln.peer,
                "dst": local.stage,
                "kind": "act" if kind == MessageKind.ACT else "grad",
                "arrived": [ln.log.arrived[i] - t0 for i in got],
                "consumed": [ln.log.consumed[i] - t0 for i in got],
            }
        )
    return {
        "stage": local.stage,
        "compute": log.compute,
        "wait": log.wait,
        "end": log.end[-1] if log.end else 0.0,
        "peak_stash": log.peak_stash,
        "peak_stash_bytes": log.peak_stash_bytes,
        "layers": layers,
        "layer_forward": [log.layer_forward.get(i, 0.0) for i in layers],
        "layer_backward": [log.layer_backward.get(i, 0.0) for i in layers],
        "layer_bytes": [sizes.get(layer_name(i), 0) for i in layers],
        "weight_bytes": (
            local.stream.versions.nbytes()
            if local.stream is not None
            else sum(p.nbytes for p in named_params(local.modules()).values())
        ),
        "batch": local.last_batch_size or 0,
        "actions": " ".join(map(str, log.actions)),
        "start": log.start,
        "stop": log.end,
        "queues": queues,
        "loss": log.loss_sum / local.microbatches if local.is_last else None,
        "optimizer": optimizer_s,
        "t0": t0,
        "since": t0 - local.epoch,
    }


def _incoming(local: LocalStage) -> list[tuple[Link, MessageKind]]:
    """(link, kind) of each queue this rank consumes: activations from the rank before each of
    its chunks, gradients from the rank after (one trace per link and kind, as simulated: the
    hop between two chunks of this rank, a LocalLink, has none)."""
    out: list[tuple[Link, MessageKind]] = []
    for w in local.workers:
        for ln, kind in ((w.up, MessageKind.ACT), (w.down, MessageKind.GRAD)):
            if isinstance(ln, Link) and not any(ln is a and kind == b for a, b in out):
                out.append((ln, kind))
    return out


def merge_parts(meta: ReportMeta, parts: list[dict[str, Any]], wall: float) -> StepReport:
    """Every rank's share (rank order) as one StepReport on a common clock."""
    # perf_counter is one system-wide monotonic clock on a host: put every rank's times
    # on the earliest rank's step start, so cross-stage gaps (hop latency) are real.
    base = min(p["t0"] for p in parts)
    for p in parts:
        d = p["t0"] - base
        p["end"] += d
        p["start"] = [t + d for t in p["start"]]
        p["stop"] = [t + d for t in p["stop"]]
        for q in p["queues"]:
            q["arrived"] = [t + d for t in q["arrived"]]
            q["consumed"] = [t + d for t in q["consumed"]]
    step_time = max(p["end"] for p in parts)
    stages = tuple(
        StageStats(
            stage=p["stage"],
            compute=p["compute"],
            wait=p["wait"],
            wall=step_time,
            peak_stash=p["peak_stash"],
            layers=tuple(p["layers"]),
            layer_forward=tuple(p["layer_forward"]),
            layer_backward=tuple(p["layer_backward"]),
            peak_stash_bytes=p["peak_stash_bytes"],
            weight_bytes=p["weight_bytes"],
            layer_bytes=tuple(p["layer_bytes"]),
        )
        for p in parts
    )
    timeline = Timeline(
        tuple(tuple(Action.parse(a) for a in p["actions"].split()) for p in parts),
        tuple(tuple(p["start"]) for p in parts),
        tuple(tuple(p["stop"]) for p in parts),
    )
    queues = tuple(
        QueueTrace(q["src"], q["dst"], q["kind"], tuple(q["arrived"]), tuple(q["consumed"]))
        for p in parts
        for q in p["queues"]
    )
    return StepReport(
        step=meta.step,
        schedule=meta.schedule,
        microbatches=meta.microbatches,
        step_time=step_time,
        stages=stages,
        queues=queues,
        timeline=timeline,
        partition=meta.partition,
        source="runtime",
        loss=next((p["loss"] for p in parts if p["loss"] is not None), None),
        events=meta.events,
        extra={
            "wall": wall,
            "optimizer": max(p["optimizer"] for p in parts),
            "change": meta.change,
            "offset": min(p["since"] for p in parts),
        },
        batch=max(p["batch"] for p in parts),
    )


class GatheredReport:
    """A flushed step's report: every rank's share, gathered at the step's end, merged when
    first read (``result``; the merge costs the step nothing when no one reads the report)."""

    def __init__(self, meta: ReportMeta, parts: list[dict[str, Any]], wall: float) -> None:
        self.meta, self.parts, self.wall = meta, parts, wall
        self._report: StepReport | None = None

    def loss(self) -> float:
        """The step's loss: the last stage's share's."""
        loss = next(p["loss"] for p in self.parts if p["loss"] is not None)
        return float(loss)

    def result(self) -> StepReport:
        """The merged report (merged at the first call)."""
        if self._report is None:
            self._report = merge_parts(self.meta, self.parts, self.wall)
        return self._report


class PendingReport:
    """A PipeDream-2BW step's report, merged from the shares its ranks post without waiting.

    Made at the end of the rank's window (its own share posted to every peer then); ``settle``
    collects the peers' shares (waiting if one is not in yet: reading the report right after
    the step waits for every rank's end of that window, the barrier 2BW steps avoid), and
    ``result`` merges them once. ``on_merged`` (telemetry, the run log) runs at the merge.
    ``loss`` takes the step's loss from the last stage (posted after its last forward; on the
    last stage, its own share's); ``settle`` takes it too, so no message is left behind.
    """

    def __init__(
        self,
        control: Control,
        meta: ReportMeta,
        part: dict[str, Any],
        on_merged: Callable[[StepReport], None] | None = None,
    ) -> None:
        self.control, self.meta, self.round = control, meta, control.round
        self.wall = 0.0
        """This rank's wall of the step (start to return), set when the step returns."""
        self.on_merged = on_merged
        self._parts: dict[int, Any] = {control.rank: part}
        self._report: StepReport | None = None
        self._loss: float | None = part["loss"]  # the last stage's own; else taken
        control.post(self.round, PART, part, later=True)  # encoded while the next step runs

    def settle(self) -> None:
        """Take the peers' shares (at most once; waits for any not in yet), and merge them
        now if ``on_merged`` wants the report."""
        self._collect()
        self.loss()
        if self.on_merged is not None:
            self.result()

    def loss(self) -> float:
        """The step's loss (taken from the last stage at most once; waits if not in yet)."""
        if self._loss is None:
            last = self.control.world - 1
            what = f"the loss of step {self.meta.step}"
            self._loss = float(self.control.take(self.round, LOSS, [last], what)[last])
        return self._loss

    def result(self) -> StepReport:
        """The merged report (settled first)."""
        if self._report is None:
            self._collect()
            # The merge below changes this rank's share in place: it must have been sent.
            self.control.posted(self.control.wait_timeout)
            parts = [self._parts[r] for r in range(self.control.world)]
            self._report = merge_parts(self.meta, parts, self.wall)
            self._parts = {}
            hook, self.on_merged = self.on_merged, None
            if hook is not None:
                hook(self._report)
        return self._report

    def _collect(self) -> None:
        if self._report is None and len(self._parts) < self.control.world:
            what = f"the report shares of step {self.meta.step}"
            self._parts.update(self.control.take(self.round, PART, self.control.peers, what))
