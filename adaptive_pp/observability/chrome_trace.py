"""Chrome trace export: step reports as Trace Event Format JSON (Perfetto, chrome://tracing).

Layout of one run (``pid_base`` shifts every pid, so several runs share a file):

- one process per stage, ``"stage N"`` (pid ``pid_base + N``, pids from 1), a ``compute`` thread
  holding an ``X`` slice per action (``F3``/``B3``) and per ``wait``, and an ``inbox`` thread
  with a ``recv`` instant where each message arrived; ``C`` counters for the depth of each
  incoming queue and for the stage's utilization per step;
- one ``"steps"`` process (pid ``pid_base + S``): a slice per step (loss, bubble, U in args),
  a bubble counter, and an ``apply decisions`` slice where the runtime spent time applying
  decisions before a step; ``i`` instants at that boundary for each ``report.events`` entry
  (migrations, M changes, refusals), global, or on the steps process when the run is labelled;
- a flow arrow (``s`` then ``f``) per message, from the producing action on the sender's
  compute thread to the consuming action on the receiver's.

Thread ids are ``10 * pid + 1`` (compute) and ``10 * pid + 2`` (inbox): unique in the file and
never 0 (some Perfetto versions merge tid 0 into tid 1).

Messages are matched to actions and waits marked by the rules in ``adaptive_pp.analysis``.
Steps lie end to end: step k starts at its ``extra["offset"]`` (seconds from the first step's
start) when every report has one, else at the previous start + the previous span
(``max(step_time, extra["wall"])``) + this step's ``extra["change"]`` (the time spent applying
decisions just before it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.analysis import Message, messages, waits
from ..core.report import StepReport, read_jsonl

US = 1e6  # trace timestamps are microseconds
_NUDGE_US = 1e-3  # flow ends sit 1 ns inside their slices so viewers bind them to it
_COLOUR = {
    "F": "thread_state_running",
    "B": "rail_load",
    "I": "rail_load",
    "W": "rail_animation",
    "wait": "thread_state_iowait",
}
_CATEGORY = {"F": "forward", "B": "backward", "I": "backward.input", "W": "backward.weight"}
COMPUTE, INBOX = 1, 2  # thread tid = 10 * pid + this: unique in the file, never 0

Event = dict[str, Any]


class RunDirError(ValueError):
    """A run directory without a readable reports.jsonl."""


def load_run(run_dir: str | Path) -> list[StepReport]:
    """The reports in ``RUN_DIR/reports.jsonl`` (or that file); RunDirError naming it if none."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "reports.jsonl"
    if not path.is_file():
        raise RunDirError(
            f"{path}: no such file; a run directory holds reports.jsonl "
            "(written when PipelineConfig(run_dir=...) is set)"
        )
    try:
        reports = read_jsonl(path)
    except (ValueError, OSError) as exc:
        raise RunDirError(f"{path} is malformed: {exc}") from exc
    if not reports:
        raise RunDirError(f"{path} holds no step reports")
    return reports


def _span(report: StepReport) -> float:
    return max(report.step_time, float(report.extra.get("wall", 0.0)))


def step_offsets(reports: Sequence[StepReport]) -> list[float]:
    """Start of each step in seconds from the first step's start (see the module docstring)."""
    if reports and all("offset" in r.extra for r in reports):
        first = float(reports[0].extra["offset"])
        return [float(r.extra["offset"]) - first for r in reports]
    out, t = [], 0.0
    for i, r in enumerate(reports):
        if i:
            t += _span(reports[i - 1]) + float(r.extra.get("change", 0.0))
        out.append(t)
    return out


def event_kind(text: str) -> str:
    """Category of a report event: refused, migration, microbatches or other."""
    if text.startswith("refused"):
        return "refused"
    if text.startswith("moved"):
        return "migration"
    return "microbatches" if "micro-batches" in text or "microbatches" in text else "other"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _layers(report: StepReport, s: int) -> str | None:
    if s < len(report.stages) and report.stages[s].layers:
        ids = report.stages[s].layers
        return f"{ids[0]}-{ids[-1]}" if list(ids) == list(range(ids[0], ids[-1] + 1)) else str(ids)
    if s + 1 < len(report.partition):
        return f"{report.partition[s]}-{report.partition[s + 1] - 1}"
    return None


