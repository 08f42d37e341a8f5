"""Where a rank's messages travel: headers on a CPU gloo group, tensors on the accelerator's own.

A message between stages (runtime/comm.py) is a fixed header and, unless empty, a payload.
Headers and control messages (JSON: a migration's manifest and acknowledgement) go over the
control group (gloo, CPU memory). Payloads go over a
data group of two ranks per (sender, receiver) pair (runtime/group.py): NCCL when every rank
has a CUDA device of its own, so activations, gradients and migrating layer tensors stay in GPU
memory (sent from the stage's tensors, received into its device); gloo otherwise, on CPU too,
so the CPU tests run the same split. One code path: only the groups and the wire device
differ. On NCCL payloads travel as batched P2P (``batch_isend_irecv``) on both sides: a batch
and a lone send or receive use different communicators there, so both ends must use the same;
on gloo as plain ``isend``/``irecv`` (a batch of one costs more on the host).

On gloo the receiver keeps a receive of ``AHEAD`` bytes posted on the data group before the
header arrives (gloo fills a larger buffer with a smaller message): a payload whose receive is
not yet posted when it arrives costs gloo a round trip (the sender waits for the receiver to
ask for it), about 0.3-0.5 ms a message on CPU, more than the 4 KB activations of the
benchmarks take to travel. A larger payload travels as its first ``AHEAD`` bytes and the rest.
NCCL needs the sizes to match: there the payload's receive is posted once its header is in.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .group import control_group, data_backend, pair_groups

AHEAD = 1 << 20  # bytes of the data receive kept posted ahead of the header (gloo)


@dataclass(frozen=True)
class Transport:
    """The groups one rank's links use and the device their payloads travel on."""

    #: This rank.
    me: int
    #: Headers (and the control plane's JSON): gloo, CPU tensors.
    control: dist.ProcessGroup
    #: (sender, receiver) -> the two ranks' data group, for the pairs this rank is in.
    data: Mapping[tuple[int, int], dist.ProcessGroup | None]
    #: Where payloads travel: the stage's CUDA device on NCCL, else the CPU.
    device: torch.device
    #: Bytes of the data receive kept posted ahead of each header (0: none, NCCL).
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

    def send_header(self, frame: torch.Tensor, peer: int) -> dist.Work | None:
        """Post a header frame (a CPU uint8 tensor) to ``peer``."""
        return dist.isend(frame, peer, group=self.control)

    def recv_header(self, into: torch.Tensor, peer: int) -> None:
        """Receive the next header frame from ``peer`` into ``into`` (blocks)."""
        dist.recv(into, peer, group=self.control)

    def lane(self, control: bool) -> torch.device:
        """Where a payload travels: the CPU for JSON control messages (``control``), else the
        wire device."""
        return torch.device("cpu") if control else self.device

    def wire(self, payload: torch.Tensor, control: bool = False) -> torch.Tensor:
        """``payload``'s bytes, flat, on its lane's device (no copy where it already is)."""
        flat = payload.detach().to(self.lane(control)).contiguous().reshape(-1)
        return flat.view(torch.uint8)

    def empty(self, nbytes: int, control: bool = False) -> torch.Tensor:
        """A buffer for a payload of ``nbytes`` on its lane's device."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.lane(control))

    def send_data(self, data: torch.Tensor, peer: int, control: bool = False) -> list[dist.Work]:
        """Post the payload bytes ``data`` (from ``wire``) to ``peer``: tensors on the pair's
        data group, JSON (``control``) on the control group after its header. Keep ``data``
        alive until the returned works complete."""
        if control:
            work = dist.isend(data, peer, group=self.control)
            return [] if work is None else [work]
        group = self.data_group(self.me, peer)
        if not self.ahead:
            return dist.batch_isend_irecv([dist.P2POp(dist.isend, data, peer, group)])
        parts = [data] if data.numel() <= self.ahead else [data[: self.ahead], data[self.ahead :]]
        return [w for w in (dist.isend(x, peer, group=group) for x in parts) if w is not None]

    def post_ahead(self, peer: int) -> tuple[torch.Tensor, list[dist.Work]]:
        """Post the receive of ``peer``'s next payload before its header (gloo; ``ahead``
        bytes, the first part of a larger payload): the buffer and its works."""
        buf = torch.empty(self.ahead, dtype=torch.uint8)
        work = dist.irecv(buf, peer, group=self.data_group(peer, self.me))
        return buf, [] if work is None else [work]

    def receiver_stream(self) -> torch.cuda.Stream | None:
        """Called first in a receiver thread: on CUDA, select the device in this thread and
        return a stream of its own to wait for receives on (None on CPU)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.set_device(self.device)
        return torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def recv_data(
        self,
        into: torch.Tensor,
        peer: int,
        stream: torch.cuda.Stream | None,
        control: bool = False,
    ) -> None:
        """Receive a payload from ``peer`` into ``into``; return once its bytes are in place.

        On CUDA the wait is on the receiver thread's own ``stream`` (then synchronized): the
        stage's compute stream never waits for a receive, and the arrival time is when the bytes
        landed.
        """
        if control:
            dist.recv(into, peer, group=self.control)
            return
        group = self.data_group(peer, self.me)
        if self.ahead:  # gloo: a plain receive (a batch of one costs more)
            dist.recv(into, peer, group=group)
            return
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, into, peer, group)])
        if stream is None:
            wait_all(works)
            return
        with torch.cuda.stream(stream):
            wait_all(works)
        stream.synchronize()


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
