"""Rank jobs for tests/test_comm.py (importable by the stage processes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from adaptive_pp.runtime import transport
from adaptive_pp.runtime.comm import Header, Link, MessageKind
from adaptive_pp.runtime.control import BODY, FRAME, Control
from adaptive_pp.runtime.transport import AHEAD, HEAD

# Around a control frame's body (the rest of the frame is its header) and well past it.
SIZES = (0, 1, BODY - 30, BODY, BODY + 1, FRAME, 3 * FRAME)


def payload(rank: int, size: int) -> dict[str, Any]:
    """A JSON object whose encoding is about ``size`` bytes and names its sender."""
    return {"rank": rank, "size": size, "text": chr(ord("a") + rank) * size, "t": (1, 2.5)}


def exchange_job() -> list[Any]:
    """Every size through Control.all_gather and .broadcast; returns what this rank got."""
    me, world = dist.get_rank(), dist.get_world_size()
    control = Control(me, world, timeout=None, wait_timeout=60)
    got = []
    for size in SIZES:
        got.append(control.all_gather(payload(me, size)))
        got.append(control.broadcast(payload(me, size), src=size % world))
    control.close()
    return got


def tensors() -> list[torch.Tensor]:
    """What rank 0 sends rank 1: small, empty, bfloat16, larger than the receive posted ahead
    (two parts), both sides of it."""
    g = torch.Generator().manual_seed(3)
    big = AHEAD // 4 + 1000  # float32 elements: over the receive posted ahead, in two parts
    return [
        torch.randn(4, 5, generator=g),
        torch.empty(0, 3),
        torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        torch.randn(big, generator=g),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        # the last payload that fits the receive posted ahead with its header, the first that
        # does not, and the same around AHEAD itself
        torch.randint(0, 255, (AHEAD - HEAD,), dtype=torch.uint8, generator=g),
        torch.randint(0, 255, (AHEAD - HEAD + 1,), dtype=torch.uint8, generator=g),
        torch.randint(0, 255, (AHEAD,), dtype=torch.uint8, generator=g),
        torch.randint(0, 255, (AHEAD + 1,), dtype=torch.uint8, generator=g),
    ]


def link_job(ahead: int = AHEAD) -> dict[str, Any]:
    """Rank 0 sends ``tensors()`` as ACT messages 0..n-1; rank 1 takes them in reverse order.
    Messages framed with ``transport.AHEAD = ahead`` (0: the header apart, as on NCCL)."""
    me = dist.get_rank()
    kept, transport.AHEAD = transport.AHEAD, ahead
    try:
        link = Link(me, 1 - me)
    finally:
        transport.AHEAD = kept
    sent = tensors()
    out: dict[str, Any] = {}
    if me == 0:
        odd = torch.zeros(2, dtype=torch.complex64)
        try:  # refused in the caller, before anything is queued
            link.send(Header(MessageKind.ACT, 99, 7, 3, 0, 1, odd.dtype, (2,)), odd)
        except ValueError as exc:
            out["refused"] = str(exc)
        for i, t in enumerate(sent):
            link.send(Header(MessageKind.ACT, i, 7, 3, 0, 1, t.dtype, tuple(t.shape)), t)
        link.flush()
    else:
        link.begin(7)  # the sender's round
        got = [
            link.take(MessageKind.ACT, i, 60.0, "activation") for i in reversed(range(len(sent)))
        ]
        got.reverse()
        out["equal"] = [
            m.payload.dtype == t.dtype and torch.equal(m.payload, t)
            for m, t in zip(got, sent, strict=True)
        ]
        out["headers"] = [(m.header.microbatch, m.header.step, m.header.version) for m in got]
        out["queue"] = list(zip(link.log.arrived, link.log.consumed, strict=True))
        out["waited"] = link.log.waited
    link.close()
    return out


def corrupt_job() -> str:
    """Rank 0 sends a frame that is not ours; rank 1's take must fail naming both stages."""
    me = dist.get_rank()
    link = Link(me, 1 - me)
    if me == 0:  # where a message starts: on the data group (gloo: the header comes with it)
        group = link.transport.data_group(0, 1) if link.transport.ahead else None
        dist.send(torch.full((HEAD,), 7, dtype=torch.uint8), 1, group=group)
        dist.barrier()
        return ""
    try:
        link.take(MessageKind.ACT, 0, 60.0, "activation")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        dist.barrier()
    return "no error"
