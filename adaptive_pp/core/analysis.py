"""Reading a measured step: messages matched to the actions around them, waits, and a replay.

Rules (the Chrome trace, the plots and the tests all use them):

- The k-th message consumed on a link (in consumption order) feeds the k-th action of that
  kind on the receiving stage: stages take their inputs in execution order. A link without a
  ``QueueTrace`` gets arrival = the producer's end (no hop time) and consumption = the
  consumer's start.
- An action *waited* when its input (activation for F on stages > 0, gradient for B on all
  but the last stage) arrived after the stage's previous action ended (the step start, 0, for
  the first action); its ``wait`` slice spans that previous end to the action's start. Inputs
  that were already queued leave the gap unmarked (sends, bookkeeping). For simulated
  reports the wait slices of a stage add up to ``StageStats.wait`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

from .report import ActionTiming, QueueTrace, StepReport
from .schedules import Kind, Schedule
from .simulator import Costs, simulate


class Message(NamedTuple):
    """One activation or gradient: who produced it, when it arrived, who consumed it when."""

    src: int
    dst: int
    kind: str
    microbatch: int
    arrived: float
    consumed: float
    producer: ActionTiming | None
    consumer: ActionTiming


class Wait(NamedTuple):
    """A stage blocked from ``start`` to ``end`` on the late input of ``action``."""

    stage: int
    start: float
    end: float
    action: ActionTiming
    arrived: float


_INPUT_KIND: dict[str, Kind] = {"act": "F", "grad": "B"}


def _consumer(report: StepReport, stage: int, queue_kind: str) -> Kind | None:
    """The action kind that consumes ``queue_kind`` messages on ``stage``: F for activations;
    for gradients B, or I where the backward is split (zero-bubble schedules)."""
    kind = _INPUT_KIND.get(queue_kind)
    if kind == "B" and any(t.kind == "I" for t in report.timeline.stage(stage)):
        return "I"
    return kind


def _links(report: StepReport) -> list[QueueTrace]:
    """The report's queue traces, plus timeline-derived ones for links it has no trace of."""
    traced = {(q.src, q.dst) for q in report.queues}
    out = list(report.queues)
    by_key = {(t.stage, t.kind, t.microbatch): t for t in report.timeline}
    for s in range(len(report.timeline.actions)):
        for src, kind in ((s - 1, "act"), (s + 1, "grad")):
            if (src, s) in traced or not 0 <= src < len(report.timeline.actions):
                continue
            consumer = _consumer(report, s, kind)
            pairs = [
                (by_key[(src, t.kind, t.microbatch)].end, t.start)
                for t in report.timeline.stage(s)
                if t.kind == consumer and (src, t.kind, t.microbatch) in by_key
            ]
            out.append(
                QueueTrace(src, s, kind, tuple(a for a, _ in pairs), tuple(c for _, c in pairs))
            )
    return out


def messages(report: StepReport) -> list[Message]:
    """Every message of the step, matched to its producing and consuming actions."""
    by_key = {(t.stage, t.kind, t.microbatch): t for t in report.timeline}
    out = []
    for q in _links(report):
        if not 0 <= q.dst < len(report.timeline.actions):
            continue
        kind = _consumer(report, q.dst, q.kind)
        if kind is None:
            continue
        consumers = [t for t in report.timeline.stage(q.dst) if t.kind == kind]
        pairs = sorted(zip(q.consumed, q.arrived, strict=True))
        for (consumed, arrived), t in zip(pairs, consumers, strict=False):
            producer = by_key.get((q.src, kind, t.microbatch))
            out.append(Message(q.src, q.dst, q.kind, t.microbatch, arrived, consumed, producer, t))
    return out


def _previous_ends(report: StepReport) -> dict[tuple[int, Kind, int], float]:
    """When each action's stage ended its previous action (0.0, the step start, for the first)."""
    out = {}
    for s in range(len(report.timeline.actions)):
        end = 0.0
        for t in report.timeline.stage(s):
            out[(s, t.kind, t.microbatch)] = end
            end = t.end
    return out


def waits(report: StepReport) -> list[Wait]:
    """Where each stage was blocked on a late input (see the module docstring for the rule)."""
    arrival = {(m.dst, m.consumer.kind, m.microbatch): m.arrived for m in messages(report)}
    prev_end = _previous_ends(report)
    out = []
    for t in report.timeline:
        key = (t.stage, t.kind, t.microbatch)
        arrived, prev = arrival.get(key), prev_end[key]
        if arrived is not None and arrived > prev and t.start > prev:
            out.append(Wait(t.stage, prev, t.start, t, arrived))
    return out


def hop_latencies(report: StepReport) -> list[float]:
    """Per hop (stage h to h+1, both directions), the delay a waiting consumer saw.

    The median, over the messages the consumer had to wait for (its previous action ended
    before the producer's), of the consumer's start minus the producer's end: sending and
    waking included. A hop with no such message takes the median of (arrival - producer's end).
    """
    stages = len(report.timeline.actions)
    prev_end = _previous_ends(report)
    msgs = messages(report)
    hops = []
    for h in range(stages - 1):
        on_hop = [m for m in msgs if {m.src, m.dst} == {h, h + 1}]
        waited = sorted(
            max(0.0, m.consumer.start - m.producer.end)
            for m in on_hop
            if m.producer is not None
            and prev_end[(m.dst, m.consumer.kind, m.microbatch)] < m.producer.end
        )
        gaps = waited or sorted(
            max(0.0, m.arrived - m.producer.end) for m in on_hop if m.producer is not None
        )
        hops.append(gaps[len(gaps) // 2] if gaps else 0.0)
    return hops


def replay_measured(report: StepReport, hops: Sequence[float] | None = None) -> StepReport:
    """The simulator's replay of a step with its measured action durations and hop latency.

    ``hops`` defaults to ``hop_latencies(report)``; pass zeros for what the same action
    durations would give with free communication. The replay keeps the step's number, events
    and timing extras, so side_by_side aligns steps.
    """
    stages, m_count = len(report.timeline.actions), report.microbatches
    tau: dict[Kind, list[list[float]]] = {
        k: [[0.0] * m_count for _ in range(stages)] for k in ("F", "B", "I", "W")
    }
    for t in report.timeline:
        tau[t.kind][t.stage][t.microbatch] = max(0.0, t.end - t.start)
    hop = list(hop_latencies(report) if hops is None else hops)
    sched = Schedule(report.timeline.actions, m_count, report.schedule)
    split = any(t.kind == "W" for t in report.timeline)
    if split:  # the simulator takes a split backward as B = I + W and W
        backward = [
            [i + w for i, w in zip(ri, rw, strict=True)]
            for ri, rw in zip(tau["I"], tau["W"], strict=True)
        ]
        costs = Costs.build(stages, m_count, tau["F"], backward, hop, tau_w=tau["W"])
    else:
        costs = Costs.build(stages, m_count, tau["F"], tau["B"], hop)
    sim = simulate(sched, costs, step=report.step)
    return replace(sim, partition=report.partition, events=report.events, extra=report.extra)
