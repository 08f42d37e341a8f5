"""Pipeline schedules as plain data: actions per stage, generators, text form and validator.

A schedule lists, for each stage, the actions it runs in order. ``Action(1, "F", 3)`` (text
``1F3``) is stage 1's forward of micro-batch 3; ``B`` is the backward. Clock table of 1F1B for
S=3, M=4 (one column per unit of time, forward and backward one unit each)::

    stage 0: F0 F1 F2 .. .. B0 F3 B1 .. B2 .. B3
    stage 1: .. F0 F1 .. B0 F2 B1 F3 B2 .. B3 ..
    stage 2: .. .. F0 B0 F1 B1 F2 B2 F3 B3 .. ..

GPipe runs every forward first, then every backward, so stage s stashes all M activations;
1F1B stashes at most ``min(S - s, M)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B"]
KINDS: tuple[Kind, ...] = ("F", "B")
SCHEDULE_NAMES = ("1f1b", "gpipe")

_ACTION_RE = re.compile(r"^(\d+)([FB])(\d+)$", re.ASCII)  # ASCII digits only


class ScheduleError(ValueError):
    """A schedule that cannot run; names the stage and action at fault."""

    def __init__(self, message: str, stage: int | None = None, action: Action | None = None):
        super().__init__(message)
        self.stage = stage
        self.action = action


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work: ``kind`` ("F" or "B") of ``microbatch`` on ``stage``."""

    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the compact form, e.g. ``"1F3"``."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"not an action: {text!r} (expected e.g. '1F3': stage, F|B, micro-batch)"
            )
        kind: Kind = "F" if match.group(2) == "F" else "B"
        return cls(int(match.group(1)), kind, int(match.group(3)))


@dataclass(frozen=True)
class Schedule:
    """Actions per stage (``stages[s]`` runs in order on stage ``s``) over ``microbatches``."""

    stages: tuple[tuple[Action, ...], ...]
    microbatches: int
    name: str = "custom"

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stages)

    def __iter__(self) -> Iterator[tuple[Action, ...]]:
        """Iterate over the stages' action tuples."""
        return iter(self.stages)

    def to_text(self) -> str:
        """One line per stage, e.g. ``0: 0F0 0F1 0B0 0B1``; round-trips through from_text."""
        return "\n".join(
            f"{s}: " + " ".join(str(a) for a in actions) for s, actions in enumerate(self.stages)
        )

    @classmethod
    def from_text(
        cls, text: str, microbatches: int | None = None, name: str = "custom"
    ) -> Schedule:
        """Parse the form written by to_text; M defaults to the largest micro-batch id + 1."""
        stages: list[tuple[Action, ...]] = []
        for lineno, raw in enumerate(text.strip().splitlines()):
            head, sep, body = raw.partition(":")
            if not sep or head.strip() != str(lineno):
                raise ValueError(f"line {lineno + 1}: expected '{lineno}: <actions>', got {raw!r}")
            stages.append(tuple(Action.parse(tok) for tok in body.split()))
        if microbatches is None:
            microbatches = 1 + max((a.microbatch for acts in stages for a in acts), default=-1)
        return cls(tuple(stages), microbatches, name)


def _check_sizes(num_stages: int, microbatches: int) -> None:
    if num_stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {num_stages}")
    if microbatches < 1:
        raise ValueError(f"a step needs at least 1 micro-batch, got {microbatches}")


def gpipe(num_stages: int, microbatches: int) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards (in micro-batch order)."""
    _check_sizes(num_stages, microbatches)
    stages = tuple(
        tuple(Action(s, "F", m) for m in range(microbatches))
        + tuple(Action(s, "B", m) for m in range(microbatches))
        for s in range(num_stages)
    )
    return Schedule(stages, microbatches, "gpipe")


def one_f_one_b(num_stages: int, microbatches: int) -> Schedule:
    """Non-interleaved 1F1B: min(S-s-1, M) warm-up forwards, then alternate F and B, then drain."""
    _check_sizes(num_stages, microbatches)
    stages = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, microbatches)
        acts = [Action(s, "F", m) for m in range(warmup)]
        for i in range(microbatches - warmup):
            acts.append(Action(s, "F", warmup + i))
            acts.append(Action(s, "B", i))
        acts.extend(Action(s, "B", m) for m in range(microbatches - warmup, microbatches))
        stages.append(tuple(acts))
    return Schedule(tuple(stages), microbatches, "1f1b")


def make_schedule(name: str, num_stages: int, microbatches: int) -> Schedule:
    """Build a schedule by name: ``"1f1b"`` or ``"gpipe"``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "1f1b":
        return one_f_one_b(num_stages, microbatches)
    if key == "gpipe":
        return gpipe(num_stages, microbatches)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")


def _dependency(action: Action, num_stages: int) -> Action | None:
    """The action on another stage whose output ``action`` consumes, if any."""
    if action.kind == "F":
        return Action(action.stage - 1, "F", action.microbatch) if action.stage > 0 else None
    if action.stage < num_stages - 1:
        return Action(action.stage + 1, "B", action.microbatch)
    return None


@dataclass(frozen=True)
class Compiled:
    """A checked schedule in flat form: per stage, ``m`` for F of m and ``~m`` for B of m."""

    signed: tuple[list[int], ...]
    pos_f: tuple[list[int], ...]
    pos_b: tuple[list[int], ...]
    peak: tuple[int, ...]


