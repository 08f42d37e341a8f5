"""Where a rank's messages travel: one buffer per message on gloo, header and tensor apart on NCCL.

A message between stages (runtime/comm.py) is a fixed header (``HEAD`` bytes) and, unless
empty, a payload: the tensor's bytes. Payloads travel on a data group of two ranks per (sender,
receiver) pair (runtime/group.py): NCCL when every rank has a CUDA device of its own, gloo
otherwise (on CPU). How a message is framed depends on what the data group can do; the links
see one interface either way (``post``, and ``Inbound`` on the receiving side):

* **gloo (CPU): one buffer.** The header and the payload travel together, as one message on the
  data group: the receiver keeps a receive of ``AHEAD`` bytes posted (gloo fills a larger
  buffer with a smaller message), so a message arrives into a receive already posted, in one
  transfer and one wake-up of the receiving thread. A payload whose receive is not yet posted
  when it arrives costs gloo a round trip (the sender waits for the receiver to ask for it),
  about 0.3-0.5 ms on CPU; a header and payload sent apart cost a second transfer and wake-up
  (docs/EXPERIMENTS.md, "one message per hop"). A message over ``AHEAD`` bytes travels as its
  first ``AHEAD`` bytes and the rest. JSON control payloads travel the same way (CPU bytes).
* **NCCL (GPUs): header apart.** NCCL needs the sizes of a send and its receive to match and
  the payload never touches the host, so the header goes first on the control group (gloo,
  CPU), and the payload's receive is posted once its header is in, sized by it; JSON control
  payloads follow their header on the control group. Payloads travel as batched P2P
  (``batch_isend_irecv``) on both sides: a batch and a lone send or receive use different
  communicators there, so both ends must use the same.

``AHEAD = 0`` (set before the transport is made) frames messages the NCCL way on gloo too:
the CPU tests run both framings.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .group import control_group, data_backend, pair_groups

AHEAD = 1 << 20  # bytes of the data receive kept posted ahead of each message (gloo)
HEAD = 128  # bytes of a message's header (16 x int64, see runtime/comm.py)

#: A posted send and the tensor it reads from (kept alive until the send completes).
Posted = tuple[dist.Work, torch.Tensor]
_HEADER = struct.Struct(f"={HEAD // 8}q")  # a header's int64 values, as numpy views them


def isend(tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, me: int) -> dist.Work:
    """Post ``tensor`` from rank ``me`` to rank ``peer`` on ``group``, the pair's group (its
    ranks sorted, as ``new_group`` makes them: ``peer`` is its rank ``peer > me``). The group's
    own ``send``, without ``torch.distributed.isend``'s checks (30-40 us of Python a call,
    more after a sleep)."""
    return group.send([tensor], int(peer > me), 0)


def irecv(tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, me: int) -> dist.Work:
    """Post the receive of ``tensor`` from rank ``peer`` on the pair's ``group`` (as
    ``isend``)."""
    return group.recv([tensor], int(peer > me), 0)


@dataclass(frozen=True)
class Transport:
    """The groups one rank's links use and the device their payloads travel on."""

    #: This rank.
    me: int
    #: The control plane's group (gloo, CPU tensors); headers on NCCL.
    control: dist.ProcessGroup
    #: (sender, receiver) -> the two ranks' data group, for the pairs this rank is in.
    data: Mapping[tuple[int, int], dist.ProcessGroup | None]
    #: Where payloads travel: the stage's CUDA device on NCCL, else the CPU.
    device: torch.device
    #: Bytes of the data receive kept posted ahead of each message (0: the header travels
    #: apart, on the control group: NCCL).
    ahead: int = 0

    @property
    def backend(self) -> str:
        """The data groups' backend: "nccl" or "gloo"."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    def data_group(self, src: int, dst: int) -> dist.ProcessGroup:
        """The group tensors from rank ``src`` to rank ``dst`` travel on."""
        group = self.data.get((src, dst))
        if group is None:
            raise ValueError(f"rank {self.me} has no data group for messages {src} -> {dst}")
        return group

    def lane(self, control: bool) -> torch.device:
        """Where a payload travels: the CPU for JSON control messages (``control``), else the
        wire device."""
        return torch.device("cpu") if control else self.device

    def wire(self, payload: torch.Tensor, control: bool = False) -> torch.Tensor:
        """``payload``'s bytes, flat, on its lane's device (no copy where it already is)."""
        flat = payload.detach().to(self.lane(control)).contiguous().reshape(-1)
        return flat.view(torch.uint8)

    def post(
        self, values: list[int], payload: torch.Tensor, peer: int, control: bool = False
    ) -> list[Posted]:
        """Post one message to ``peer``: the header ``values`` (16 int64) and ``payload``'s
        bytes (none if empty); JSON bytes if ``control``. Keep the returned tensors alive
        until their works complete."""
        if self.ahead:  # gloo: the header and the payload's first bytes in one buffer
            return self._post_frame(values, payload, peer, control)
        data = self.wire(payload, control) if payload.numel() else None
        head = torch.empty(HEAD, dtype=torch.uint8)
        head.numpy().view(np.int64)[:] = values
        works = [(dist.isend(head, peer, group=self.control), head)]
        if data is not None and control:
            works.append((dist.isend(data, peer, group=self.control), data))
        elif data is not None:
            p2p = [dist.P2POp(dist.isend, data, peer, self.data_group(self.me, peer))]
            works += [(w, data) for w in dist.batch_isend_irecv(p2p)]
        return [(w, t) for w, t in works if w is not None]

    def _post_frame(
        self, values: list[int], payload: torch.Tensor, peer: int, control: bool
    ) -> list[Posted]:
        """gloo: ``values`` and ``payload``'s first bytes in one frame, the rest (if any) in a
        second send. Posted on the group's own ``send`` (see ``isend``)."""
        if payload.device.type == "cpu" and payload.is_contiguous():
            data = payload.detach().reshape(-1).view(torch.uint8)  # no copy
        else:
            data = self.wire(payload, control)
        size = data.numel()
        first = min(size, self.ahead - HEAD)
        frame = torch.empty(HEAD + first, dtype=torch.uint8)
        _HEADER.pack_into(frame.numpy().data, 0, *values)
        if first:
            frame[HEAD:].copy_(data[:first])
        group = self.data_group(self.me, peer)
        posted = [(isend(frame, peer, group, self.me), frame)]
        if size > first:
            posted.append((isend(data[first:], peer, group, self.me), data))
        return posted


