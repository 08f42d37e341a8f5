"""Schedule data: actions per rank, placement of model chunks, text form.

A schedule lists, for each stage (rank), the actions it runs in order. ``Action(1, "F", 3)``
(text ``1F3``) is stage 1's forward of micro-batch 3; ``B`` is the full backward. Split
backward (zero-bubble schedules) replaces ``B`` by ``I`` (input gradient, sent upstream) and
``W`` (weight gradient, local, after its ``I``). Clock table of 1F1B for S=3, M=4 (one column
per unit of time, forward and backward one unit each)::

    stage 0: F0 F1 F2 .. .. B0 F3 B1 .. B2 .. B3
    stage 1: .. F0 F1 .. B0 F2 B1 F3 B2 .. B3 ..
    stage 2: .. .. F0 B0 F1 B1 F2 B2 F3 B3 .. ..

GPipe runs every forward first, then every backward, so stage s stashes all M activations;
1F1B stashes at most ``min(S - s, M)``.

Model chunks: a rank may hold ``V = Schedule.chunks`` chunks (virtual stages); an action names
its chunk, text ``1F3c1`` (chunk 0 is written without the suffix: ``1F3``). The S*V virtual
stages run in order 0..S*V-1; ``Schedule.placement`` says where virtual stage v lives:
``"loop"`` (interleaved, Megatron/torch): ``v = chunk * S + rank``; ``"v"`` (ZB-V): even chunks
run ranks 0..S-1, odd chunks S-1..0, so ``v = chunk * S + (S - 1 - rank)`` for odd chunks.
Dependencies: ``F`` of (v, m) needs ``F`` of (v-1, m); ``B`` or ``I`` of (v, m) needs the ``B``
or ``I`` of (v+1, m) and, on the same rank, its own ``F``; ``W`` needs its ``I`` on the same rank.
An activation stays stashed from its ``F`` until its ``B`` or ``W`` ends (``peak_stash``).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, wraps
from itertools import compress, repeat
from operator import lt
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, ParamSpec, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

Kind = Literal["F", "B", "I", "W"]
KINDS: tuple[Kind, ...] = ("F", "B")  # the kinds of a full-backward schedule
SPLIT_KINDS: tuple[Kind, ...] = ("F", "I", "W")  # the kinds of a split-backward schedule
ALL_KINDS: tuple[Kind, ...] = ("F", "B", "I", "W")
Placement = Literal["loop", "v"]
PLACEMENTS: tuple[Placement, ...] = ("loop", "v")

# Schedules the runtime can run (config validation, controller decisions) ...
SCHEDULE_NAMES = ("1f1b", "gpipe", "zb-h1", "interleaved-1f1b", "zb-v")
SPLIT_BACKWARD_SCHEDULES = ("zb-h1", "zb-v")
CHUNKED_SCHEDULES = ("interleaved-1f1b", "zb-v")  # V model chunks per rank (zb-v: always 2)
# Run without a flush between steps (PipeDream-2BW, core.twobw): chosen at the start only.
ASYNC_SCHEDULES = ("2bw",)
# ... and those the core (generators, validator, simulator) knows: all of them.
SIMULATED_SCHEDULE_NAMES = SCHEDULE_NAMES + ASYNC_SCHEDULES

# ASCII digits only; a backward's negative micro-batch is the previous step's (PipeDream-2BW)
_ACTION_RE = re.compile(r"^(\d+)([FBIW])(-?\d+)(?:c(\d+))?$", re.ASCII)


class ScheduleError(ValueError):
    """A schedule that cannot run; names the stage and action at fault."""

    def __init__(self, message: str, stage: int | None = None, action: Action | None = None):
        super().__init__(message)
        self.stage = stage
        self.action = action


class Action(NamedTuple):
    """One unit of work: ``kind`` (F, B, I or W) of ``microbatch`` on ``stage``, model ``chunk``."""

    stage: int
    kind: Kind
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        if self.chunk:
            return f"{self.stage}{self.kind}{self.microbatch}c{self.chunk}"
        return f"{self.stage}{self.kind}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self.stage}, {self.kind!r}, {self.microbatch}, {self.chunk})"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the compact form, e.g. ``"1F3"`` or ``"1I3c1"`` (chunk 1)."""
        match = _ACTION_RE.match(text.strip())
        if match is None or (match.group(3).startswith("-") and match.group(2) != "B"):
            raise ValueError(
                f"not an action: {text!r} (expected e.g. '1F3' or '1W3c1': stage, F|B|I|W, "
                "micro-batch, optional c<chunk>)"
            )
        kind: Kind = _KIND_OF[match.group(2)]
        chunk = match.group(4)
        return cls(int(match.group(1)), kind, int(match.group(3)), int(chunk) if chunk else 0)


