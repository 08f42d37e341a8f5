"""The step report of a pipeline run: each rank's share, merged on every rank after a step."""

from __future__ import annotations

from typing import Any

from ..core.report import QueueTrace, StageStats, StepReport, Timeline
from ..core.schedules import Action
from .comm import Link, MessageKind
from .layerstate import layer_name, named_params, state_bytes
from .local import LocalStage
from .stagelog import StageLog


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
    its chunks, gradients from the rank after (one trace per link and kind, as simulated)."""
    out: list[tuple[Link, MessageKind]] = []
    for w in local.workers:
        for ln, kind in ((w.up, MessageKind.ACT), (w.down, MessageKind.GRAD)):
            if ln is not None and not any(ln is a and kind == b for a, b in out):
                out.append((ln, kind))
    return out


def merge_parts(local: LocalStage, parts: list[dict[str, Any]], wall: float) -> StepReport:
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
        step=local.step_count,
        schedule=local.schedule.name,
        microbatches=local.microbatches,
        step_time=step_time,
        stages=stages,
        queues=queues,
        timeline=timeline,
        partition=local.partition.bounds,
        source="runtime",
        loss=parts[-1]["loss"],
        events=tuple(local.pending_events),
        extra={
            "wall": wall,
            "optimizer": max(p["optimizer"] for p in parts),
            "change": local.change_s,
            "offset": min(p["since"] for p in parts),
        },
        batch=max(p["batch"] for p in parts),
    )
