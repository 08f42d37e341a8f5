"""What a rank runs: segments (the model's pre, its blocks, its post) grouped in chunks.

A chunk is a contiguous run of segments executed as one pipeline stage. A rank holds one chunk,
or V under a chunked schedule: chunk c of rank r is virtual stage ``schedule.virtual_stage(r,
c)``, ``c * S + r`` under interleaved 1F1B, ``r`` and ``2S - 1 - r`` under ZB-V (the
partition has one range per virtual stage, in model order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .layerstate import layer_name

SegmentRole = Literal["pre", "layer", "post"]


@dataclass(frozen=True)
class Segment:
    """One unit a stage runs in order: the model's ``pre``, one of its blocks, or ``post``.

    ``layer`` is the block's global index for role "layer", None for "pre" and "post".
    """

    role: SegmentRole
    layer: int | None
    module: nn.Module

    def __post_init__(self) -> None:
        if (self.role == "layer") != (self.layer is not None):
            raise ValueError(f"a {self.role!r} segment with layer={self.layer}")

    @classmethod
    def block(cls, layer: int, module: nn.Module) -> Segment:
        """Block ``layer`` of the model."""
        return cls("layer", layer, module)

    @classmethod
    def pre(cls, module: nn.Module) -> Segment:
        """The model's ``pre`` module (on the first stage, before the blocks)."""
        return cls("pre", None, module)

    @classmethod
    def post(cls, module: nn.Module) -> Segment:
        """The model's ``post`` module (on the last stage, after the blocks)."""
        return cls("post", None, module)

    @property
    def name(self) -> str:
        """Global module name: "pre", "layers.3", "post"."""
        return layer_name(self.layer) if self.layer is not None else self.role


@dataclass
class Chunk:
    """A contiguous run of segments that rank ``stage`` executes as its chunk ``index``, the
    pipeline's virtual stage ``vstage`` (default: ``stage``, one chunk per rank).
    """

    stage: int
    segments: list[Segment]
    index: int = 0
    vstage: int = -1

    def __post_init__(self) -> None:
        if self.vstage < 0:
            self.vstage = self.stage

    def modules(self) -> dict[str, nn.Module]:
        """Global name -> module of this chunk's segments, in order."""
        return {seg.name: seg.module for seg in self.segments}

    def layer_range(self) -> tuple[int, int]:
        """First and last global layer index in this chunk ((-1, -1) if none, as on the wire)."""
        idx = [s.layer for s in self.segments if s.layer is not None]
        return (min(idx), max(idx)) if idx else (-1, -1)
