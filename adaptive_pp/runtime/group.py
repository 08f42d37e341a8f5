"""The process group a pipeline runs in, and the device of each stage."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store
from torch.distributed.rendezvous import rendezvous


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
    if not _RENDEZVOUS:
        store, _, _ = next(rendezvous("env://", timeout=timeout))
        _RENDEZVOUS.append(store)
    # A group made after one was destroyed gets the same store keys ("default_pg/0/...");
    # a rank quicker than rank 0 would read the old group's addresses, or the old store,
    # and hang. One store per process (rank 0 keeps serving it) and a fresh prefix per group.
    generation = len(_RENDEZVOUS)
    _RENDEZVOUS.append(store := _RENDEZVOUS[0])
    dist.init_process_group(
        "gloo",
        store=PrefixStore(f"adaptive_pp/{generation}/", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
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
