"""The process group a pipeline runs in, and the device of each stage."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
from typing import Any, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store
from torch.distributed.rendezvous import rendezvous

from . import network


def init_distributed(timeout_s: float) -> bool:
    """Join the process group from torchrun-style env vars; True if this call created it."""
    if dist.is_initialized():
        return False
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"no process group and no {', '.join(missing)} in the environment: run under "
            "`torchrun --nproc-per-node S script.py` or through adaptive_pp.launch(fn, nprocs=S)"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    network.prepare()  # GLOO_SOCKET_IFNAME: checked, or set on a job that spans hosts
    network.probe_store(timeout_s)  # under torchrun: a refused store address fails now
    if not _RENDEZVOUS:
        try:
            store, _, _ = next(rendezvous("env://", timeout=timeout))
        except RuntimeError as exc:  # DistNetworkError, DistStoreError: raw store words
            raise network.explain(exc, "store", timeout_s) from exc
        _RENDEZVOUS.append(store)
    # A group made after one was destroyed gets the same store keys ("default_pg/0/...");
    # a rank quicker than rank 0 would read the old group's addresses, or the old store,
    # and hang. One store per process (rank 0 keeps serving it) and a fresh prefix per group;
    # torchrun's restarts reuse its store, so the attempt is in the prefix too.
    generation = len(_RENDEZVOUS)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _RENDEZVOUS.append(store := _RENDEZVOUS[0])
    try:
        dist.init_process_group(
            "gloo",
            store=PrefixStore(f"adaptive_pp/{attempt}/{generation}/", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
        )
    except RuntimeError as exc:  # gloo's pairs did not connect
        raise network.explain(exc, "group", timeout_s) from exc
    return True


# The rendezvous store of this process, then one entry per group made on it.
_RENDEZVOUS: list[Store] = []


def device_of(name: str) -> torch.device:
    """The device a stage runs on: "auto" is cuda:LOCAL_RANK when CUDA is available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


# --- the groups messages travel on (see runtime/transport.py) ------------------------------
# Made once per default group and reused by every pipeline built on it; a new default group
# (after destroy_process_group) starts afresh.
_GROUPS: dict[tuple[str, int, int], dist.ProcessGroup] = {}
_GROUPS_OF: list[dist.ProcessGroup] = []  # the default group _GROUPS belong to


def _groups() -> dict[tuple[str, int, int], dist.ProcessGroup]:
    world = dist.group.WORLD
    assert world is not None, "no default process group"
    if not _GROUPS_OF or _GROUPS_OF[0] is not world:
        _GROUPS.clear()
        _GROUPS_OF[:] = [world]
    return _GROUPS


def control_group(timeout_s: float) -> dist.ProcessGroup:
    """The CPU group headers and control messages travel on: the default group when it is
    gloo (what ``init_distributed`` makes), else a gloo group of every rank (made once;
    collective: every rank calls it)."""
    world = dist.group.WORLD
    assert world is not None, "no default process group"
    if dist.get_backend(world) == "gloo":
        return world
    groups = _groups()
    if ("gloo", -1, -1) not in groups:
        timeout = datetime.timedelta(seconds=timeout_s)
        groups["gloo", -1, -1] = _made(dist.new_group(backend="gloo", timeout=timeout))
    return groups["gloo", -1, -1]


def data_backend(device: torch.device, control: dist.ProcessGroup) -> str:
    """The backend tensors travel on: "nccl" when every rank runs on a CUDA device of its own,
    else "gloo" (two ranks sharing one GPU cannot use NCCL). Collective: one all_gather of
    (host, device) over ``control``, so every rank decides alike."""
    host = int.from_bytes(hashlib.sha1(socket.gethostname().encode()).digest()[:7], "little")
    index = -1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    mine = torch.tensor([host, index], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(control))]
    dist.all_gather(every, mine, group=control)
    places = [tuple(t.tolist()) for t in every]
    cuda = all(p[1] >= 0 for p in places) and dist.is_nccl_available()
    return "nccl" if cuda and len(set(places)) == len(places) else "gloo"


def pair_groups(
    pairs: list[tuple[int, int]], backend: str, timeout_s: float
) -> dict[tuple[int, int], dist.ProcessGroup | None]:
    """One two-rank group per (sender, receiver) pair, for the tensors one rank sends the other.

    One group per direction: on NCCL a pair's sends and receives would share one stream, and
    two ranks each sending the other first would wait on each other forever. Made once per
    default group; collective: every rank calls it with the same pairs (in any order). The
    value is None on the ranks outside a pair.
    """
    groups = _groups()
    timeout = datetime.timedelta(seconds=timeout_s)
    for src, dst in sorted(set(pairs)):
        if (backend, src, dst) not in groups:
            groups[backend, src, dst] = _made(
                dist.new_group([src, dst], backend=backend, timeout=timeout)
            )
    me = dist.get_rank()
    return {(s, d): groups[backend, s, d] if me in (s, d) else None for s, d in pairs}


def _made(group: Any) -> dist.ProcessGroup:
    # new_group returns a sentinel object on ranks outside the group; keep it as it is.
    return cast(dist.ProcessGroup, group)