_KIND_OF: dict[str, Kind] = {"F": "F", "B": "B", "I": "I", "W": "W"}
_new = cast(
    Any, tuple.__new__
)  # builds an Action without the Python-level __new__ (generators' hot path)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _gc_paused(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Pause the cyclic garbage collector while ``func`` runs (restored after, even on error).

    Generators and the compiler allocate a tuple per action, each counted towards the next
    collection; for 10^5 actions the collections (full ones included, over every live object)
    took half the generation time. Nothing here builds reference cycles, so pausing is safe.
    """

    @wraps(func)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not gc.isenabled():
            return func(*args, **kwargs)
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            gc.enable()

    return paused


def virtual_stage(rank: int, chunk: int, num_ranks: int, placement: Placement = "loop") -> int:
    """The virtual stage that ``chunk`` of ``rank`` holds (see the module docstring)."""
    if placement == "v" and chunk % 2 == 1:
        return chunk * num_ranks + num_ranks - 1 - rank
    return chunk * num_ranks + rank


def locate(vstage: int, num_ranks: int, placement: Placement = "loop") -> tuple[int, int]:
    """``(rank, chunk)`` of virtual stage ``vstage`` (the inverse of ``virtual_stage``)."""
    rank, chunk = vstage % num_ranks, vstage // num_ranks
    if placement == "v" and chunk % 2 == 1:
        rank = num_ranks - 1 - rank
    return rank, chunk


def _placements(num_ranks: int, chunks: int, placement: Placement) -> list[tuple[int, int]]:
    """``(rank, chunk)`` of each virtual stage, in pipeline order."""
    out = [(0, 0)] * (num_ranks * chunks)
    for r in range(num_ranks):
        for c in range(chunks):
            out[virtual_stage(r, c, num_ranks, placement)] = (r, c)
    return out


_D = TypeVar("_D", bound="Deferred")


class Deferred:
    """Lets a frozen dataclass build fields on first access: ``deferring`` makes an instance
    whose named fields are functions, called once when read. Equality, hashing, ``repr``,
    ``replace`` and pickling read the fields, so they see the built values (pickling keeps
    no function). A deferred field must not be a class attribute (a dataclass default is:
    delete it from the class after the decorator; __init__ keeps it)."""

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            build = self.__dict__.get("_deferred", {}).get(name)
            if build is None:
                if name in self.__dict__:  # built by another thread meanwhile
                    return self.__dict__[name]
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            value = build()
            object.__setattr__(self, name, value)
            return value

    def __getstate__(self) -> dict[str, Any]:  # no private helper: a copy is a built one
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        for name in self.__dict__.get("_deferred", {}):
            state[name] = getattr(self, name)
        return state

    @classmethod
    def deferring(cls: type[_D], deferred: dict[str, Callable[[], Any]], /, **values: Any) -> _D:
        """An instance with fields ``values`` and, built on first access, ``deferred``."""
        obj = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(obj, name, value)
        object.__setattr__(obj, "_deferred", deferred)
        return obj


Ints = NDArray[np.int64]


@dataclass(frozen=True)
class Rows:
    """A generator's lists in compact form: per rank, one letter per action (its kind), the
    micro-batch ids and the chunks (None: all 0); ``rowwise``: worth a try as a grid (GPipe's
    rows all chain down the ranks: no)."""

    kinds: tuple[str, ...]
    microbatches: tuple[Ints, ...]
    chunks: tuple[Ints, ...] | None = None
    rowwise: bool = True
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def stages(self) -> tuple[tuple[Action, ...], ...]:
        """The Action lists."""
        out = []
        for r, kinds in enumerate(self.kinds):
            mbs = self.microbatches[r].tolist()
            chs = repeat(0) if self.chunks is None else self.chunks[r].tolist()
            out.append(_actions_of(r, kinds, mbs, chs))
        return tuple(out)


@dataclass(frozen=True)
class Schedule(Deferred):
    """Actions per rank (``stages[s]`` runs in order on rank ``s``) over ``microbatches``.

    ``chunks`` model chunks per rank, placed on virtual stages by ``placement``. A generator's
    schedule (``generated``) builds ``stages`` from its compact form on first access.
    """

    stages: tuple[tuple[Action, ...], ...]
    microbatches: int
    name: str = "custom"
    chunks: int = 1
    placement: Placement = "loop"

    @classmethod
    def generated(
        cls,
        rows: Rows,
        microbatches: int,
        name: str,
        chunks: int = 1,
        placement: Placement = "loop",
    ) -> Schedule:
        """A schedule whose ``stages`` are ``rows``' (built when first read)."""
        return cls.deferring(
            {"stages": rows.stages},
            microbatches=microbatches,
            name=name,
            chunks=chunks,
            placement=placement,
            _rows=rows,
        )

    @property
    def rows(self) -> Rows | None:
        """The compact form of a generator's schedule (None for any other)."""
        rows: Rows | None = self.__dict__.get("_rows")
        return rows

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages (ranks)."""
        rows = self.rows
        return len(self.stages) if rows is None else len(rows.kinds)

    @property
    def num_virtual_stages(self) -> int:
        """Ranks x chunks."""
        return self.num_stages * self.chunks

    @cached_property
    def split_backward(self) -> bool:
        """Whether any action is an I or a W (the runtime runs only F and B today)."""
        rows = self.rows
        if rows is not None:
            return any("I" in k or "W" in k for k in rows.kinds)
        return any(a.kind in "IW" for acts in self.stages for a in acts)

    def virtual_stage(self, rank: int, chunk: int = 0) -> int:
        """The virtual stage ``chunk`` of ``rank`` holds."""
        return virtual_stage(rank, chunk, self.num_stages, self.placement)

    def locate(self, vstage: int) -> tuple[int, int]:
        """``(rank, chunk)`` of virtual stage ``vstage``."""
        return locate(vstage, self.num_stages, self.placement)

    def __iter__(self) -> Iterator[tuple[Action, ...]]:
        """Iterate over the stages' action tuples."""
        return iter(self.stages)

    def to_text(self) -> str:
        """One line per stage, e.g. ``0: 0F0 0F1 0B0 0B1``; round-trips through from_text.

        Chunked schedules start with a header line ``# chunks=2 placement=loop``.
        """
        lines = [f"{s}: " + " ".join(map(str, actions)) for s, actions in enumerate(self.stages)]
        if self.chunks != 1 or self.placement != "loop":
            lines.insert(0, f"# chunks={self.chunks} placement={self.placement}")
        return "\n".join(lines)

    @classmethod
    def from_text(
        cls, text: str, microbatches: int | None = None, name: str = "custom"
    ) -> Schedule:
        """Parse the form written by to_text; M defaults to the largest micro-batch id + 1.

        Without a header, chunks default to the largest chunk id + 1 and placement to "loop".
        """
        stages: list[tuple[Action, ...]] = []
        lines = text.strip().splitlines()
        chunks: int | None = None
        placement: Placement = "loop"
        if lines and lines[0].startswith("#"):
            fields = dict(f.partition("=")[::2] for f in lines.pop(0)[1:].split())
            try:
                chunks = int(fields.get("chunks", "1"))
                placement = _PLACEMENT_OF[fields.get("placement", "loop")]
            except (KeyError, ValueError):
                raise ValueError(f"line 1: bad header {text.splitlines()[0]!r}") from None
        for lineno, raw in enumerate(lines):
            head, sep, body = raw.partition(":")
            if not sep or head.strip() != str(lineno):
                raise ValueError(f"line {lineno + 1}: expected '{lineno}: <actions>', got {raw!r}")
            stages.append(tuple(Action.parse(tok) for tok in body.split()))
        if microbatches is None:
            microbatches = 1 + max((a.microbatch for acts in stages for a in acts), default=-1)
        if chunks is None:
            chunks = 1 + max((a.chunk for acts in stages for a in acts), default=0)
        return cls(tuple(stages), microbatches, name, chunks, placement)


