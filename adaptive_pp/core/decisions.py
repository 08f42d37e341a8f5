"""Controller decisions and the plan they change, as plain data.

A controller looks at a StepReport and the current Plan and returns a Decision: ``Keep``,
``SetMicrobatches``, ``MoveLayers`` or ``SetSchedule``. ``apply(plan, decision)`` gives the next
plan or raises ValueError naming what is wrong; ``to_dict``/``from_dict`` turn decisions into
JSON-ready dicts for logs and checkpoints. Nothing here touches torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .partition import Partition
from .schedules import ASYNC_SCHEDULES, SCHEDULE_NAMES

if TYPE_CHECKING:
    from .report import StepReport


@dataclass(frozen=True)
class Keep:
    """Leave the plan as it is."""

    reason: str = ""


@dataclass(frozen=True)
class SetMicrobatches:
    """Run the next steps with ``microbatches`` micro-batches per step."""

    microbatches: int
    reason: str = ""


@dataclass(frozen=True)
class MoveLayers:
    """Move ``count`` boundary layers from stage ``src`` to its neighbour ``dst``."""

    src: int
    dst: int
    count: int
    reason: str = ""


@dataclass(frozen=True)
class SetSchedule:
    """Run the next steps under schedule ``schedule`` (one of SCHEDULE_NAMES), same M."""

    schedule: str
    reason: str = ""


Decision = Keep | SetMicrobatches | MoveLayers | SetSchedule

_KINDS: dict[str, type[Keep] | type[SetMicrobatches] | type[MoveLayers] | type[SetSchedule]] = {
    "keep": Keep,
    "set_microbatches": SetMicrobatches,
    "move_layers": MoveLayers,
    "set_schedule": SetSchedule,
}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_microbatches(m: object) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"a step needs at least 1 micro-batch (an int), got {m!r}")
    return m


def _check_schedule(name: object, names: tuple[str, ...] = SCHEDULE_NAMES) -> str:
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(names)}")
    return name


@dataclass(frozen=True)
class Plan:
    """What the pipeline runs: the partition, micro-batches per step, the schedule name and,
    for 2BW, its lead (forwards each rank runs ahead of the next; see core.twobw)."""

    partition: Partition
    microbatches: int
    schedule: str = "1f1b"
    lead: int = 1

    def __post_init__(self) -> None:
        _check_microbatches(self.microbatches)
        _check_schedule(self.schedule, SCHEDULE_NAMES + ASYNC_SCHEDULES)  # 2BW: not a switch
        if not _is_int(self.lead) or self.lead < 1 or (self.lead != 1 and self.schedule != "2bw"):
            raise ValueError(f"lead must be 1, or an int >= 1 under 2bw; got {self.lead!r}")

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return self.partition.num_stages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            "bounds": list(self.partition.bounds),
            "microbatches": self.microbatches,
            "schedule": self.schedule,
        }
        if self.lead != 1:
            out["lead"] = self.lead
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of to_dict."""
        return cls(
            Partition(tuple(data["bounds"])),
            int(data["microbatches"]),
            str(data.get("schedule", "1f1b")),
            int(data.get("lead", 1)),
        )

    def __str__(self) -> str:
        lead = f" lead {self.lead}" if self.lead != 1 else ""
        return f"[{self.partition}] M={self.microbatches} {self.schedule}{lead}"


def apply(plan: Plan, decision: Decision) -> Plan:
    """The plan after ``decision``; raise ValueError if the decision does not fit ``plan``."""
    if isinstance(decision, Keep):
        return plan
    if isinstance(decision, SetMicrobatches):
        m = _check_microbatches(decision.microbatches)
        return replace(plan, microbatches=m)
    if isinstance(decision, MoveLayers):
        src, dst, count = decision.src, decision.dst, decision.count
        if not (_is_int(src) and _is_int(dst) and _is_int(count)):
            raise ValueError(f"MoveLayers needs int src, dst, count, got {decision!r}")
        # Partition.move checks neighbours, count >= 1 and that src keeps a layer.
        return replace(plan, partition=plan.partition.move(src, dst, count))
    if isinstance(decision, SetSchedule):
        to = _check_schedule(decision.schedule)
        if plan.schedule in ASYNC_SCHEDULES:
            raise ValueError(
                f"cannot switch schedule {plan.schedule} -> {to}: {plan.schedule} (no flush "
                "between steps) is chosen in PipelineConfig.schedule at the start"
            )
        return replace(plan, schedule=to)
    raise TypeError(f"not a decision: {decision!r}")


def to_dict(decision: Decision) -> dict[str, Any]:
    """JSON-ready form, e.g. ``{"kind": "move_layers", "src": 1, "dst": 2, "count": 1, ...}``."""
    if isinstance(decision, Keep):
        return {"kind": "keep", "reason": decision.reason}
    if isinstance(decision, SetMicrobatches):
        return {
            "kind": "set_microbatches",
            "microbatches": decision.microbatches,
            "reason": decision.reason,
        }
    if isinstance(decision, MoveLayers):
        return {
            "kind": "move_layers",
            "src": decision.src,
            "dst": decision.dst,
            "count": decision.count,
            "reason": decision.reason,
        }
    if isinstance(decision, SetSchedule):
        return {"kind": "set_schedule", "schedule": decision.schedule, "reason": decision.reason}
    raise TypeError(f"not a decision: {decision!r}")


def from_dict(data: Mapping[str, Any]) -> Decision:
    """Inverse of to_dict; raise ValueError on an unknown kind or missing field."""
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown decision kind {kind!r}; expected one of {', '.join(_KINDS)}")
    reason = str(data.get("reason", ""))
    try:
        if kind == "keep":
            return Keep(reason)
        if kind == "set_microbatches":
            return SetMicrobatches(int(data["microbatches"]), reason)
        if kind == "set_schedule":
            return SetSchedule(str(data["schedule"]), reason)
        return MoveLayers(int(data["src"]), int(data["dst"]), int(data["count"]), reason)
    except KeyError as exc:
        raise ValueError(f"decision {kind!r} is missing field {exc.args[0]!r}") from exc


def describe(decision: Decision) -> str:
    """Short human-readable form, e.g. ``move 2 layer(s) 1->2``."""
    if isinstance(decision, Keep):
        text = "keep"
    elif isinstance(decision, SetMicrobatches):
        text = f"set M={decision.microbatches}"
    elif isinstance(decision, SetSchedule):
        text = f"set schedule {decision.schedule}"
    else:
        text = f"move {decision.count} layer(s) {decision.src}->{decision.dst}"
    return f"{text} ({decision.reason})" if decision.reason else text


@runtime_checkable
class Controller(Protocol):
    """Anything that turns the latest step report and the current plan into a decision."""

    def decide(self, report: StepReport, plan: Plan) -> Decision:
        """Decide what to change (if anything) before the next step."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state, saved in checkpoints."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned."""
        ...