class Inbound:
    """The receiving end of the messages from one peer, used by one thread (a link's
    receiver): ``header`` blocks for the next message's header, ``buffer`` gives a place for
    its payload, ``fill`` blocks until the payload is there. Errors from ``header`` and
    ``fill`` are the peer's (gone, or the group broken); from ``buffer``, ours.

    On gloo every message comes into one buffer of ``AHEAD`` bytes, kept and reused: its
    payload is copied out (a payload is kept by the stage, in its stash, while the buffer
    takes the next message), then, once the message is handed over, the next receive is
    posted into it.
    """

    def __init__(self, transport: Transport, peer: int) -> None:
        """Called in the receiving thread (on CUDA it selects the device there)."""
        self.transport, self.peer = transport, peer
        #: On CUDA, the receiver thread's own stream to wait for receives on (see ``fill``).
        self.stream: torch.cuda.Stream | None = None
        if transport.device.type == "cuda":
            torch.cuda.set_device(transport.device)
            self.stream = torch.cuda.Stream(transport.device)  # type: ignore[no-untyped-call]
        self._head = torch.empty(HEAD, dtype=torch.uint8)  # NCCL: headers apart
        self._frame = torch.empty(transport.ahead, dtype=torch.uint8)  # gloo: each message
        self._values = self._frame[:HEAD].numpy().view(np.int64)
        self._posted: list[dist.Work] | None = None

    def post(self) -> None:
        """Post the receive of the next message ahead of it, unless posted (gloo; a no-op on
        NCCL)."""
        if self.transport.ahead and self._posted is None:
            self._posted = [self._irecv(self._frame)]

    def _irecv(self, data: torch.Tensor) -> dist.Work:
        """Post the receive of ``data`` from the peer on its data group (gloo)."""
        me, peer = self.transport.me, self.peer
        return irecv(data, peer, self.transport.data_group(peer, me), me)

    def header(self) -> np.ndarray:
        """Block until the next message is in (gloo) or its header (NCCL): its 16 values."""
        if not self.transport.ahead:
            dist.recv(self._head, self.peer, group=self.transport.control)
            return self._head.numpy().view(np.int64)
        self.post()
        assert self._posted is not None
        wait_all(self._posted)
        return self._values

    def buffer(self, nbytes: int, control: bool) -> torch.Tensor:
        """Where the payload of ``nbytes`` goes. On gloo a payload that came whole with its
        header is already there: a copy of its bytes (``fill`` has nothing left to do)."""
        if nbytes <= self.transport.ahead - HEAD:
            return self._frame[HEAD : HEAD + nbytes].clone()
        return torch.empty(nbytes, dtype=torch.uint8, device=self.transport.lane(control))

    def fill(self, data: torch.Tensor, control: bool) -> None:
        """Block until the payload's bytes are in ``data`` (from ``buffer``). On gloo the next
        message's receive is posted by the next ``header``: after this one is handed over,
        as posting a receive (~0.08 ms) would delay the hand-off."""
        if self.transport.ahead:  # gloo: its first bytes came with the header
            first = self.transport.ahead - HEAD
            self._posted = None
            if data.numel() > first:  # else all of it came and ``buffer`` copied it
                data[:first].copy_(self._frame[HEAD:])
                self._irecv(data[first:]).wait()
            return
        if not data.numel():
            return
        if control:
            dist.recv(data, self.peer, group=self.transport.control)
            return
        group = self.transport.data_group(self.peer, self.transport.me)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, data, self.peer, group)])
        if self.stream is None:
            wait_all(works)
            return
        # On CUDA the wait is on the receiver's own stream (then synchronized): the stage's
        # compute stream never waits for a receive, and the arrival time is when bytes landed.
        with torch.cuda.stream(self.stream):
            wait_all(works)
        self.stream.synchronize()


def wait_all(works: list[dist.Work]) -> None:
    """Wait for each of ``works`` (posted sends or receives)."""
    for work in works:
        work.wait()


def links_of(ranks_of_vstages: list[int]) -> list[tuple[int, int]]:
    """Every (sender, receiver) pair of ranks that exchange tensors in a pipeline whose virtual
    stages run on ``ranks_of_vstages`` in model order: each neighbour pair, both ways."""
    pairs = {(a, b) for a, b in itertools.pairwise(ranks_of_vstages) if a != b}
    return sorted(pairs | {(b, a) for a, b in pairs})


def make_transport(
    me: int, pairs: list[tuple[int, int]], device: torch.device, timeout_s: float
) -> Transport:
    """The transport of rank ``me`` for a stage on ``device``, with data groups for ``pairs``
    (the same on every rank). Collective: every rank of the default group calls it."""
    control = control_group(timeout_s)
    backend = data_backend(device, control)
    if backend == "nccl":
        torch.cuda.set_device(device)  # batched P2P on NCCL needs the current device set
    wire = device if backend == "nccl" else torch.device("cpu")
    ahead = 0 if backend == "nccl" else AHEAD
    return Transport(me, control, pair_groups(pairs, backend, timeout_s), wire, ahead)
