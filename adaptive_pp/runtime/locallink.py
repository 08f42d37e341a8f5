"""LocalLink: the hop between two chunks of one rank (ZB-V's turn, virtual stages S-1 and S).

Under V placement (``Schedule.placement == "v"``) rank S-1 holds both virtual stage S-1 (chunk
0) and S (chunk 1): the activation and the gradient between them never leave the process.
A LocalLink takes the place of a Link for that hop: the sending chunk files the message, the
receiving chunk takes it by the same key (kind, round, micro-batch, virtual stage) and the
take is logged like a Link's (``LinkLog``), so the workers run one code path for every hop.
Both chunks run in the rank's one thread and the schedule (validated) puts the sender's action
first, so a message is always there when taken: a missing one is a schedule bug, raised at once.

The step report leaves this hop's queue out, as the simulator does (chunks on one rank exchange
no messages): every message would be consumed after it arrived, by construction.
"""

from __future__ import annotations

import time

import torch

from ..core.errors import PipelineError
from .comm import Header, LinkLog, Message, MessageKind


class LocalLink:
    """The same-rank hop: ``send`` files a copy of the tensor, ``take`` returns it (no thread)."""

    def __init__(self, me: int) -> None:
        self.me = self.peer = me
        self.round = 0
        self.log = LinkLog()
        self._box: dict[tuple[MessageKind, int, int, int], Message] = {}

    def begin(self, rnd: int) -> None:
        """Start round ``rnd``: drop what is left of earlier rounds (an aborted step's)."""
        self.round = rnd
        self._box = {k: v for k, v in self._box.items() if k[1] >= rnd}
        self.log = LinkLog()

    def send(self, header: Header, payload: torch.Tensor) -> None:
        """File the message for the other chunk (a copy, as the wire would make)."""
        if tuple(payload.shape) != header.shape:
            raise ValueError(f"header shape {header.shape} != payload shape {tuple(payload.shape)}")
        key = (header.kind, header.step, header.microbatch, header.vstage)
        self._box[key] = Message(header, payload.detach().clone(), time.perf_counter())

    def take(
        self, kind: MessageKind, microbatch: int, timeout: float, what: str, vstage: int = 0
    ) -> Message:
        """The message (kind, microbatch) for virtual stage ``vstage``; PipelineError if the
        other chunk has not sent it (it never will: both run in this thread). ``timeout`` is
        unused (Link's signature)."""
        msg = self._box.pop((kind, self.round, microbatch, vstage), None)
        if msg is None:
            raise PipelineError(
                f"stage {self.me}: the {what} of micro-batch {microbatch} for virtual stage "
                f"{vstage} comes from another chunk of this rank, which has not sent it: the "
                "schedule runs the two out of order",
                stage=self.me,
                microbatch=microbatch,
            )
        self.log.record(kind, msg.arrived, time.perf_counter(), 0.0)
        return msg

    def flush(self) -> None:
        """Nothing is in flight."""

    def close(self) -> None:
        """Nothing to say goodbye to."""