_PLACEMENT_OF: dict[str, Placement] = {"loop": "loop", "v": "v"}


def _check_sizes(num_stages: int, microbatches: int, chunks: int = 1) -> None:
    if num_stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {num_stages}")
    if microbatches < 1:
        raise ValueError(f"a step needs at least 1 micro-batch, got {microbatches}")
    if chunks < 1:
        raise ValueError(f"a rank needs at least 1 model chunk, got {chunks}")


def _actions_of(
    stage: int, kinds: Sequence[str], mbs: Sequence[int], chs: Iterator[int] | Sequence[int]
) -> tuple[Action, ...]:
    """Rank ``stage``'s actions from kinds, micro-batch ids and chunks (built in C, no checks)."""
    if len(kinds) != len(mbs):
        raise ValueError(f"{len(kinds)} kinds for {len(mbs)} micro-batch ids")
    return tuple(map(_new, repeat(Action), zip(repeat(stage), kinds, mbs, chs)))


# --- per-rank order (the validator's fast paths; see flow.compile_schedule) ---------------------


def _unit_positions(
    acts: Sequence[Action], kinds: Sequence[str], units: Sequence[int], vm: int
) -> tuple[list[int], list[int]] | None:
    """Per unit (chunk*M + m), the position of its F and of its B or I, or None if irregular."""
    order = sorted(range(len(acts)), key=units.__getitem__)
    pattern = "".join(map(kinds.__getitem__, order))
    width = 2 if pattern == "FB" * vm else 3 if pattern == "FIW" * vm else 0
    if not width or [units[i] for i in order[::width]] != list(range(vm)):
        return None
    return order[0::width], order[1::width]


