"""Two weight versions per rank for PipeDream-2BW (``core.twobw``): the stash and the newest.

Version W(v) of every parameter lives in one of two storages, ``store[v % 2]``; W(-1) = W(0)
starts as a copy in ``store[1]``. The module's own parameters always point at the newest
version (what checkpoints, migration and ``state_dict`` read). Forwards do not use them: each
step gets fresh leaf tensors over the storage of the version it runs on (``leaves``), swapped
into the modules while its window runs (``swapped_in``: once per step, not per call), so its
gradients accumulate apart from any other step's, and its backwards find in their graphs
exactly the weights their forwards used.

``update`` makes W(v+1) = W(v) - update(g) once every backward of the step that ran on
W(v - 1) is done: that step freed ``store[(v+1) % 2]``, which takes a copy of W(v) and then the
optimizer's in-place step (the parameters point there meanwhile, so the optimizer's state stays
keyed by them). ``label[i]`` says which version storage i holds; ``leaves`` refuses a version
that is not there (VersionMismatch), so a step can never run on overwritten weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..core.errors import VersionMismatch


class WeightVersions:
    """The two versions of a rank's parameters (global name -> parameter)."""

    def __init__(self, params: Mapping[str, nn.Parameter], stage: int) -> None:
        self.params = dict(params)
        self.stage = stage
        self.store: list[dict[str, torch.Tensor]] = [
            {n: p.data for n, p in self.params.items()},
            {n: p.detach().clone() for n, p in self.params.items()},
        ]
        self.label = [0, -1]  # W(0) in store[0], W(-1) = W(0) in store[1]

    @classmethod
    def at(
        cls,
        params: Mapping[str, nn.Parameter],
        older: Mapping[str, torch.Tensor],
        version: int,
        stage: int,
    ) -> WeightVersions:
        """Versions ``version`` (the parameters) and ``version - 1`` (``older``, by name): a
        rank's versions after a move or a checkpoint load."""
        obj = cls.__new__(cls)
        obj.params, obj.stage = dict(params), stage
        newest = {n: p.data for n, p in obj.params.items()}
        stale = {n: older[n].to(p.device, p.dtype) for n, p in obj.params.items()}
        obj.store = [newest, stale] if version % 2 == 0 else [stale, newest]
        obj.label = [version, version - 1] if version % 2 == 0 else [version - 1, version]
        return obj

    def older(self) -> dict[str, torch.Tensor]:
        """The version before the newest, by name (what the next step's forwards run on)."""
        side = (self.newest - 1) % 2
        assert self.label[side] == self.newest - 1
        return dict(self.store[side])

    @property
    def newest(self) -> int:
        """The newest version held."""
        return max(self.label)

    def storage_ptrs(self) -> set[int]:
        """Storage addresses of both versions (weights, not activations)."""
        return {t.untyped_storage().data_ptr() for side in self.store for t in side.values()}

    def nbytes(self) -> int:
        """Bytes of both versions."""
        return sum(t.nbytes for side in self.store for t in side.values())

    def leaves(self, version: int, what: str) -> dict[str, torch.Tensor]:
        """Fresh leaf tensors (requiring grad) over version ``version``'s storage."""
        side = version % 2
        if self.label[side] != version:
            raise VersionMismatch(
                f"stage {self.stage} needs weight version {version} for {what}, but holds "
                f"versions {sorted(self.label)}",
                stage=self.stage,
            )
        return {
            n: t.detach().requires_grad_(self.params[n].requires_grad)
            for n, t in self.store[side].items()
        }

    def update(
        self,
        version: int,
        grads: Mapping[str, torch.Tensor | None],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """Make W(version) = W(version - 1) - the optimizer's step on ``grads``."""
        src, dst = self.store[(version - 1) % 2], self.store[version % 2]
        if self.label[(version - 1) % 2] != version - 1:
            raise VersionMismatch(
                f"stage {self.stage} cannot make weight version {version}: it holds "
                f"{sorted(self.label)}, not {version - 1}",
                stage=self.stage,
            )
        with torch.no_grad():
            for n, p in self.params.items():
                dst[n].copy_(src[n])
                p.data = dst[n]
                p.grad = grads.get(n)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.label[version % 2] = version


@dataclass
class AsyncState:
    """Where a rank stands in the 2BW stream: its versions, whether the last window left
    backwards for the next (no drain since), the leaves of the step they belong to, and the
    reports whose shares may still be on their way (settled by the next step or the drain)."""

    versions: WeightVersions
    spill: bool = False
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    unsettled: list[Settles] = field(default_factory=list)


class Settles(Protocol):
    """A report that collects its peers' shares when told (``stepreport.PendingReport``)."""

    def settle(self) -> None:
        """Collect (and wait for) what is still on its way."""


@contextmanager
def swapped_in(modules: Iterator[nn.Module], tensors: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Run with every parameter of ``modules`` whose id is in ``tensors`` replaced by that
    tensor (tied parameters included), put back afterwards even on error."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for mod in modules:
            for sub in mod.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and id(p) in tensors:
                        saved.append((sub, name, p))
                        sub._parameters[name] = tensors[id(p)]  # type: ignore[assignment]
        yield
    finally:
        for sub, name, p in reversed(saved):
            sub._parameters[name] = p