@dataclass
class _Builder:
    """Accumulates the events of one run; pids start at ``pid_base``."""

    label: str | None
    pid_base: int
    events: list[Event]
    flow_id: int = 0

    def add(
        self, ph: str, name: str, ts: float, pid: int, thread: int = COMPUTE, **fields: Any
    ) -> None:
        """Append one event (``ts`` and a slice's ``end`` in microseconds, to the nanosecond)."""
        tid = 10 * pid + thread
        event: Event = {"ph": ph, "name": name, "ts": round(ts, 3), "pid": pid, "tid": tid}
        if "end" in fields:  # slices: the duration between the rounded ends
            fields["dur"] = round(max(0.0, round(fields.pop("end"), 3) - event["ts"]), 3)
        event.update(fields)
        self.events.append(event)

    def slice(
        self, name: str, us: float, span: tuple[float, float], pid: int, **fields: Any
    ) -> None:
        """An ``X`` slice over ``span`` (seconds after the step start at ``us``)."""
        self.add("X", name, us + span[0] * US, pid, end=us + span[1] * US, **fields)

    def meta(self, pid: int, name: str, threads: Iterable[tuple[int, str]]) -> None:
        prefix = f"{self.label}: " if self.label else ""
        self.add("M", "process_name", 0, pid, args={"name": prefix + name})
        self.add("M", "process_sort_index", 0, pid, args={"sort_index": pid})
        for thread, thread_name in threads:
            self.add("M", "thread_name", 0, pid, thread, args={"name": thread_name})

    def step(self, r: StepReport, offset: float, steps_pid: int) -> None:
        us, pid = offset * US, self.pid_base
        for t in r.timeline:
            args: dict[str, Any] = {"microbatch": t.microbatch, "step": r.step, "stage": t.stage}
            if (layers := _layers(r, t.stage)) is not None:
                args["layers"] = layers
            cat = _CATEGORY[t.kind]
            name, span = f"{t.kind}{t.microbatch}", (t.start, t.end)
            self.slice(name, us, span, pid + t.stage, cat=cat, args=args, cname=_COLOUR[t.kind])
        for w in waits(r):
            args = {
                "for": f"{w.action.kind}{w.action.microbatch}",
                "step": r.step,
                "input_arrived_ms": w.arrived * 1e3,
            }
            span, cname = (w.start, w.end), _COLOUR["wait"]
            self.slice("wait", us, span, pid + w.stage, cat="wait", args=args, cname=cname)
        for m in messages(r):
            self._message(r.step, m, us)
        for q in r.queues:
            name = f"queue {q.kind} from stage {q.src}"
            self.add("C", name, us, pid + q.dst, args={"depth": 0})
            for t_s, depth in q.depth_series():
                self.add("C", name, us + t_s * US, pid + q.dst, args={"depth": depth})
        for st in r.stages:
            self.add("C", "utilization", us, pid + st.stage, args={"U %": 100 * st.utilization})
        self._step_track(r, us, steps_pid)

    def _message(self, step: int, m: Message, us: float) -> None:
        dst, src = self.pid_base + m.dst, self.pid_base + m.src
        args = {"from stage": m.src, "step": step, "queued_ms": (m.consumed - m.arrived) * 1e3}
        name, at = f"recv {m.kind} {m.microbatch}", us + m.arrived * US
        self.add("i", name, at, dst, INBOX, cat="message", s="t", args=args)
        if m.producer is None:
            return
        self.flow_id += 1
        p, c = m.producer, m.consumer
        send = max(round(us + p.start * US, 3), round(us + p.end * US, 3) - _NUDGE_US)
        take = min(round(us + c.end * US, 3), round(us + c.start * US, 3) + _NUDGE_US)
        self.add("s", m.kind, send, src, COMPUTE, cat="message", id=self.flow_id)
        self.add("f", m.kind, take, dst, COMPUTE, cat="message", id=self.flow_id, bp="e")

    def _step_track(self, r: StepReport, us: float, pid: int) -> None:
        util = r.utilization
        args: dict[str, Any] = {
            "source": r.source,
            "schedule": r.schedule,
            "microbatches": r.microbatches,
            "loss": _finite(r.loss),
            "bubble %": 100 * r.bubble_fraction,
            "U min %": 100 * min(util, default=0.0),
            "U mean %": 100 * (sum(util) / len(util) if util else 0.0),
        }
        if r.partition:
            args["partition"] = str(r.partition)
        self.slice(f"step {r.step}", us, (0.0, r.step_time), pid, cat="step", args=args)
        self.add("C", "bubble", us, pid, args={"bubble %": 100 * r.bubble_fraction})
        change = float(r.extra.get("change", 0.0))
        at = us - change * US
        if change > 0:
            args = {"step": r.step, "events": list(r.events)}
            self.slice("apply decisions", us, (-change, 0.0), pid, thread=INBOX, args=args)
        scope = "g" if self.label is None else "p"
        for text in r.events:
            self.add("i", text, at, pid, cat=event_kind(text), s=scope, args={"step": r.step})