_IS_F, _IS_BI, _IS_W = (bytes(int(chr(c) in ks) for c in range(256)) for ks in ("F", "BI", "W"))


def _ordered_positions(
    kinds: Sequence[str], units: Sequence[int], vm: int
) -> tuple[list[int], list[int]] | None:
    """Like _unit_positions when each kind runs the units 0..vm-1 in order (1F1B, GPipe, ZB-H1),
    every B or I after its F and every W after its I (no sorting); else None."""
    try:
        code = "".join(kinds).encode()
    except TypeError:
        return None
    n, every, full = len(code), list(range(vm)), code.count(b"B")
    masks = [code.translate(t) for t in (_IS_F, _IS_BI, _IS_W)]
    if n != len(kinds) or n != (2 if full == vm else 3 if full == 0 else 0) * vm:
        return None  # every backward full (F, B) or every one split (F, I, W)
    if any(list(compress(units, mk)) != every for mk in masks[: n // vm]):
        return None
    fwd, back, *w = (list(compress(range(n), mk)) for mk in masks[: n // vm])
    if not all(map(lt, fwd, back)) or (w and not all(map(lt, back, w[0]))):
        return None
    return fwd, back


def _unit_positions_slow(
    kinds: Sequence[str], units: Sequence[int], vm: int
) -> tuple[list[int], list[int]]:
    fwd, back = [0] * vm, [0] * vm
    for i, (k, u) in enumerate(zip(kinds, units, strict=True)):
        if k == "F":
            fwd[u] = i
        elif k != "W":
            back[u] = i
    return fwd, back
