"""StepReport: the one per-step report type, produced by the simulator and by the runtime alike."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, cast

from .actions import Deferred
from .schedules import Action, Kind


class ActionTiming(NamedTuple):
    """Start and end (seconds from the step's start) of one executed action (``chunk``: the
    rank's model chunk it ran, under interleaved schedules)."""

    stage: int
    kind: Kind
    microbatch: int
    start: float
    end: float
    chunk: int = 0

    @property
    def action(self) -> Action:
        """The schedule action this timing belongs to."""
        return Action(self.stage, self.kind, self.microbatch, self.chunk)


@dataclass(frozen=True)
class Timeline(Deferred):
    """Per stage, the actions it ran in order with their start and end times (columnar).

    The simulator's fields are built when first read (``Deferred``)."""

    actions: tuple[tuple[Action, ...], ...] = ()
    start: tuple[Sequence[float], ...] = ()
    end: tuple[Sequence[float], ...] = ()

    def __iter__(self) -> Iterator[ActionTiming]:
        """Every action's timing, stage by stage."""
        for acts, st, en in zip(self.actions, self.start, self.end, strict=True):
            for a, t0, t1 in zip(acts, st, en, strict=True):
                yield ActionTiming(a.stage, a.kind, a.microbatch, t0, t1, a.chunk)

    def __len__(self) -> int:
        return sum(len(a) for a in self.actions)

    def stage(self, s: int) -> list[ActionTiming]:
        """Stage ``s``'s timings in execution order."""
        return [
            ActionTiming(a.stage, a.kind, a.microbatch, t0, t1, a.chunk)
            for a, t0, t1 in zip(self.actions[s], self.start[s], self.end[s], strict=True)
        ]

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-ready: one entry per stage with the actions in text form."""
        return [
            {"actions": " ".join(map(str, a)), "start": list(st), "end": list(en)}
            for a, st, en in zip(self.actions, self.start, self.end, strict=True)
        ]

    @classmethod
    def from_dict(cls, data: Sequence[dict[str, Any]]) -> Timeline:
        """Inverse of to_dict."""
        return cls(
            tuple(tuple(Action.parse(t) for t in d["actions"].split()) for d in data),
            tuple(tuple(d["start"]) for d in data),
            tuple(tuple(d["end"]) for d in data),
        )


# The fields' defaults live in __init__; off the class, a deferred field is looked up on first
# read (Deferred.__getattr__) instead of finding the class's default.
for _name in ("actions", "start", "end"):
    delattr(Timeline, _name)


@dataclass(frozen=True)
class QueueTrace(Deferred):
    """Messages on one directed link: when each arrived and when the receiver consumed it.

    The simulator's ``arrived`` and ``consumed`` are built when first read (``Deferred``).

    ``kind`` is "act" (activations, src = dst - 1) or "grad" (gradients, src = dst + 1).
    ``arrived[i]`` and ``consumed[i]`` belong to the same message.
    """

    src: int
    dst: int
    kind: str
    arrived: tuple[float, ...]
    consumed: tuple[float, ...]

    def depth_series(self) -> list[tuple[float, int]]:
        """Queue depth (arrived, not yet consumed) after each change, as (time, depth)."""
        events = sorted(
            [(t, 1) for t in self.arrived] + [(t, -1) for t in self.consumed],
            key=lambda e: (e[0], -e[1]),
        )
        depth, series = 0, []
        for t, delta in events:
            depth += delta
            series.append((t, depth))
        return series

    @property
    def max_depth(self) -> int:
        """Deepest the queue got during the step."""
        return max((d for _, d in self.depth_series()), default=0)

    def mean_depth(self, wall: float) -> float:
        """Time-averaged depth over ``[0, wall]``."""
        if wall <= 0:
            return 0.0
        area = sum(max(0.0, c - a) for a, c in zip(self.arrived, self.consumed, strict=True))
        return area / wall


@dataclass(frozen=True)
class StageStats:
    """One stage's totals for a step (seconds), plus per-layer times where measured."""

    stage: int
    compute: float
    wait: float
    wall: float
    peak_stash: int
    layers: tuple[int, ...] = ()
    layer_forward: tuple[float, ...] = ()
    layer_backward: tuple[float, ...] = ()
    peak_stash_bytes: int = 0
    weight_bytes: int = 0
    """Bytes of the weight versions the stage holds: its parameters once, twice under
    PipeDream-2BW (the version in-flight micro-batches use and the newest); 0 if not measured.
    With ``peak_stash_bytes``, what the stage keeps for backward."""
    layer_bytes: tuple[int, ...] = ()
    """Per layer (as ``layers``), the bytes a move of it would ship: parameters, buffers and
    optimizer state (the runtime measures them every step; empty from the simulator)."""

    @property
    def idle(self) -> float:
        """Wall time not spent computing (waiting, sending, bubbles)."""
        return max(0.0, self.wall - self.compute)

    @property
    def utilization(self) -> float:
        """U = compute / wall."""
        return self.compute / self.wall if self.wall > 0 else 0.0

    @property
    def bubble(self) -> float:
        """Idle fraction of this stage: 1 - U."""
        return 1.0 - self.utilization


class StepTimes(TypedDict, total=False):
    """``StepReport.extra``: seconds the runtime measured besides the stages' own figures.

    All keys are optional (the simulator sets none). A report read back keeps whatever keys
    its file had, so numbers a user added survive a JSON round trip too.
    """

    wall: float
    """The step's wall time on the slowest rank, report merging included."""
    optimizer: float
    """The longest optimizer update of any rank."""
    change: float
    """Time spent applying plan changes (decisions) since the previous step."""
    offset: float
    """The step's start, seconds from the earliest rank's pipeline start."""


@dataclass(frozen=True)
class StepReport:
    """Everything measured (or simulated) about one training step."""

    step: int
    schedule: str
    microbatches: int
    step_time: float
    stages: tuple[StageStats, ...]
    queues: tuple[QueueTrace, ...] = ()
    timeline: Timeline = field(default_factory=Timeline)
    partition: tuple[int, ...] = ()
    source: str = "simulator"
    loss: float | None = None
    events: tuple[str, ...] = ()
    extra: StepTimes = field(default_factory=lambda: StepTimes())
    batch: int = 0
    """Samples in the step's mini-batch (0: not known, as from the simulator)."""

    @property
    def num_stages(self) -> int:
        """Number of stages reported."""
        return len(self.stages)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all stage-time: sum(wall - compute) / sum(wall)."""
        wall = sum(s.wall for s in self.stages)
        return sum(s.idle for s in self.stages) / wall if wall > 0 else 0.0

    @property
    def utilization(self) -> tuple[float, ...]:
        """Per-stage U = compute / wall."""
        return tuple(s.utilization for s in self.stages)

    @property
    def peak_stash(self) -> tuple[int, ...]:
        """Per-stage peak number of stashed activations."""
        return tuple(s.peak_stash for s in self.stages)

    @property
    def peak_stash_bytes(self) -> tuple[int, ...]:
        """Per-stage peak bytes of activations kept for backward (0 where not measured)."""
        return tuple(s.peak_stash_bytes for s in self.stages)

    @property
    def stage_compute(self) -> tuple[float, ...]:
        """Per-stage compute seconds."""
        return tuple(s.compute for s in self.stages)

    def queue(self, src: int, dst: int) -> QueueTrace:
        """The trace of the link src -> dst."""
        for q in self.queues:
            if q.src == src and q.dst == dst:
                return q
        raise KeyError(f"no queue from stage {src} to stage {dst} in this report")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (derived figures included for readers of the file)."""
        data = asdict(replace(self, timeline=Timeline()))
        data["timeline"] = self.timeline.to_dict()
        data["bubble_fraction"] = self.bubble_fraction
        data["utilization"] = list(self.utilization)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepReport:
        """Inverse of to_dict."""
        return cls(
            step=int(data["step"]),
            schedule=str(data["schedule"]),
            microbatches=int(data["microbatches"]),
            step_time=float(data["step_time"]),
            stages=tuple(
                StageStats(
                    stage=s["stage"],
                    compute=s["compute"],
                    wait=s["wait"],
                    wall=s["wall"],
                    peak_stash=s["peak_stash"],
                    layers=tuple(s.get("layers", ())),
                    layer_forward=tuple(s.get("layer_forward", ())),
                    layer_backward=tuple(s.get("layer_backward", ())),
                    peak_stash_bytes=int(s.get("peak_stash_bytes", 0)),
                    weight_bytes=int(s.get("weight_bytes", 0)),
                    layer_bytes=tuple(s.get("layer_bytes", ())),
                )
                for s in data["stages"]
            ),
            queues=tuple(
                QueueTrace(q["src"], q["dst"], q["kind"], tuple(q["arrived"]), tuple(q["consumed"]))
                for q in data.get("queues", ())
            ),
            timeline=Timeline.from_dict(data.get("timeline", ())),
            partition=tuple(data.get("partition", ())),
            source=str(data.get("source", "simulator")),
            loss=data.get("loss"),
            events=tuple(data.get("events", ())),
            extra=cast(StepTimes, dict(data.get("extra", {}))),
            batch=int(data.get("batch", 0)),
        )


def append_jsonl(path: str | Path, report: StepReport) -> None:
    """Append one report as a JSON line (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(report.to_dict()) + "\n")


def read_jsonl(path: str | Path) -> list[StepReport]:
    """Read every report from a JSON-lines file written by append_jsonl."""
    reports = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                reports.append(StepReport.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
                raise ValueError(f"{path}:{lineno}: not a step report ({exc})") from exc
    return reports


def summarize(reports: Sequence[StepReport]) -> str:
    """One line per report: step, step time, bubble and per-stage U."""
    lines = []
    for r in reports:
        util = " ".join(f"{u:5.1%}" for u in r.utilization)
        lines.append(
            f"step {r.step:4d}  {r.step_time * 1e3:8.2f} ms  "
            f"bubble {r.bubble_fraction:6.2%}  U {util}"
        )
    return "\n".join(lines)