def chrome_trace(
    reports: Sequence[StepReport], *, label: str | None = None, pid_base: int = 1
) -> dict[str, Any]:
    """A Trace Event Format object (``{"traceEvents": [...]}``) for consecutive step reports.

    ``label`` prefixes the process names (and makes decision markers process-scoped, so two
    runs in one file keep their own); ``pid_base`` is the first pid used.
    """
    stages = max((len(r.timeline.actions) for r in reports), default=0)
    stages = max(stages, max((r.num_stages for r in reports), default=0))
    b = _Builder(label, pid_base, [])
    for s in range(stages):
        b.meta(pid_base + s, f"stage {s}", ((COMPUTE, "compute"), (INBOX, "inbox")))
    steps_pid = pid_base + stages
    b.meta(steps_pid, "steps", ((COMPUTE, "steps"), (INBOX, "decisions")))
    for r, offset in zip(reports, step_offsets(reports), strict=True):
        b.step(r, offset, steps_pid)
    return {
        "traceEvents": b.events,
        "displayTimeUnit": "ms",
        "otherData": {
            "generator": f"adaptive_pp {__version__}",
            "label": label or "",
            "steps": len(reports),
            "source": ",".join(sorted({r.source for r in reports})),
        },
    }


def merge(*traces: Mapping[str, Any]) -> dict[str, Any]:
    """One trace out of several (pids must differ); flow ids are renumbered to stay unique."""
    events: list[Event] = []
    seen: set[int] = set()
    shift = 0
    for trace in traces:
        evs = trace["traceEvents"]
        pids = {e["pid"] for e in evs}
        if pids & seen:
            raise ValueError(f"traces share pids {sorted(pids & seen)}: build them with pid_base")
        seen |= pids
        top = 0
        for e in evs:
            if e["ph"] in ("s", "t", "f"):
                e = {**e, "id": e["id"] + shift}
                top = max(top, e["id"])
            events.append(e)
        shift = max(shift, top)
    labels = [str(t.get("otherData", {}).get("label", "")) for t in traces]
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"generator": f"adaptive_pp {__version__}", "label": " | ".join(labels)},
    }


def side_by_side(runs: Mapping[str, Sequence[StepReport]]) -> dict[str, Any]:
    """Several runs (``{"measured": ..., "simulated": ...}``) in one trace, on one time axis."""
    traces, base = [], 1
    for label, reports in runs.items():
        traces.append(chrome_trace(reports, label=label, pid_base=base))
        base += max((max(len(r.timeline.actions), r.num_stages) for r in reports), default=0) + 1
    return merge(*traces)


def write_chrome_trace(
    path: str | Path,
    reports: Sequence[StepReport] | Mapping[str, Any],
    *,
    label: str | None = None,
) -> Path:
    """Write a trace (or the trace of ``reports``) as JSON; returns the path."""
    trace = reports if isinstance(reports, Mapping) else chrome_trace(reports, label=label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        json.dump(trace, fh, separators=(",", ":"), allow_nan=False)
    return path