def compile_schedule(schedule: Schedule) -> Compiled:
    """Check each stage runs every F and B exactly once, F before B; return the flat form."""
    num_stages, m_count = schedule.num_stages, schedule.microbatches
    _check_sizes(num_stages, m_count)
    signed, pos_fs, pos_bs, peaks = [], [], [], []
    for s, actions in enumerate(schedule.stages):
        pos_f, pos_b = [-1] * m_count, [-1] * m_count
        flags = [a.kind == "F" for a in actions]
        ids = [a.microbatch for a in actions]
        live = peak = 0
        for i, a in enumerate(actions):
            m = ids[i]
            if a.stage != s:
                raise ScheduleError(f"stage {s}: action {a} belongs to stage {a.stage}", s, a)
            if not 0 <= m < m_count:
                raise ScheduleError(
                    f"stage {s}: action {a} names micro-batch {m}, outside 0..{m_count - 1}", s, a
                )
            slot = pos_f if flags[i] else pos_b
            if slot[m] >= 0:
                raise ScheduleError(f"stage {s}: action {a} appears twice", s, a)
            if not flags[i] and pos_f[m] < 0:
                raise ScheduleError(
                    f"stage {s}: backward {a} comes before its forward {s}F{m}", s, a
                )
            slot[m] = i
            live += 1 if flags[i] else -1
            if live > peak:
                peak = live
        for kind, slot in (("F", pos_f), ("B", pos_b)):
            if -1 in slot:
                missing = Action(s, "F" if kind == "F" else "B", slot.index(-1))
                raise ScheduleError(f"stage {s}: action {missing} is missing", s, missing)
        signed.append([m if f else ~m for f, m in zip(flags, ids, strict=True)])
        pos_fs.append(pos_f)
        pos_bs.append(pos_b)
        peaks.append(peak)
    return Compiled(tuple(signed), tuple(pos_fs), tuple(pos_bs), tuple(peaks))


@dataclass(frozen=True)
class Replay:
    """Times from replaying a schedule: ``start[s][i]``/``end[s][i]`` of stage s's i-th action."""

    start: list[list[float]]
    end: list[list[float]]
    waited: list[float]


def replay(
    schedule: Schedule,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_c: Sequence[float],
    compiled: Compiled | None = None,
) -> Replay:
    """Run each stage's actions in order, each once the stage is free and its input arrived.

    ``F(s, m)`` needs ``F(s-1, m)`` plus hop time ``tau_c[s-1]``; ``B(s, m)`` needs
    ``B(s+1, m)`` plus ``tau_c[s]``. Raises ScheduleError naming the stuck actions on deadlock.
    """
    code = compiled if compiled is not None else compile_schedule(schedule)
    num_stages, m_count = schedule.num_stages, schedule.microbatches
    last = num_stages - 1
    f_end = [[-1.0] * m_count for _ in range(num_stages)]
    b_end = [[-1.0] * m_count for _ in range(num_stages)]
    starts = [[0.0] * len(a) for a in schedule.stages]
    ends = [[0.0] * len(a) for a in schedule.stages]
    # Per stage, everything the inner loop touches, unpacked in one go on each visit.
    ctx = [
        (
            code.signed[s],
            starts[s],
            ends[s],
            f_end[s],
            b_end[s],
            tau_f[s],
            tau_b[s],
            f_end[s - 1] if s > 0 else None,
            b_end[s + 1] if s < last else None,
            tau_c[s - 1] if s > 0 else 0.0,
            tau_c[s] if s < last else 0.0,
        )
        for s in range(num_stages)
    ]
    cursor = [0] * num_stages
    free = [0.0] * num_stages
    waited = [0.0] * num_stages
    stack = list(range(num_stages - 1, -1, -1))
    queued = [True] * num_stages
    while stack:
        s = stack.pop()
        queued[s] = False
        signed, st, en, fe, be, tf, tb, up, down, c_up, c_down = ctx[s]
        i, n, t, w = cursor[s], len(signed), free[s], waited[s]
        first = i
        while i < n:
            m = signed[i]
            if m >= 0:
                if up is not None:
                    ready = up[m]
                    if ready < 0:
                        break
                    ready += c_up
                    if ready > t:
                        w += ready - t
                        t = ready
                st[i] = t
                t += tf[m]
                fe[m] = t
            else:
                m = ~m
                if down is not None:
                    ready = down[m]
                    if ready < 0:
                        break
                    ready += c_down
                    if ready > t:
                        w += ready - t
                        t = ready
                st[i] = t
                t += tb[m]
                be[m] = t
            en[i] = t
            i += 1
        cursor[s], free[s], waited[s] = i, t, w
        if i > first:
            if s < last and not queued[s + 1]:
                queued[s + 1] = True
                stack.append(s + 1)
            if s > 0 and not queued[s - 1]:
                queued[s - 1] = True
                stack.append(s - 1)
    stuck = [
        (s, acts[cursor[s]]) for s, acts in enumerate(schedule.stages) if cursor[s] < len(acts)
    ]
    if stuck:
        waits = "; ".join(
            f"stage {s} waits at {a} for {_dependency(a, num_stages)}" for s, a in stuck
        )
        raise ScheduleError(f"deadlock: {waits}", stuck[0][0], stuck[0][1])
    return Replay(starts, ends, waited)


def validate(schedule: Schedule) -> Compiled:
    """Raise ScheduleError unless every stage runs each F and B once, in order, without deadlock."""
    code = compile_schedule(schedule)
    zeros = [[0.0] * schedule.microbatches] * schedule.num_stages
    replay(schedule, zeros, zeros, [0.0] * max(0, schedule.num_stages - 1), code)
    return code
